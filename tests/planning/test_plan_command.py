"""`sensitune plan` end to end: scores file in, plan.json + indices out, loadable and appliable."""
import pytest
import torch

from sensitune.cli import main
from sensitune.models import create_backbone
from sensitune.planning import Plan
from sensitune.scoring import ScoreMap
from sensitune.tuners import apply_plan


def test_plan_command_spt(tmp_path, capsys):
    model = create_backbone("tf_efficientnet_lite0", 3, "none")
    g = torch.Generator().manual_seed(0)
    scores = ScoreMap({n: torch.rand(p.shape, generator=g) ** 8 for n, p in model.named_parameters()
                       if not n.startswith("classifier")},
                      meta={"model": {"name": "tf_efficientnet_lite0", "num_classes": 3}})
    scores.save(tmp_path / "s.safetensors")
    out = tmp_path / "plan.json"
    assert main(["plan", "--scores", str(tmp_path / "s.safetensors"), "--method", "spt-lora",
                 "--budget", "0.05M", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trainable:" in text and "50,000 without" in text
    plan = Plan.load(out)
    assert plan.num_trainable(include_head=False) == 50000
    assert (tmp_path / "plan.safetensors").is_file()
    apply_plan(model, plan)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.num_trainable(True)


def test_plan_command_errors(tmp_path, capsys):
    out = str(tmp_path / "p.json")
    assert main(["plan", "--method", "lora", "--out", out]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["plan", "--model", "tf_efficientnet_lite0", "--num-classes", "3", "--method", "gps",
                 "--out", out]) == 2
    assert "needs scores" in capsys.readouterr().err
    assert main(["plan", "--model", "tf_efficientnet_lite0", "--num-classes", "3", "--method", "lora",
                 "--targets", "nomatch", "--out", out]) == 2
    assert "match no weight matrix" in capsys.readouterr().err
    assert main(["plan", "--model", "tf_efficientnet_lite0", "--num-classes", "3", "--method", "lora",
                 "--rank", "4", "--out", out]) == 0
    assert Plan.load(out).units[0].rank == 4
