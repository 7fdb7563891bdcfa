"""GPS gradient scores (spec gps.md §2): |Σ_batches ∂L_b/∂w| over one pass of the training split.

L_b is the supervised contrastive loss (SupCon, temperature 0.07, "all" contrast mode) on the
L2-normalised backbone feature of two augmented views of every image; the classification head
is not used, so the scores do not depend on a random head. ``loss="ce"`` uses the mean
cross-entropy through the head on the dataset's own images instead (the reference's fallback).

Where the two views come from. The augmentations (RandomResizedCrop 0.08-1, flip,
ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2) must see the *raw* image, not the
already normalised tensor. The mechanism: a ``view_transform`` (PIL image -> tensor; by default
:func:`gps_view_transform` built from the model's data config) is applied twice to the raw image
of each sample, read with ``dataset.load_image(i)`` when the dataset has it (a
:class:`sensitune.data.TaskDataset`; its own ``transform`` is bypassed, never mutated), else
taken from ``dataset[i][0]`` (a dataset yielding PIL images, or whatever a user's own
``view_transform`` accepts). Each view is drawn under a seed derived from (seed, sample index,
view), so views are reproducible and identical whatever the batch split or process count.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sensitune.models import find_head
from sensitune.scoring import common
from sensitune.scoring.scoremap import ScoreMap
from sensitune.scoring.registry import Scorer, register
from sensitune.state import data_config_of

TEMPERATURE = 0.07


# --------------------------------------------------------------------------- loss
def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = TEMPERATURE,
                base_temperature: float | None = None) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), "all" contrast mode.

    ``features``: (B, V, D) L2-normalised features of V views of B samples; ``labels``: (B,).
    Every one of the B·V views is an anchor; its positives are the other views with the same
    label; the denominator runs over all other views:
        L = mean_i  -(T/T_base) · 1/|P(i)| · Σ_{p∈P(i)} log( exp(z_i·z_p/T) / Σ_{a≠i} exp(z_i·z_a/T) )
    ``base_temperature`` defaults to ``temperature`` (scale 1). Anchors without a positive
    (possible only with one view) are left out of the mean.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (batch, views, dim), got shape {tuple(features.shape)}")
    b, v, _ = features.shape
    if labels.shape != (b,):
        raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
    z = features.transpose(0, 1).reshape(b * v, -1)  # view-major: all first views, then all second views
    lab = labels.repeat(v)
    eye = torch.eye(b * v, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (lab[:, None] == lab[None, :]) & ~eye
    n_pos = positives.sum(1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        raise ValueError("supcon_loss: no anchor has a positive (one view per sample and all labels distinct)")
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0.0).sum(1)[has_pos] / n_pos[has_pos]
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    return -scale * mean_log_prob_pos.mean()


# --------------------------------------------------------------------------- features and views
def backbone_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised pre-logits feature (for a ViT: the CLS token after the final norm).

    timm models: ``forward_head(forward_features(x), pre_logits=True)``. Other models: the
    input of the head module (:func:`sensitune.models.find_head`) captured by a forward
    pre-hook during a normal forward pass.
    """
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    else:
        head_name = find_head(model)
        if head_name is None:
            raise ValueError(f"cannot find the feature of {type(model).__name__}: it has no forward_features/"
                             f"forward_head (timm) and no head module whose input could be taken")
        head = model.get_submodule(head_name)
        captured: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            model(x)
        finally:
            handle.remove()
        if not captured:
            raise ValueError(f"the head {head_name!r} of {type(model).__name__} was not called in forward")
        feats = captured[0]
    feats = feats.flatten(1)
    return F.normalize(feats.to(torch.promote_types(feats.dtype, torch.float32)), dim=1)


def gps_view_transform(data_config: dict) -> Callable:
    """The GPS augmentation of one view (PIL image -> normalised tensor at the model's input size)."""
    from torchvision import transforms as T

    size = tuple(data_config["input_size"][-2:])
    interpolation = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                     "nearest": T.InterpolationMode.NEAREST}.get(data_config.get("interpolation", "bicubic"),
                                                                   T.InterpolationMode.BICUBIC)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interpolation),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(data_config["mean"], data_config["std"]),
    ])


class TwoViews(Dataset):
    """``(stack of n_views views, label)`` of each sample, every view drawn under its own seed."""

    def __init__(self, dataset: Dataset, view_transform: Callable, seed: int = 0, n_views: int = 2):
        self.dataset = dataset
        self.view_transform = view_transform
        self.seed = seed
        self.n_views = n_views
        self._raw = getattr(dataset, "load_image", None)
        self._targets = getattr(dataset, "samples", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def raw(self, i: int) -> tuple[Any, int]:
        if callable(self._raw) and self._targets is not None:
            return self._raw(i), int(self._targets[i][1])
        image, label = self.dataset[i]
        return image, int(label)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.raw(i)
        views = []
        for v in range(self.n_views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(common.batch_seed(self.seed, 2 * i + v + 1))
                views.append(self.view_transform(image))
        if not isinstance(views[0], torch.Tensor):
            raise TypeError(f"view_transform must return a tensor, got {type(views[0]).__name__}")
        return torch.stack(views), label


def _default_views(model: nn.Module, dataset: Dataset) -> Callable:
    from PIL import Image

    raw_ok = callable(getattr(dataset, "load_image", None)) or (
        len(dataset) > 0 and isinstance(dataset[0][0], Image.Image))
    if not raw_ok:
        raise ValueError("GPS makes two augmented views of each raw image, but the dataset yields "
                         f"{type(dataset[0][0]).__name__} items and has no load_image(i). Pass a "
                         "sensitune TaskDataset, a dataset yielding PIL images, or view_transform=<callable "
                         "turning one of your items into an augmented, normalised tensor>.")
    from sensitune.models import data_config

    cfg = data_config(model)
    # A timm ViT built with img_size=... outside create_backbone still reports its pretrained
    # 224 px config; its patch embedding knows the size it actually accepts.
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if data_config_of(model) is None and fixed is not None:
        cfg = data_config(model, img_size=int(fixed[0]) if fixed[0] == fixed[-1] else None)
    return gps_view_transform(cfg)


# --------------------------------------------------------------------------- scorer
def gps_scores(model: nn.Module, data: Dataset | DataLoader, *, loss: str = "supcon", batch_size: int | None = None,
               batches: int | None = None, samples: int | None = None, temperature: float = TEMPERATURE,
               view_transform: Callable | None = None, kinds: Sequence[str] = common.DEFAULT_KINDS,
               include: str | None = None, exclude: str | None = None, train_mode: bool = True,
               batchnorm: str = "eval", seed: int = 0, num_workers: int | None = None,
               progress: bool = False) -> ScoreMap:
    """|gradient accumulated over batches| of SupCon (default) or mean CE (``loss="ce"``).

    One pass over the whole dataset by default (``batches``/``samples`` cap it).
    """
    if loss not in ("supcon", "ce"):
        raise ValueError(f"GPS loss must be 'supcon' or 'ce', got {loss!r}")
    source = common.as_source(data, batch_size, num_workers)
    plan = common.plan_batches(len(source.dataset), source.batch_size, batches, samples, "gps")
    named = common.scored_parameters(model, kinds, include, exclude)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    device = params[0].device
    dataset = None
    if loss == "supcon":
        views = view_transform or _default_views(model, source.dataset)
        dataset = TwoViews(source.dataset, views, seed=seed)
    acc = [torch.zeros_like(p, dtype=common.acc_dtype(p)) for p in params]
    rank, world = common.distributed()
    mine, loader = common.loader_for(source, plan, rank, world, dataset=dataset)
    loss_sum, seen = 0.0, 0

    with common.scoring_mode(model, params, train_mode=train_mode, batchnorm=batchnorm), \
            torch.random.fork_rng(devices=common.rng_devices(params)), \
            common.progress(len(mine), progress, "gps") as bar, \
            common.consuming_gradients(params, acc, torch.Tensor.add_):
        for b, (x, y) in zip(mine, loader):
            torch.manual_seed(common.batch_seed(seed, b))
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            if loss == "supcon":
                n, v = x.shape[:2]
                feats = backbone_features(model, x.flatten(0, 1)).view(n, v, -1)
                value = supcon_loss(feats, y, temperature)
            else:
                value = F.cross_entropy(model(x), y)
            common.check_connected(value, "gps")
            loss_sum += common.check_loss(value, b, "gps")
            torch.autograd.grad(value, params, allow_unused=True)  # the hooks add g (unused tensors add nothing)
            del value
            seen += len(y)
            bar.update(1)

    common.all_reduce_(acc)
    loss_sum, seen = common.reduce_stats([loss_sum, seen], device)
    common.check_finite(names, acc, "gps")
    for a in acc:
        a.abs_()
    meta = {"method": "gps", "samples": int(seen), "batches": len(plan), "batch_size": source.batch_size,
            "mean_loss": loss_sum / len(plan), "world_size": world,
            "options": {"loss": loss, "temperature": temperature, "views": 2 if loss == "supcon" else 0,
                        "view_transform": "default" if view_transform is None else repr(view_transform),
                        "kinds": [kinds] if isinstance(kinds, str) else list(kinds), "include": include,
                        "exclude": exclude, "train_mode": train_mode, "batchnorm": batchnorm, "seed": seed,
                        "batches": batches, "samples": samples}}
    return ScoreMap(dict(zip(names, acc)), meta)


register(Scorer("gps", gps_scores))
