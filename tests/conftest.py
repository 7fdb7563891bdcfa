"""Session-wide test settings: deterministic, CPU-friendly, offline."""
import os
from pathlib import Path

import pytest

# Built-in task data is materialised once per checkout, not per test run.
os.environ.setdefault("SENSITUNE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "sensitune"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
