"""Helpers shared by the device tests, and access to the CPU suites' own helpers (reused, not copied)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

TESTS = Path(__file__).resolve().parents[1]


def sibling(relpath: str) -> ModuleType:
    """A module of the test suite by path (``tuners/test_sparse.py``), under a private name.

    The suites' folders are not packages, so their modules are importable by name only after
    pytest collected them; loading by path works whichever tests are selected.
    """
    name = "_sensitune_tests_" + relpath.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        path = TESTS / relpath
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # its own sibling imports (engine_helpers, ...)
        try:
            sys.modules[name] = module
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
    return sys.modules[name]


#: autocast dtype per precision, and the tolerance an autocast result is held to against the same
#: computation done densely under the same autocast: rtol, and atol as a share of the reference's
#: largest magnitude (bf16 keeps 8 significant bits, fp16 11; both sides round inputs alike, the
#: rest is rounding of the outputs and summation order)
PRECISIONS: dict[str, tuple[torch.dtype | None, float, float]] = {
    "fp32": (None, 1e-5, 1e-5),
    "bf16": (torch.bfloat16, 2e-2, 1e-2),
    "fp16": (torch.float16, 4e-3, 2e-3),
}


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision][0]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def assert_close_at(precision: str, got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """``got`` ≈ ``want`` within the stated tolerance of ``precision`` (both moved to CPU float64)."""
    _, rtol, share = PRECISIONS[precision]
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=share * max(scale, 1e-12), msg=msg or None)
