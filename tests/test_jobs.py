"""The checked-in job folders are exactly what their definitions export, and FLARE can read them."""

import json
from pathlib import Path

import pytest

from fedbrain.jobs import JOBS_DIR, load_job_module

JOBS = ["segmentation", "classification"]
SCRIPTS = {"segmentation": "segment_client.py", "classification": "classify_client.py"}


def _tree(root: Path) -> dict[str, bytes]:
    # Submitting a folder makes FLARE sign it in place; the signatures are not part of the definition.
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".__nvfl_")}


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
    for app in folder.glob("app*"):
        config = app / "config" / "config_fed_client.json"
        if not config.is_file():
            continue
        client = json.loads(config.read_text())
        scripts = [e["executor"]["args"].get("task_script_path") for e in client.get("executors", [])]
        assert scripts == [SCRIPTS[name]], (app, scripts)
        assert (app / "custom" / SCRIPTS[name]).is_file()


def test_classification_job_excludes_exactly_the_head_at_every_site():
    from fedbrain.models.classifier import build_classifier, head_parameter_names

    job = load_job_module("classification")
    folder = JOBS_DIR / "classification" / job.JOB_NAME
    spec = json.loads((folder / "app_server" / "config" / "config_fed_server.json").read_text())
    persistor = next(c for c in spec["components"] if c["id"] == "persistor")
    head = head_parameter_names(build_classifier(**persistor["args"]["model"]["args"]))
    assert head and all(k.startswith("head.") for k in head)
    for site in job.SITES:
        client = json.loads((folder / f"app_{site}" / "config" / "config_fed_client.json").read_text())
        filters = [f for group in client["task_result_filters"] for f in group["filters"]]
        assert [f["args"]["exclude_vars"] for f in filters if f["path"].endswith("ExcludeVars")] == [head], site
    audit = [f for group in spec["task_result_filters"] for f in group["filters"]]
    assert any(f["path"].endswith("ReceivedUpdateAudit") for f in audit)


def test_shared_head_baseline_sends_everything(tmp_path):
    job = load_job_module("classification")
    folder = job.export(tmp_path, algorithm="fedavg")
    client = json.loads((folder / "app_hospital-a" / "config" / "config_fed_client.json").read_text())
    assert not any(f["path"].endswith("ExcludeVars") for g in client["task_result_filters"] for f in g["filters"])
    assert "--personal" not in client["executors"][0]["executor"]["args"]["task_script_args"]
