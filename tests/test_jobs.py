"""The checked-in job folders are exactly what their definitions export, and FLARE can read them."""

import filecmp
import json
from pathlib import Path

import pytest

from fedbrain.jobs import JOBS_DIR, load_job_module

JOBS = ["segmentation"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", JOBS)
def test_checked_in_job_matches_definition(name, tmp_path):
    job = load_job_module(name)
    exported, checked_in = job.export(tmp_path), JOBS_DIR / name / job.JOB_NAME
    assert checked_in.is_dir(), f"run `python jobs/{name}/job.py` to export {checked_in}"
    fresh, repo = _tree(exported), _tree(checked_in)
    assert sorted(fresh) == sorted(repo), "files differ: re-export with `make jobs`"
    stale = [f for f in fresh if fresh[f] != repo[f]]
    assert not stale, f"stale exported files {stale}: re-export with `make jobs`"


@pytest.mark.parametrize("name", JOBS)
def test_exported_job_is_portable(name):
    """No absolute path of the machine that exported it; the site script rides in custom/."""
    job = load_job_module(name)
    folder = JOBS_DIR / name / job.JOB_NAME
    for path in folder.rglob("*.json"):
        assert str(Path.home()) not in path.read_text() and "/work/" not in path.read_text(), path
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["name"] == job.JOB_NAME
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    scripts = [c["args"].get("script") for c in client["components"] if "script" in c.get("args", {})]
    scripts += [e["executor"]["args"].get("task_script_path") for e in client.get("executors", []) if "task_script_path" in e["executor"].get("args", {})]
    assert scripts, "no site script configured"
    assert (folder / "app" / "custom" / "segment_client.py").is_file()
