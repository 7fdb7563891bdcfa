"""GPS: exactly K entries per row at the top |score| positions; biases and head whole; norms/embeddings frozen."""
import pytest
import timm
import torch

from sensitune.models import tunable_tensors
from sensitune.planning import make_plan


def _scores(model):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch,K", [("vit", 1), ("vit", 3), ("effnet", 2)])
def test_exactly_k_per_row_at_top_scores(arch, K):
    if arch == "vit":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)
    else:
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=5)
    scores = _scores(model)
    plan = make_plan(model, scores, "gps", K=K)
    infos = {i.name: i for i in tunable_tensors(model)}
    sparse = {u.target: u for u in plan.units if u.mode == "sparse"}
    assert set(sparse) == {n for n, i in infos.items() if i.kind == "matrix"}
    for name, u in sparse.items():
        rows, cols = infos[name].matrix_shape
        r = u.indices // cols
        assert torch.equal(torch.bincount(r, minlength=rows), torch.full((rows,), K)), name
        # the chosen entries are the K largest |score| of their row (independent check via sort)
        mag = scores[name].reshape(rows, cols).abs()
        kth = mag.sort(dim=1, descending=True).values[:, K - 1]
        assert torch.all(mag.reshape(-1)[u.indices] >= kth[r]), name
    full = {u.target for u in plan.units if u.mode == "full"}
    assert full == {n for n, i in infos.items() if i.kind == "vector" and i.layer == "bias"}
    assert not any(infos[t].layer == "norm" or infos[t].kind == "embedding" for t in full | set(sparse))
    assert {u.target for u in plan.units if u.mode == "head"} == {n for n, i in infos.items() if i.kind == "head"}
    rows_total = sum(infos[n].matrix_shape[0] for n in sparse)
    biases = sum(infos[n].numel for n in full)
    assert plan.num_trainable(include_head=False) == K * rows_total + biases


def test_qkv_rows_each_get_k():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=5)
    plan = make_plan(model, _scores(model), "gps", K=2)
    u = next(u for u in plan.units if u.target == "blocks.0.attn.qkv.weight")
    assert u.indices.numel() == 2 * 3 * 192


def test_k_errors():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=5)
    with pytest.raises(ValueError, match=r"K=10 is larger than a row of blocks\.0\.0\.conv_dw\.weight \(32 x 9\)"):
        make_plan(model, _scores(model), "gps", K=10)
    with pytest.raises(ValueError, match="K must be an integer"):
        make_plan(model, _scores(model), "gps", K=0)
    with pytest.raises(ValueError, match=r"takes no budget \(its size is fixed by its options: K, head"):
        make_plan(model, _scores(model), "gps", "0.1M")
    with pytest.raises(ValueError, match="needs scores"):
        make_plan(model, None, "gps")


def test_topk_sparse_is_global_top_k():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=5)
    scores = _scores(model)
    plan = make_plan(model, scores, "topk-sparse", 1000)
    assert plan.num_trainable(False) == 1000 and all(u.mode in ("sparse", "head") for u in plan.units)
    infos = [i for i in tunable_tensors(model) if i.kind in ("matrix", "vector")]
    cutoff = torch.cat([scores[i.name].abs().reshape(-1) for i in infos]).sort(descending=True).values[999]
    for u in plan.units:
        if u.mode == "sparse":
            assert torch.all(scores[u.target].abs().reshape(-1)[u.indices] >= cutoff)
