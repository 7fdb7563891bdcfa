"""Top-k placement table / heat map, and the score + report commands."""
from __future__ import annotations

import pytest
import torch

from sensitune.cli import main
from sensitune.scoring import ScoreMap, placement, score

from .helpers import tiny_vit


def _planted_scores():
    """Magnitude-style map of a tiny ViT with hand-planted winners, so the counts are known."""
    model = tiny_vit()
    scores = score(model, None, "random", seed=0)  # all in [0, 1)
    planted = dict(scores)
    planted["blocks.1.attn.qkv.weight"] = planted["blocks.1.attn.qkv.weight"].clone()
    planted["blocks.1.attn.qkv.weight"][192 + 5, :7] = 5.0     # 7 in k (rows 192..383)
    planted["blocks.1.attn.qkv.weight"][2 * 192 + 1, :3] = 5.0  # 3 in v
    planted["blocks.0.mlp.fc2.bias"] = planted["blocks.0.mlp.fc2.bias"].clone()
    planted["blocks.0.mlp.fc2.bias"][:4] = 6.0                  # 4 in biases
    planted["norm.weight"] = planted["norm.weight"].clone()
    planted["norm.weight"][:2] = 7.0                            # 2 in the top-level norm
    return ScoreMap(planted, scores.meta)


def test_placement_counts_the_planted_top_k_per_block_and_kind():
    scores = _planted_scores()
    p = placement(scores, 16, scores.meta["tensors"])
    assert p.rows == ["blocks.0", "blocks.1", "(top)"]
    assert p.columns == ["norms", "q", "k", "v", "biases", "proj", "fc1", "fc2"]
    cell = {(r, c): int(p.counts[i, j]) for i, r in enumerate(p.rows) for j, c in enumerate(p.columns)}
    assert cell[("blocks.1", "k")] == 7 and cell[("blocks.1", "v")] == 3 and cell[("blocks.1", "q")] == 0
    assert cell[("blocks.0", "biases")] == 4 and cell[("(top)", "norms")] == 2
    assert int(p.counts.sum()) == 16
    # cell sizes: q of one block is 192 x 192; all biases of a block = qkv 576 + proj 192 + fc1 768 + fc2 192
    assert int(p.sizes[1, p.columns.index("q")]) == 192 * 192
    assert int(p.sizes[0, p.columns.index("biases")]) == 576 + 192 + 768 + 192
    table = p.table()
    assert table.splitlines()[0].split() == ["block", *p.columns, "total"]
    assert table.splitlines()[-1].split()[-1] == "16"


def test_placement_without_recorded_facts_and_bad_input():
    scores = _planted_scores()
    p = placement(dict(scores), 16)  # a hand-made map: no q/k/v split known, qkv is one column
    assert "qkv" in p.columns and int(p.counts[p.rows.index("blocks.1"), p.columns.index("qkv")]) == 10
    with pytest.raises(ValueError, match="empty"):
        placement({}, 3)
    with pytest.raises(ValueError, match="positive"):
        placement(dict(scores), 0)
    bad = dict(scores)
    bad["norm.bias"] = torch.full_like(bad["norm.bias"], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        placement(bad, 3)


def test_report_command_prints_the_table_and_writes_a_png(tmp_path, capsys):
    path = _planted_scores().save(tmp_path / "scores.safetensors")
    assert main(["report", str(path), "--budget", "16"]) == 0
    out = capsys.readouterr().out
    assert "top 16 of" in out and "blocks.1" in out
    png = tmp_path / "scores_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(path), "--budget", "0.1%", "--png", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").is_file()
    assert main(["report", str(tmp_path / "nope.safetensors")]) == 2
    assert main(["report", str(path), "--budget", "lots"]) == 2
    assert "not a count" in capsys.readouterr().err


def test_score_command_end_to_end_on_a_builtin_task(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    argv = ["score", "--model", "vit_tiny_patch16_224", "--pretrained", "none", "--img-size", "32",
            "--task", "digits", "--method", "sensitivity", "--batch-size", "4", "--batches", "2",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    scores = ScoreMap.load(out)
    assert scores.meta["samples"] == 8 and scores.meta["task"]["name"] == "digits"
    assert scores.meta["model"]["name"] == "vit_tiny_patch16_224" and "head.weight" not in scores
    assert "blocks.0.attn.qkv.weight" in scores.meta["tensors"]
    assert main(["score", "--model", "vit_tiny_patch16_224", "--task", "digits", "--out", str(tmp_path / "x.pt")]) == 2
    assert "safetensors" in capsys.readouterr().err
