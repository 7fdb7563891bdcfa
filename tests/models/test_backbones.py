"""create_backbone by name, data_config, weights_fingerprint, list_backbones and the CLI."""
import copy
import hashlib
import json

import pytest
import torch
from torch import nn

from sensitune.cli import main
from sensitune.models import (
    WeightsUnavailableError,
    create_backbone,
    data_config,
    list_backbones,
    weights_fingerprint,
)
from sensitune.state import source_of

VIT = "vit_tiny_patch16_224"
SMALL = dict(img_size=32, depth=2)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError) as err:
        create_backbone("vit_tiny_patch16_22", 3, pretrained="none")
    assert "vit_tiny_patch16_224" in str(err.value)
    with pytest.raises(ValueError, match="unknown model name 'qqqq'"):
        create_backbone("qqqq", 3, pretrained="none")


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone(VIT, 0, pretrained="none", **SMALL)
    with pytest.raises(ValueError, match="pretrained must be"):
        create_backbone(VIT, 3, pretrained="imagenet", **SMALL)


def test_timm_download_failure_is_a_clear_error(monkeypatch):
    # tests run with HF_HUB_OFFLINE=1 (conftest): timm's download cannot succeed
    with pytest.raises(WeightsUnavailableError) as err:
        create_backbone(VIT, 3, **SMALL)
    assert "pretrained='none'" in str(err.value) and VIT in str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # the CLI prints it without a traceback


def test_random_init_and_options():
    model = create_backbone(VIT, 5, pretrained="none", drop_path_rate=0.1, **SMALL)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    assert source_of(model) == {"name": VIT, "requested": VIT, "pretrained": "none", "num_classes": 5,
                                "head": "fresh", "head_module": "head"}
    cfg = data_config(model)
    assert cfg == {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                   "interpolation": "bicubic", "crop_pct": 0.9}
    assert data_config(model, img_size=48)["input_size"] == (3, 48, 48)
    with pytest.raises(ValueError, match="mean needs 3 values"):
        data_config(model, mean=(0.5,))


def test_cnn_img_size_only_changes_preprocessing():
    model = create_backbone("resnet18", 4, pretrained="none", img_size=64)
    assert data_config(model)["input_size"] == (3, 64, 64)
    assert data_config(model)["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_fingerprint_tracks_backbone_weights_not_head():
    model = create_backbone(VIT, 5, pretrained="none", **SMALL)
    base = weights_fingerprint(model)
    assert len(base) == 64 and base == weights_fingerprint(copy.deepcopy(model))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.weight.add_(1.0)
    assert weights_fingerprint(other) == base
    assert weights_fingerprint(other, exclude_head=False) != weights_fingerprint(model, exclude_head=False)
    with torch.no_grad():
        other.blocks[1].mlp.fc2.weight[3, 7] += 1e-3  # one element of one weight
    assert weights_fingerprint(other) != base


def test_fingerprint_matches_its_definition():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    expected = hashlib.sha256()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name in sorted(tensors):
        if name.startswith("2."):  # the last Linear is the head
            continue
        t = tensors[name].detach()
        expected.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        expected.update(t.numpy().tobytes())
    assert weights_fingerprint(model) == expected.hexdigest()


def test_list_backbones_reports_installed_lite_models():
    rows = {r["name"]: r for r in list_backbones()}
    assert set(rows) == {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"}
    assert rows["tf_efficientnet_lite0"]["params"] == 4_652_008  # 4.65M per assets.md
    assert rows["tf_efficientnet_lite1"]["input_size"] == (3, 240, 240)
    assert rows["tf_efficientnet_lite2"]["input_size"] == (3, 260, 260)


def test_cli_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tf_efficientnet_lite0" in out and "4.65M" in out and "224x224" in out
    assert "pretrained='none'" in out
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data["ready_offline"]][0] == "tf_efficientnet_lite0"
