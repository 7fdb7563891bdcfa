"""Score files and heat maps are written atomically: a failed write keeps the old file and leaves no temporary."""
from __future__ import annotations

import pytest
import torch

import safetensors.torch
from sensitune.scoring import ScoreMap, placement
from sensitune.scoring.heatmap import plot


def test_a_failed_score_save_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "scores.safetensors"
    ScoreMap({"w": torch.ones(2, 3)}, {"method": "magnitude"}).save(path)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):  # a write that dies halfway through its file
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        ScoreMap({"w": torch.zeros(2, 3)}, {"method": "random"}).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["scores.safetensors"]
    monkeypatch.undo()
    again = ScoreMap.load(path)
    assert again.meta["method"] == "magnitude" and torch.equal(again["w"], torch.ones(2, 3))


def test_a_heat_map_lands_whole_in_a_new_folder(tmp_path):
    scores = {"blocks.0.attn.qkv.weight": torch.rand(6, 2), "blocks.1.mlp.fc1.weight": torch.rand(4, 2)}
    out = plot(placement(scores, k=5), tmp_path / "figs" / "where.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["where.png"]
