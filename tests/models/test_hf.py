"""Hugging Face image classifiers as backbones (a tiny random ViT saved to a tmp dir)."""
import pytest
import torch

from sensitune.models import HFImageClassifier, create_backbone, data_config, find_head, tunable_tensors
from sensitune.state import source_of

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vit")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(folder)
    return folder, model


def test_forward_returns_logits_and_head_is_fresh(hf_dir):
    folder, original = hf_dir
    model = create_backbone(f"hf:{folder}", num_classes=5)
    assert isinstance(model, HFImageClassifier)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    assert find_head(model) == "hf.classifier"
    assert source_of(model)["head"] == "fresh" and source_of(model)["num_classes"] == 5
    ref = original.state_dict()
    for k, v in model.state_dict().items():
        assert k.startswith("hf.")
        if not k.startswith("hf.classifier."):
            assert torch.equal(v, ref[k[len("hf."):]]), k


def test_keep_head_reproduces_the_original(hf_dir):
    folder, original = hf_dir
    model = create_backbone(f"hf:{folder}", num_classes=None).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), original(pixel_values=x).logits, atol=1e-6)
    same_count = create_backbone(f"hf:{folder}", num_classes=3)
    assert not torch.equal(same_count.hf.classifier.weight, original.classifier.weight)


def test_tensor_kinds_are_sensible(hf_dir):
    folder, _ = hf_dir
    infos = {i.name: i for i in tunable_tensors(create_backbone(f"hf:{folder}", num_classes=4))}
    kinds = {}
    for name, info in infos.items():
        kinds.setdefault(info.kind, []).append(name)
    assert sorted(kinds["head"]) == ["hf.classifier.bias", "hf.classifier.weight"]
    assert all("embeddings" in n for n in kinds["embedding"])
    assert {"hf.vit.embeddings.cls_token", "hf.vit.embeddings.position_embeddings"} <= set(kinds["embedding"])
    # attention projections and MLP layers are matrices: 4 attention + 2 MLP per layer, 2 layers
    assert len(kinds["matrix"]) == 12
    assert all(infos[n].layer == "linear" and infos[n].block.endswith(("0", "1")) for n in kinds["matrix"])
    norms = [n for n in infos if "layernorm" in n]
    assert norms and all(infos[n].kind == "vector" and infos[n].layer == "norm" for n in norms)
    assert not kinds.get("other")


def test_data_config_and_errors(hf_dir, tmp_path):
    folder, _ = hf_dir
    model = create_backbone(f"hf:{folder}", num_classes=4, img_size=32)
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        create_backbone(f"hf:{tmp_path / 'no_such_dir'}", num_classes=4)
    with pytest.raises(ValueError, match="pretrained must be 'auto'"):
        create_backbone(f"hf:{folder}", num_classes=4, pretrained="none")


def test_config_overrides_reach_the_model_and_timm_options_are_refused(hf_dir):
    folder, _ = hf_dir
    model = create_backbone(f"hf:{folder}", num_classes=4, hidden_dropout_prob=0.25)
    assert model.hf.config.hidden_dropout_prob == 0.25
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_backbone(f"hf:{folder}", num_classes=4, drop_path_rate=0.1)
