"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Trainers set torch's (process-wide) thread count; give every other test its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
