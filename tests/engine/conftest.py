"""Engine tests run their tiny models on one thread.

Why: the models here are tiny (a few hundred thousand parameters), where a second OpenMP
thread buys nothing, and on a shared, loaded 2-core machine two spinning threads made a small
Linear ~150x slower (5 ms vs 31 us, measured). The session setting is restored after each test.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
