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
