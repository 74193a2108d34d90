"""The xdist split in conftest.py: every POC file is in one of the two lanes, once, or two POC
consortia could run side by side in a way nobody planned (troubleshooting: "round 1 did not start")."""

from pathlib import Path

from conftest import OWN_KIT_LANE, POC_FILES, SHARED_LANE

TESTS = Path(__file__).parent


def test_every_poc_file_is_in_exactly_one_lane_and_exists():
    on_disk = {p.name for p in TESTS.glob("test_poc_*.py")}
    assert on_disk == POC_FILES, (sorted(on_disk - POC_FILES), sorted(POC_FILES - on_disk))
    assert not set(SHARED_LANE) & set(OWN_KIT_LANE)
    assert SHARED_LANE[0] == "test_poc_faults.py"  # first: beside unit tests only, never beside a consortium


def test_every_module_with_the_poc_marker_is_named_as_a_poc_file():
    """The collection guard in conftest.py refuses a ``poc`` test outside a lane; this checks the text
    agrees, so a module marked poc by pytestmark is not missed by a rename."""
    for path in TESTS.glob("test_*.py"):
        lines = path.read_text().splitlines()
        if any(line.startswith(("pytestmark = pytest.mark.poc", "@pytest.mark.poc")) for line in lines):
            assert path.name in POC_FILES, path.name
