"""Training configuration: defaults, named recipes, YAML files and overrides, validation.

A run's settings come from four layers, later ones winning:
``TrainConfig`` defaults (small-CPU friendly) <- the method's defaults <- a config file
(YAML, or a built-in recipe name such as ``paper``) <- explicit overrides (CLI flags or
``train(**overrides)``). Every key is checked: an unknown key or a wrong type is an error that
names the key and where it came from, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

PRECISIONS = ("fp32", "bf16", "fp16")
PROTOCOLS = ("val", "final")
#: how norm layers with running statistics (BatchNorm) normalise while training: "pretrained"
#: (their pretrained statistics, never updated), "batch" (batch statistics, running statistics
#: updated: the reference codes), "pretrained-if-frozen" (sensitune 0.1: pretrained only for a
#: layer none of whose parameters trains; kept so runs made under it resume under it)
NORM_STATS = ("pretrained", "batch", "pretrained-if-frozen")
#: the setting ``norm_stats`` replaced, and what each of its values meant
LEGACY_FROZEN_BN = {"eval": "pretrained-if-frozen", "train": "batch"}
HEAD_INITS = ("zero", "default")


@dataclass
class TrainConfig:
    """Every training setting; the defaults are sized for a 2-core CPU and the mini suite."""

    # optimisation (AdamW, cosine schedule with per-step warm-up from ``warmup_lr``)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4  # never applied to 1-D tensors (biases, norms, sparse values)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    head_lr: float | None = None  # lr of the classification head (None = ``lr``); warm-up and cosine apply alike
    # "zero": a freshly made head (model built from a name) starts at 0 weight and bias, so the
    # first steps see the uniform-prediction loss log(C) instead of a random head's larger loss
    # and the backbone's first gradients are not driven by a random head (as BiT does);
    # "default": the model library's own initialisation (timm), as the papers' recipes
    head_init: str = "zero"
    # Norm layers with running statistics (BatchNorm), independent of what the plan trains:
    # "pretrained" keeps every such layer in eval mode during training — it normalises with its
    # pretrained statistics and never updates them, whether its affine parameters train whole,
    # as sparse entries or not at all — so the statistics a trained model meets at evaluation are
    # the ones it trained with, and a delta needs no statistics; "batch" normalises with the
    # statistics of each batch and moves the running statistics (the papers' reference codes).
    # Scoring uses the same mode. (``NORM_STATS`` lists a third value kept for old runs.)
    norm_stats: str = "pretrained"
    label_smoothing: float = 0.0
    drop_path: float = 0.0
    augment: str | None = None  # passed to sensitune.data.build_transform (None = no augmentation)
    drop_last: bool = True
    # model and data
    pretrained: str = "auto"
    img_size: int | None = None
    data_root: str | None = None
    protocol: str = "val"  # "val": train800 -> val200; "final": train800val200 -> test
    train_split: str | None = None  # None = from protocol
    eval_split: str | None = None  # None = from protocol
    # scoring / planning options forwarded to the stages
    score_batches: int | None = None
    score_batch_size: int | None = None
    # runtime
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    num_workers: int = 0
    eval_batch_size: int | None = None
    eval_every: int = 0  # evaluate on the eval split every N epochs during training (0 = only at the end)
    checkpoint_every: int = 0  # extra mid-epoch checkpoint every N optimizer steps (0 = per epoch only)
    deterministic: bool = True
    progress: bool = True
    tensorboard: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)  # options of the method's planner (plan.*)
    # options of the method's scorer (score.*), over the method's own; left out of to_dict() while
    # empty, so run and bench folders made before the setting existed compare equal
    score_options: dict[str, Any] = field(default_factory=dict)

    # -- derived values -------------------------------------------------------------------
    def splits(self) -> tuple[str, str]:
        """(train split, evaluation split) for the protocol; explicit splits win."""
        train, ev = ("train800", "val200") if self.protocol == "val" else ("train800val200", "test")
        return self.train_split or train, self.eval_split or ev

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        if not d["score_options"]:
            del d["score_options"]
        return d

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad setting."""
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ValueError(f"config: {key}={getattr(self, key)!r} is invalid: {what}")

        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        need(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        need(self.warmup_lr >= 0 and self.min_lr >= 0, "min_lr", "warmup_lr and min_lr must be >= 0")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")
        need(self.precision in PRECISIONS, "precision", f"choose one of {PRECISIONS}")
        need(self.protocol in PROTOCOLS, "protocol", f"choose one of {PROTOCOLS}")
        need(self.norm_stats in NORM_STATS, "norm_stats", f"choose one of {NORM_STATS}")
        need(self.head_init in HEAD_INITS, "head_init", f"choose one of {HEAD_INITS}")
        need(self.head_lr is None or (self.head_lr > 0 and math.isfinite(self.head_lr)), "head_lr",
             "must be a positive number or null")
        need(self.num_workers >= 0, "num_workers", "must be >= 0")
        need(self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every", "must be >= 0")
        need(self.img_size is None or self.img_size >= 8, "img_size", "must be >= 8 pixels")
        need(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        return self


#: Built-in recipes usable as ``--config NAME``.
RECIPES: dict[str, dict[str, Any]] = {
    # the papers' VTAB-1k recipe (SPT / low-bit adapters): 100 epochs, 10 warm-up, batch 64
    # (the head at the method's lr from the library's initialisation)
    "paper": dict(epochs=100, warmup_epochs=10, batch_size=64, warmup_lr=1e-6, min_lr=1e-5,
                  drop_path=0.1, weight_decay=1e-4, head_lr=None, head_init="default"),
    # the embedded mini suite on a 2-core CPU
    "mini": dict(epochs=10, warmup_epochs=1, batch_size=64, img_size=64),
}

_FIELDS = {f.name: f for f in fields(TrainConfig)}
#: settings that are mappings of a stage's options, merged layer over layer
MAPPING_KEYS = ("method_options", "score_options")


def config_keys() -> set[str]:
    """The names of every training setting (what a bare or ``train.`` option can be), including
    the replaced ones still read (``frozen_bn``)."""
    return set(_FIELDS) | set(LEGACY_KEYS)


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check/convert ``value`` to the type of field ``key``; error names the key and its source."""
    default = _FIELDS[key].default
    if default is dataclasses.MISSING:
        default = _FIELDS[key].default_factory()  # type: ignore[misc]
    type_name = str(_FIELDS[key].type)
    optional = "None" in type_name
    if value is None:
        if optional:
            return None
        raise ValueError(f"{source}: {key} cannot be null")
    try:
        if key == "betas":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise TypeError
            return (float(value[0]), float(value[1]))
        if key in MAPPING_KEYS:
            if not isinstance(value, Mapping):
                raise TypeError
            return dict(value)
        if type_name.startswith("bool") or isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise TypeError
        if type_name.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if type_name.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if type_name.startswith("str"):
            if not isinstance(value, (str, Path)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key}={value!r} has the wrong type (expected {type_name})") from None
    return value


def coerce_values(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` (known keys) converted to their settings' types; a wrong type raises naming the key."""
    return {key: _coerce(key, value, source) for key, value in values.items()}


#: settings of earlier versions that are still read, translated to what replaced them
LEGACY_KEYS = ("frozen_bn",)


def translate_legacy_keys(values: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """``frozen_bn`` (sensitune 0.1) becomes the ``norm_stats`` value with the same behaviour."""
    if "frozen_bn" not in values:
        return values
    values = dict(values)
    old = values.pop("frozen_bn")
    if old not in LEGACY_FROZEN_BN:
        raise ValueError(f"{source}: frozen_bn={old!r} is invalid (frozen_bn is replaced by norm_stats: "
                         f"choose one of {NORM_STATS})")
    if "norm_stats" in values and values["norm_stats"] != LEGACY_FROZEN_BN[old]:
        raise ValueError(f"{source}: frozen_bn={old!r} and norm_stats={values['norm_stats']!r} contradict "
                         f"each other; drop frozen_bn (replaced by norm_stats)")
    warnings.warn(f"{source}: frozen_bn is replaced by norm_stats; frozen_bn={old!r} is read as "
                  f"norm_stats={LEGACY_FROZEN_BN[old]!r}", DeprecationWarning, stacklevel=3)
    values["norm_stats"] = LEGACY_FROZEN_BN[old]
    return values


def check_keys(values: Mapping[str, Any], source: str) -> None:
    """Refuse keys that are not settings, suggesting the closest real one."""
    for key in values:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{source}: unknown config key {key!r}{hint}; known keys: {', '.join(sorted(_FIELDS))}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings, or a built-in recipe name (``paper``, ``mini``)."""
    if isinstance(path, str) and path in RECIPES:
        return dict(RECIPES[path])
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist (built-in recipes: {', '.join(RECIPES)})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {p}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {p}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return dict(data)


def build_config(
    method_defaults: Mapping[str, Any] | None = None,
    config: str | Path | Mapping[str, Any] | TrainConfig | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Merge defaults <- method defaults <- config file/mapping <- overrides and validate.

    Overrides whose value is None are ignored (an absent CLI flag), so they never erase a
    value from the file.
    """
    values: dict[str, Any] = {}
    layers: list[tuple[str, Mapping[str, Any]]] = [("method defaults", method_defaults or {})]
    if isinstance(config, TrainConfig):
        layers.append(("config", config.to_dict()))
    elif isinstance(config, Mapping):
        layers.append(("config", config))
    elif config is not None:
        layers.append((f"config file {config}", read_config_file(config)))
    layers.append(("overrides", {k: v for k, v in (overrides or {}).items() if v is not None}))
    for source, layer in layers:
        layer = translate_legacy_keys(layer, source)
        check_keys(layer, source)
        for key, value in layer.items():
            value = _coerce(key, value, source)
            if key in MAPPING_KEYS:  # a later layer adds to (and overrides) an earlier one's options
                value = {**values.get(key, {}), **value}
            values[key] = value
    return TrainConfig(**values).validate()
