"""Two gloo processes under torchrun give the same ScoreMap as one process on the same samples."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sensitune.scoring import ScoreMap

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(args: list[str], out: Path) -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args, str(WORKER), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is required")
def test_two_processes_equal_one_process(tmp_path):
    _run([], tmp_path / "one")
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path / "two")
    for method in ("sensitivity", "gps"):
        one = ScoreMap.load(tmp_path / "one" / f"{method}.safetensors")
        two = ScoreMap.load(tmp_path / "two" / f"{method}.safetensors")
        assert list(one) == list(two)
        assert one.meta["world_size"] == 1 and two.meta["world_size"] == 2
        assert one.meta["samples"] == two.meta["samples"] == 10
        assert two.meta["mean_loss"] == pytest.approx(one.meta["mean_loss"], rel=1e-5)
        for name in one:
            scale = float(one[name].abs().max())
            assert scale > 0, f"{method} {name}: all-zero scores make the comparison vacuous"
            rel = float((one[name] - two[name]).abs().max()) / scale
            assert rel < 1e-5, f"{method} {name}: relative difference {rel:.2e}"
