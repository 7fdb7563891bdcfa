"""Hugging Face image classifiers as backbones: ``create_backbone("hf:<repo-or-dir>", ...)``.

The wrapper makes every stage see ``model(x) -> logits`` (a tensor, not a ModelOutput) and keeps
the HF parameter names under the stable prefix ``hf.`` (``hf.vit.encoder.layer.0...``), so
plans, scores and deltas written for one HF model name the same tensors everywhere.
transformers is an optional dependency.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sensitune.state import state_of

PREFIX = "hf:"


class HFImageClassifier(nn.Module):
    """``AutoModelForImageClassification`` whose forward returns the logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits

    def get_classifier(self) -> nn.Module:
        """The classification head (timm's method name, so ``find_head`` works unchanged)."""
        return self.hf.classifier

    @property
    def num_classes(self) -> int:
        return int(self.hf.config.num_labels)


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is installed in the dev env
        raise ImportError("Hugging Face backbones ('hf:...') need transformers: pip install transformers") from exc
    return transformers


def _data_config(source: str, config: Any, transformers: Any) -> dict:
    """Preprocessing from the repo's image processor, else the config's image size and 0.5 stats."""
    size = int(getattr(config, "image_size", 224))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # HF ViT image processors' defaults
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(source)
        mean = tuple(float(v) for v in getattr(proc, "image_mean", mean))
        std = tuple(float(v) for v in getattr(proc, "image_std", std))
        s = getattr(proc, "size", None) or {}
        size = int(s.get("height") or s.get("shortest_edge") or size) if isinstance(s, dict) else size
    except (OSError, ValueError):
        pass  # no preprocessor_config.json: keep the config-derived defaults
    return {"input_size": (3, size, size), "mean": mean, "std": std, "interpolation": "bilinear", "crop_pct": 1.0}


def create_hf(name: str, num_classes: int | None, **kwargs: Any) -> HFImageClassifier:
    """Load ``name`` (``hf:<repo-or-dir>``); ``num_classes`` None keeps its classifier, an int gives a fresh one."""
    source = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if not source:
        raise ValueError("Hugging Face backbone name is empty: use 'hf:<repo-id>' or 'hf:<local-dir>'")
    transformers = _transformers()
    options: dict[str, Any] = dict(kwargs)
    if num_classes is not None:
        options.update(num_labels=num_classes, ignore_mismatched_sizes=True)
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(source, **options)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load Hugging Face model {source!r}: {str(exc).splitlines()[0]} "
                                f"(no internet? pass a local directory: 'hf:/path/to/model')") from exc
    wrapper = HFImageClassifier(model)
    if num_classes is not None:  # fresh head even when the class count happened to match
        head = wrapper.get_classifier()
        for m in head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    state_of(wrapper).data_config = _data_config(source, model.config, transformers)
    return wrapper
