"""GPS: SupCon against its formula written as loops, accumulation against independent sums."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sensitune.scoring import backbone_features, score, supcon_loss

from .helpers import tensor_data, tiny_effnet, tiny_vit


def supcon_by_loops(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Khosla et al. eq. 2 literally: anchors i over all B·V views, P(i) same label, A(i) all others."""
    b, v, _ = features.shape
    views = [(features[s, k], int(labels[s])) for k in range(v) for s in range(b)]
    total, anchors = 0.0, 0
    for i, (zi, yi) in enumerate(views):
        denom = sum(math.exp(float(zi @ za) / temperature) for a, (za, _) in enumerate(views) if a != i)
        positives = [p for p, (_, yp) in enumerate(views) if p != i and yp == yi]
        if not positives:
            continue
        total += -sum(math.log(math.exp(float(zi @ views[p][0]) / temperature) / denom) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


@pytest.mark.parametrize("views,temperature", [(2, 0.07), (3, 0.5), (1, 0.2)])
def test_supcon_matches_the_formula_written_as_loops(views, temperature):
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(5, views, 4, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, 1])  # with one view, the label-2 sample has no positive
    got = supcon_loss(feats, labels, temperature)
    assert got.item() == pytest.approx(supcon_by_loops(feats, labels, temperature), rel=1e-9)


def test_supcon_base_temperature_scales_and_bad_shapes_are_refused():
    feats = F.normalize(torch.randn(4, 2, 3), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    assert supcon_loss(feats, labels, 0.1, base_temperature=0.05).item() == pytest.approx(
        2 * supcon_loss(feats, labels, 0.1).item(), rel=1e-6)
    with pytest.raises(ValueError, match="batch, views, dim"):
        supcon_loss(feats[:, 0], labels)
    with pytest.raises(ValueError, match="no anchor has a positive"):
        supcon_loss(feats[:, :1], torch.arange(4))


def test_gps_ce_accumulated_over_batches_is_the_big_batch_gradient_scaled():
    """Σ_k ∇mean_k over equal batches of size b = (1/b) Σ_i ∇ℓ_i = (N/b) ∇mean over all N.

    BN in eval mode makes each sample's gradient independent of its batch, so this holds for
    a BatchNorm model too; dropout is seeded per batch, so it is switched off (train_mode=False).
    """
    model, data = tiny_effnet().double(), tensor_data(12)  # float64: the identity, not rounding, is tested
    data.tensors = (data.tensors[0].double(), data.tensors[1])
    small = score(model, data, "gps", loss="ce", batch_size=4, train_mode=False)
    big = score(model, data, "gps", loss="ce", batch_size=12, train_mode=False)
    assert small.meta["batches"] == 3 and big.meta["batches"] == 1
    for n in small:
        torch.testing.assert_close(small[n], 3 * big[n], rtol=1e-5, atol=1e-12)


def _manual_gps_supcon(model, data, batch_size):
    """|Σ_batches ∇ SupCon| with identical views (a deterministic view transform), by hand."""
    params = dict(model.named_parameters())
    names = [n for n in params if not n.startswith(("head.", "cls_token", "pos_embed", "patch_embed."))]
    model.train()
    model.zero_grad()
    n = len(data)
    for s in range(0, n, batch_size):
        x, y = data.tensors[0][s:s + batch_size], data.tensors[1][s:s + batch_size]
        f = F.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=1)
        supcon_loss(torch.stack([f, f], 1), y, 0.07).backward()  # .grad accumulates over batches
    out = {k: params[k].grad.abs().clone() for k in names}
    model.zero_grad(set_to_none=True)
    return out


def test_gps_supcon_accumulates_gradients_over_batches():
    model, data = tiny_vit().double(), tensor_data(12)  # float64: the accumulation, not rounding, is tested
    data.tensors = (data.tensors[0].double(), data.tensors[1])
    got = score(model, data, "gps", batch_size=4, view_transform=lambda x: x)
    expected = _manual_gps_supcon(model, data, 4)
    assert list(got) == list(expected) and got.meta["samples"] == 12
    for n in expected:
        torch.testing.assert_close(got[n], expected[n].float(), rtol=1e-5, atol=1e-12)
    # the head is not part of the SupCon graph, and its gradient is not asked for
    assert "head.weight" not in got


def test_backbone_features_fallback_hook_equals_timm_pre_logits():
    model = tiny_vit().eval()
    x = tensor_data(3).tensors[0]

    class Wrapped(torch.nn.Module):  # no forward_features/forward_head: the head-input hook is used
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    a = backbone_features(model, x)
    b = backbone_features(Wrapped(model), x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))


class RawImages(torch.utils.data.Dataset):
    """Like a TaskDataset: samples, load_image(i) and a transform that GPS must bypass."""

    def __init__(self, n=6):
        g = torch.Generator().manual_seed(0)
        self.images = [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
        self.samples = [(f"img{i}.png", i % 2) for i in range(n)]
        self.transform = self._forbidden

    @staticmethod
    def _forbidden(image):
        raise AssertionError("GPS must build its views from the raw image, not the dataset transform")

    def __len__(self):
        return len(self.samples)

    def load_image(self, i):
        return self.images[i]

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.samples[i][1]


def test_gps_default_views_from_raw_images_are_reproducible():
    model = tiny_vit()
    a = score(model, RawImages(), "gps", batch_size=3)
    b = score(model, RawImages(), "gps", batch_size=3)
    c = score(model, RawImages(), "gps", batch_size=3, seed=1)
    name = "blocks.0.mlp.fc1.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert a.meta["options"]["views"] == 2 and math.isfinite(a.meta["mean_loss"])


def test_gps_refuses_normalised_tensors_without_a_view_transform():
    with pytest.raises(ValueError, match="raw image"):
        score(tiny_vit(), tensor_data(4), "gps")
    with pytest.raises(ValueError, match="'supcon' or 'ce'"):
        score(tiny_vit(), tensor_data(4), "gps", loss="mse")
