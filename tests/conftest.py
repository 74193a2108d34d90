"""Shared test fixtures and how the suite is split between xdist workers."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Under ``-n 2 --dist loadgroup`` every POC file runs on one worker, one after another, while
    the other worker takes the unit tests file by file. Two POC consortia at once on two cores
    starve each other's job processes past the round timeouts the fault tests rely on (a CI run
    failed with "round 1 did not start within 300 s" while another POC file shared the machine)."""
    for item in items:
        group = "poc" if item.get_closest_marker("poc") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Trainers set torch's (process-wide) thread count; give every other test its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
