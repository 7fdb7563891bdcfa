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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with the reason, where torch sees no GPU.

    ``SENSITUNE_REQUIRE_CUDA=1`` (set by benchmarks/device_check.sh on the GPU machine) turns a
    missing GPU into an error instead, so a broken CUDA setup cannot pass as "all skipped".
    """
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked or torch.cuda.is_available():
        return
    if os.environ.get("SENSITUNE_REQUIRE_CUDA") == "1":
        raise pytest.UsageError(f"SENSITUNE_REQUIRE_CUDA=1 but torch {torch.__version__} sees no CUDA device "
                                f"({len(marked)} cuda test(s) selected)")
    why = "needs a CUDA GPU: torch.cuda.is_available() is False here (run benchmarks/device_check.sh on one)"
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=why))
