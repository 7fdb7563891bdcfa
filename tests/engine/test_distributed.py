"""Data parallel: 2 CPU processes (torchrun, gloo) equal 1 process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import train_child
from engine_helpers import tiny_vit

CHILD = Path(__file__).with_name("train_child.py")


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    common = ["--batch", "8", "--epochs", "2", "--samples", "24", "--drop-path", "0", "--augment", "--checkpoint-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(CHILD), str(tmp_path / "two"), *common], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    train_child.main([str(tmp_path / "one"), *common])  # 1 process, here, while the 2 ranks run
    _, err = two.communicate(timeout=180)
    assert two.returncode == 0, err.decode()[-3000:]
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    start = dict(tiny_vit(drop_path=0.0).named_parameters())
    for n in a:
        assert not torch.equal(a[n], start[n].detach()), f"{n} did not train"
        x, y = a[n], b[n]
        if n.endswith("qkv.bias"):
            # the key bias has an exactly-zero true gradient (softmax ignores a constant shift), so
            # Adam turns float rounding noise into full-size steps; compare the q and v parts only
            d = x.numel() // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=n)
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())["history"]
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())["history"]
    # images counted over both ranks; losses agree to float tolerance
    assert [r["images"] for r in h1] == [r["images"] for r in h2] == [24, 24]
    for r1, r2 in zip(h1, h2):
        assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-4 and r1["train_acc"] == r2["train_acc"]
    # rank 0 alone wrote the run files
    assert sorted(p.name for p in (tmp_path / "two").rglob("*")) == sorted(
        ["checkpoints", "last.pt", "metrics.csv", "final.safetensors", "history.json"])


def test_a_torchrun_train_reports_once(tmp_path):
    """Every rank runs train(); only rank 0 logs and prints the summary."""
    from engine_helpers import make_vtab

    task = make_vtab(tmp_path / "bands", sizes={"train800": 16, "val200": 8, "test": 4}, size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sensitune.cli", "train", "--model", "test_vit", "--task", str(task), "--method",
                           "linear", "--out", str(tmp_path / "run"), "--pretrained", "none", "--img-size", "32",
                           "--epochs", "1", "--batch-size", "8", "--no-progress", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count('"accuracy"') == 1, out  # the JSON summary
    assert out.count("val200 accuracy") == 1 and out.count("epoch 1/1:") == 1, out  # the log lines
    assert out.count("trainable:") == 1, out  # the plan summary
    assert json.loads((tmp_path / "run" / "results.json").read_text())["world_size"] == 2
