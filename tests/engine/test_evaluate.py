"""Evaluation against a hand-made classifier whose predictions are known in advance."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sensitune.engine.evaluation import confusion_matrix, evaluate_model, mean_class_accuracy


class Lookup(nn.Module):
    """Predicts the class stored in the first pixel: inputs carry the intended prediction."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), self.num_classes).float() * 5 * self.scale


def test_accuracy_per_class_and_confusion_by_hand(tmp_path):
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    preds = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 2, 0])
    x = torch.zeros(10, 1, 2, 2)
    x[:, 0, 0, 0] = preds.float()
    data = TensorDataset(x, labels)
    model = Lookup(4)  # a 4th class with no samples
    model.train()
    res = evaluate_model(model, data, batch_size=3, class_names=["a", "b", "c", "d"], out=tmp_path, prefix="test_")
    assert model.training  # mode restored
    assert res["num_samples"] == 10
    assert res["accuracy"] == pytest.approx(70.0)
    assert res["per_class_accuracy"] == pytest.approx({"a": 75.0, "b": 50.0, "c": 75.0, "d": None})
    assert res["confusion_matrix"] == [[3, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    assert mean_class_accuracy(res) == pytest.approx((75 + 50 + 75) / 3)
    logits = model(x)
    assert res["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    rows = list(csv.reader((tmp_path / "test_confusion.csv").open()))
    assert rows[0] == ["true\\predicted", "a", "b", "c", "d"]
    assert rows[3] == ["c", "1", "0", "3", "0"]
    assert (tmp_path / "test_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confusion_matrix_counts():
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]), 2)
    assert cm.tolist() == [[1, 0], [1, 1]]
    assert cm.sum() == 3


def test_hugging_face_style_outputs_and_empty_data():
    class HF(nn.Module):
        def forward(self, x):
            return type("Out", (), {"logits": torch.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1)})()

    data = TensorDataset(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1), torch.tensor([0, 1]))
    assert evaluate_model(HF(), data, device="cpu")["accuracy"] == 100.0
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(HF(), TensorDataset(torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.long)), device="cpu")


def test_predictions_file_matches_the_confusion_matrix(tmp_path):
    from engine_helpers import TinyTask
    from sensitune.engine.evaluation import evaluate_model, read_predictions
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    res = evaluate_model(model, TinyTask(12), batch_size=5, out=tmp_path, prefix="eval_x_")
    labels, preds = read_predictions(tmp_path / "eval_x_predictions.csv")
    assert labels == [int(TinyTask(12)[i][1]) for i in range(12)]
    cm = [[0] * 3 for _ in range(3)]
    for y, p in zip(labels, preds):
        cm[y][p] += 1
    assert cm == res["confusion_matrix"]
    assert res["accuracy"] == pytest.approx(100 * sum(y == p for y, p in zip(labels, preds)) / 12)
