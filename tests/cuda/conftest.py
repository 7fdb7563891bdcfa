"""Device-parametrised tests: every body runs on CPU here and in CI, and on CUDA where a GPU exists.

The ``device`` fixture yields ``cpu`` and ``cuda``; the CUDA case carries the ``cuda`` marker, so
``pytest -m cuda`` selects exactly the GPU cases (benchmarks/device_check.sh runs that) and
tests/conftest.py skips them, saying why, where torch sees no GPU.
"""
from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def exact_float32():
    """fp32 that means fp32 on CUDA too: TF32 off for matmuls and cuDNN convs while the test runs.

    (cuDNN convolutions use TF32 by default, a 10-bit mantissa, which would hide a real error
    behind a loose tolerance.)
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: the models here are tiny, and on a loaded 2-core machine a second OpenMP
    thread made a tiny fit ~30x slower (17 s vs 0.6 s, measured); restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
