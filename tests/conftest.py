"""Shared test fixtures, and how ``-n 2 --dist loadfile`` splits the suite between xdist workers."""

import re
from pathlib import Path

import pytest
import torch

POC_MARK = re.compile(r"pytest\.mark\.poc\b")
POC_FILES = frozenset(p.name for p in Path(__file__).parent.glob("test_*.py") if POC_MARK.search(p.read_text()))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it installed, nothing to schedule
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, except that every POC file counts as one file: the POC modules run one
    after another on one worker while the other takes the unit tests. Two POC consortia at once on
    two cores starve each other's job processes past the round timeouts the fault tests rely on (a CI
    run failed with "round 1 did not start within 300 s" while another POC file shared the machine).

    A scheduler rather than ``xdist_group`` marks: with pytest 9 xdist 3.8's ``--dist loadgroup``
    no longer tags the node ids (pytest-dev/pytest-xdist#1386), so every test becomes its own group
    and each module fixture (a POC consortium) starts on both workers.
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class PocFilesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "poc modules" if Path(file).name in POC_FILES else file

    return PocFilesTogether(config, log)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Trainers set torch's (process-wide) thread count; give every other test its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
