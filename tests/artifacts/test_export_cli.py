"""`sensitune export` (delta / peft / merged) and `sensitune predict` end to end.

The PEFT export is loaded with the real ``peft`` package onto a fresh timm model; the base is
rebuilt by name from a checkpoint file written here (as a user's own weights would be).
"""
import copy

import pytest
import timm
import torch
from safetensors.torch import save_file

from sensitune.artifacts import load_delta, read_delta, save_delta
from sensitune.artifacts.export import load_merged
from sensitune.cli import main
from sensitune.models import create_backbone, data_config

from .helpers import make_plan, trained, units_for

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    base = timm.create_model(NAME, img_size=32, num_classes=5, pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return path


def _base(checkpoint):
    return create_backbone(NAME, 5, pretrained=str(checkpoint), img_size=32).eval()


def _run(checkpoint, root, kind):
    base = _base(checkpoint)
    model = trained(base, make_plan(base, units_for(kind, base), method=kind))
    save_delta(model, root / "delta", meta={"class_names": ["ant", "bee", "cat", "dog", "eel"],
                                           "data_config": data_config(model)})
    return model


def _plain_timm(checkpoint):
    from safetensors.torch import load_file

    m = timm.create_model(NAME, img_size=32, num_classes=5, pretrained=False)
    m.load_state_dict(load_file(str(checkpoint)))
    return m.eval()


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", ["lora", "bilora1"])
def test_peft_export_loads_in_peft_with_the_same_logits(tmp_path, checkpoint, kind, capsys):
    peft = pytest.importorskip("peft")
    model = _run(checkpoint, tmp_path, kind)
    assert main(["export", "--run", str(tmp_path), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert "minimum" in out and "on disk" in out  # the storage report is printed
    loaded = peft.PeftModel.from_pretrained(_plain_timm(checkpoint), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), atol=1e-5, rtol=0)


def test_peft_refuses_sparse_units_unless_partial(tmp_path, checkpoint, capsys):
    peft = pytest.importorskip("peft")
    model = _run(checkpoint, tmp_path, "spt")
    assert main(["export", "--run", str(tmp_path), "--format", "peft", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "PEFT cannot express" in err and "sparse:blocks.1.mlp.fc1.weight" in err and "--partial" in err
    assert not (tmp_path / "p").exists()
    assert main(["export", "--run", str(tmp_path), "--format", "peft", "--out", str(tmp_path / "p"), "--partial"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "sparse entries" in err
    # the exported part is exact: equal to our model with the left-out units removed by hand
    loaded = peft.PeftModel.from_pretrained(_plain_timm(checkpoint), str(tmp_path / "p")).eval()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if "weight_delta" in m._parameters:
                m.weight_delta.zero_()
        ref.pos_embed_delta.zero_()  # the whole fc2 bias, the LoRA and the head are exported
        torch.testing.assert_close(loaded(X), ref(X), atol=1e-5, rtol=0)


def test_merged_and_delta_exports(tmp_path, checkpoint):
    model = _run(checkpoint, tmp_path, "spt")
    assert main(["export", "--run", str(tmp_path), "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    plain = load_merged(tmp_path / "m")
    assert type(plain) is timm.models.vision_transformer.VisionTransformer
    assert main(["export", "--run", str(tmp_path), "--format", "delta", "--out", str(tmp_path / "d")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(plain(X), model(X), atol=1e-5, rtol=0)
        # the exported delta, rebuilt from its recorded backbone (name + checkpoint path)
        assert torch.equal(load_delta(None, tmp_path / "d").eval()(X), model(X))
    assert read_delta(tmp_path / "d").meta["backbone"]["pretrained"] == str(checkpoint.resolve())


def test_peft_needs_a_lora_unit(tmp_path, checkpoint, capsys):
    _run(checkpoint, tmp_path, "bitfit")
    assert main(["export", "--run", str(tmp_path), "--format", "peft", "--out", str(tmp_path / "p")]) == 2
    assert "no LoRA unit" in capsys.readouterr().err


def test_merged_refused_for_adapters(tmp_path, checkpoint, capsys):
    _run(checkpoint, tmp_path, "adapter")
    assert main(["export", "--run", str(tmp_path), "--format", "merged", "--out", str(tmp_path / "m")]) == 2
    assert "non-linear" in capsys.readouterr().err


def test_export_bad_input(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nope"), "--format", "delta", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_real_lite0_on_a_real_photo(tmp_path, capsys):
    """Real ImageNet EfficientNet-Lite0 with its own head as a linear-probe delta: coffee -> espresso."""
    from PIL import Image
    from skimage import data as skdata
    from timm.data import ImageNetInfo

    from sensitune.planning.plan import Plan, Unit, model_shapes
    from sensitune.tuners import apply_plan

    base = create_backbone("efficientnet_lite0", None, pretrained="auto")  # keeps the ImageNet head
    s = model_shapes(base)
    plan = Plan("linear", [Unit("classifier.weight", "head", s["classifier.weight"]),
                           Unit("classifier.bias", "head", s["classifier.bias"])], s,
                head=["classifier.weight", "classifier.bias"])
    apply_plan(base, plan)
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]
    save_delta(base, tmp_path / "delta", meta={"class_names": names, "data_config": data_config(base)})
    Image.fromarray(skdata.coffee()).save(tmp_path / "coffee.jpg")
    assert main(["predict", "--delta", str(tmp_path / "delta"), str(tmp_path / "coffee.jpg"), "--json"]) == 0
    import json

    top = json.loads(capsys.readouterr().out.strip())["top"]
    assert len(top) == 5 and top[0]["class"] == "espresso" and top[0]["prob"] > 0.5
    assert all(a["prob"] >= b["prob"] for a, b in zip(top, top[1:])) and sum(t["prob"] for t in top) <= 1 + 1e-6
    assert main(["predict", "--delta", str(tmp_path / "delta"), str(tmp_path / "coffee.jpg")]) == 0
    assert "1. espresso" in capsys.readouterr().out
    assert main(["predict", "--delta", str(tmp_path / "delta"), str(tmp_path / "missing.jpg")]) == 2
    assert "image not found" in capsys.readouterr().err


def test_peft_carries_batchnorm_statistics_of_a_conv_model(tmp_path):
    """Lite0 LoRA on pointwise convs, BN statistics moved by training: PEFT gets them as
    modules_to_save (with every module its suffix match also catches), logits equal ours."""
    peft = pytest.importorskip("peft")
    from sensitune.artifacts.export import export
    from sensitune.planning import make_plan as plan_for

    from .helpers import lite0

    base = lite0()
    model = trained(base, plan_for(lite0(), None, "lora", rank=2, targets=r"blocks\.[12]\.\d+\.conv_pw"))
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    model.eval()
    save_delta(model, tmp_path / "d")
    result = export(tmp_path / "d", tmp_path / "p", "peft", base=lite0())
    assert result.left_out == []
    cfg = __import__("json").loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert "bn1" in cfg["modules_to_save"] and "classifier" in cfg["modules_to_save"]
    x = torch.randn(2, 3, 32, 32)
    loaded = peft.PeftModel.from_pretrained(lite0(), str(tmp_path / "p")).eval()
    with torch.no_grad():  # PEFT runs the LoRA unmerged, as we do: same operations
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)
