"""The xdist split in conftest.py: every module with a POC test must be in the one POC group, or two
POC consortia can run side by side again (the CI failure troubleshooting af describes)."""

import subprocess
import sys
from pathlib import Path

from conftest import POC_FILES

TESTS = Path(__file__).parent


def test_every_module_with_a_poc_test_is_scheduled_with_the_poc_modules():
    out = subprocess.run([sys.executable, "-m", "pytest", str(TESTS), "-m", "poc", "--collect-only", "-q",
                          "-p", "no:xdist", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, cwd=TESTS.parent, timeout=300)
    files = {Path(line.split("::", 1)[0]).name for line in out.stdout.splitlines() if "::" in line}
    assert files, out.stdout[-2000:] + out.stderr[-2000:]
    assert files <= POC_FILES, sorted(files - POC_FILES)
    assert "test_poc_faults.py" in files
