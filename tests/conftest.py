"""Shared test fixtures, and how ``-n 2 --dist loadfile`` splits the suite between the two xdist workers.

The POC modules (marked ``poc``; files named ``test_poc_*.py``) run in two lanes, one per worker,
each module after the other within its lane:

- the shared lane starts first: the fault tests (their own consortium, timing-sensitive, so
  they run while the other worker only has unit tests), then every module on the session's
  shared consortium (:mod:`poc_shared`);
- the own-kit lane (modules that must own their consortium: 12 sites, production kits, the CLI's
  ``poc up``, an installed wheel) is queued after the unit tests, so it runs on whichever worker
  finishes those, while the shared lane goes on.
"""

from pathlib import Path

import pytest
import torch

from poc_shared import first_wave, second_wave, shared_poc  # noqa: F401 (session fixtures of the shared consortium)

TESTS = Path(__file__).parent
#: In the order they run. The fault tests first: their rounds time out at 20 s on purpose, so they
#: run beside unit tests only, never beside another consortium's job processes.
SHARED_LANE = ("test_poc_faults.py", "test_poc_he.py", "test_poc_attacks.py", "test_poc_hostile.py", "test_poc_secagg.py",
               "test_poc_classify.py", "test_poc_e2e.py", "test_poc_dp.py", "test_poc_policy.py")
#: The 12-site load test last: by then the shared lane's side-by-side jobs are done (two consortia starting
#: 16 processes at once on 2 cores pushed its start past 300 s).
OWN_KIT_LANE = ("test_poc_deployment.py", "test_poc_wheel.py", "test_poc_load.py")
POC_FILES = frozenset(SHARED_LANE + OWN_KIT_LANE)


def pytest_collection_modifyitems(session, config, items):
    """Every ``poc`` test lives in a lane file; the shared lane runs first, the own-kit lane last."""
    stray = sorted({Path(str(item.fspath)).name for item in items
                    if item.get_closest_marker("poc") and Path(str(item.fspath)).name not in POC_FILES})
    unlisted = sorted({p.name for p in TESTS.glob("test_poc_*.py")} - POC_FILES)
    if stray or unlisted:
        raise pytest.UsageError(f"POC test files outside tests/conftest.py's lanes: {stray + unlisted}; a POC test "
                                "lives in a test_poc_*.py file listed in SHARED_LANE or OWN_KIT_LANE")

    def rank(item):
        name = Path(str(item.fspath)).name
        if name in SHARED_LANE:
            return 0, SHARED_LANE.index(name)
        return (2, OWN_KIT_LANE.index(name)) if name in OWN_KIT_LANE else (1, 0)

    items.sort(key=rank)  # stable: the order inside a file stays


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it installed, nothing to schedule
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, except that each POC lane counts as one file and scopes go out in
    collection order (the order above), not largest first.

    A scheduler rather than ``xdist_group`` marks: with pytest 9 xdist 3.8's ``--dist loadgroup``
    no longer tags the node ids (pytest-dev/pytest-xdist#1386), so every test becomes its own group
    and each module fixture (a POC consortium) starts on both workers.
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class PocLanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = Path(nodeid.split("::", 1)[0]).name
            if file in SHARED_LANE:
                return "poc: shared lane"
            return "poc: own-kit lane" if file in OWN_KIT_LANE else nodeid.split("::", 1)[0]

    return PocLanes(config, log)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Trainers set torch's (process-wide) thread count; give every other test its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
