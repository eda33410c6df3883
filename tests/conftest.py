"""Fixtures shared across rooms' tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    # Tiny models gain nothing from a second OpenMP thread, and spin-waiting threads collapse on
    # a contended machine (PLATFORM.md); restore the setting for other modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_flush_denormal_leak():
    # The trainers turn on flush-to-zero for speed, process-wide on this thread and inherited by
    # threads it starts (a test server's): turn it off after each test, as a fresh process has it.
    yield
    torch.set_flush_denormal(False)
