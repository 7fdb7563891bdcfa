"""Evaluation: top-1 accuracy, per-class accuracy and the confusion matrix (CSV + PNG)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sensitune.io import atomic_write_bytes, atomic_write_text
from sensitune.models import kept_training_flags


def logits_of(output: Any) -> torch.Tensor:
    """The class scores of a model output: a tensor, a Hugging Face output or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read class scores from a model output of type {type(output).__name__}")


def autocast_context(device: torch.device, precision: str):
    """Autocast for ``bf16`` / ``fp16``; a disabled context for ``fp32``."""
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C counts; rows are true classes, columns predictions."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    num_workers: int = 0,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    out: str | Path | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Run ``model`` over ``data`` (items ``(image, label)``) in eval mode and score it.

    Returns ``accuracy`` (top-1, percent), ``loss`` (mean cross-entropy), ``num_samples``,
    ``per_class_accuracy`` (class name -> percent, None for a class without samples) and the
    ``confusion_matrix``. With ``out``, writes ``{prefix}confusion.csv``, ``{prefix}confusion.png``
    and ``{prefix}predictions.csv`` (index, label, prediction per sample, in dataset order: what a
    paired comparison or a bootstrap of the evaluation images needs).
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    num_classes = num_classes or getattr(data, "num_classes", None)
    all_labels, all_preds = [], []
    loss_sum = 0.0
    with kept_training_flags(model):  # restored per module (frozen norms stay in eval)
        model.eval()
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast_context(device, precision):
                logits = logits_of(model(images))
            logits = logits.float()
            if num_classes is None:
                num_classes = logits.shape[1]
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            all_labels.append(labels.cpu())
            all_preds.append(logits.argmax(1).cpu())
    if not all_labels:
        raise ValueError("evaluation data is empty")
    labels = torch.cat(all_labels)
    preds = torch.cat(all_preds)
    n = labels.numel()
    cm = confusion_matrix(labels, preds, int(num_classes))
    names = list(class_names) if class_names is not None else list(getattr(data, "class_names", None) or [])
    if len(names) != cm.shape[0]:
        names = [str(i) for i in range(cm.shape[0])]
    row = cm.sum(1)
    per_class = {
        name: (None if row[i] == 0 else 100.0 * cm[i, i].item() / row[i].item()) for i, name in enumerate(names)
    }
    result = {
        "accuracy": 100.0 * (preds == labels).sum().item() / n,
        "loss": loss_sum / n,
        "num_samples": n,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }
    if out is not None:
        write_confusion(cm, names, Path(out), prefix)
        write_predictions(labels, preds, Path(out) / f"{prefix}predictions.csv")
    return result


def write_predictions(labels: torch.Tensor, preds: torch.Tensor, path: Path) -> None:
    rows = "".join(f"{i},{y},{p}\n" for i, (y, p) in enumerate(zip(labels.tolist(), preds.tolist())))
    atomic_write_text(path, "index,label,prediction\n" + rows)


def read_predictions(path: str | Path) -> tuple[list[int], list[int]]:
    """(labels, predictions) of a ``predictions.csv`` written by :func:`evaluate_model`."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [int(r["label"]) for r in rows], [int(r["prediction"]) for r in rows]


def write_confusion(cm: torch.Tensor, names: Sequence[str], out: Path, prefix: str = "") -> None:
    """``{prefix}confusion.csv`` (true class per row) and a ``{prefix}confusion.png`` heat map."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true\\predicted", *names])
    for name, counts in zip(names, cm.tolist()):
        writer.writerow([name, *counts])
    atomic_write_text(out / f"{prefix}confusion.csv", buf.getvalue())

    # Figure + Agg canvas directly: no global matplotlib backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(names)
    size = min(16.0, max(4.0, 0.35 * c + 2))
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = cm.sum(1, keepdim=True).clamp(min=1)
    ax.imshow((cm / rows).numpy(), cmap="Blues", vmin=0, vmax=1)
    if c <= 40:
        ax.set_xticks(range(c), labels=names, rotation=90, fontsize=7)
        ax.set_yticks(range(c), labels=names, fontsize=7)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                v = int(cm[i, j])
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] / rows[i, 0] > 0.5 else "black")
    acc = 100.0 * cm.diag().sum().item() / max(1, cm.sum().item())
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion (row-normalised), top-1 {acc:.1f}%")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    atomic_write_bytes(out / f"{prefix}confusion.png", png.getvalue())


def mean_class_accuracy(result: dict[str, Any]) -> float:
    """Mean of the per-class accuracies over classes that have samples."""
    vals = [v for v in result["per_class_accuracy"].values() if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
