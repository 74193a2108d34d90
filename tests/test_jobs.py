"""The checked-in job folders are exactly what their definitions export; the config reaches
the site script whole; FLARE can read them and they name no path of this machine."""

import json
import sys
import tempfile
from pathlib import Path

import pytest

from fedbrain.jobs import DEFAULT_SITES

from fedbrain.fl.executor import installed_site_script
from test_config import changed

from fedbrain.fl.site_loop import parse_site_args
from fedbrain.jobs import classification, segmentation
from fedbrain.tasks.classification import ClassificationConfig
from fedbrain.tasks.segmentation import SegmentationConfig

JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
JOBS = {"segmentation": (segmentation, SegmentationConfig), "classification": (classification, ClassificationConfig)}


def _tree(root: Path) -> dict[str, bytes]:
    # Submitting a folder makes FLARE sign it in place; the signatures are not part of the definition.
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".__nvfl_")}


def _client_configs(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("app*/config/config_fed_client.json"))]


def _site_argv(client: dict) -> list[str]:
    """What FLARE's in-process runner hands the site script (its own splitter)."""
    from nvflare.fuel.utils.secret_utils import split_command_preserving_secret_refs

    args = client["executors"][0]["executor"]["args"]["task_script_args"]
    return split_command_preserving_secret_refs(args, posix=False)


@pytest.mark.parametrize("name", JOBS)
def test_checked_in_job_matches_definition(name, tmp_path):
    job, config_cls = JOBS[name]
    exported, checked_in = job.export(config_cls(), tmp_path), JOBS_DIR / name / config_cls().name
    assert checked_in.is_dir(), f"run `python jobs/{name}/job.py` to export {checked_in}"
    fresh, repo = _tree(exported), _tree(checked_in)
    assert sorted(fresh) == sorted(repo), "files differ: re-export with `make jobs`"
    stale = [f for f in fresh if fresh[f] != repo[f]]
    assert not stale, f"stale exported files {stale}: re-export with `make jobs`"


def test_checked_in_apps_are_the_export_and_the_jobs_are_assembled_from_them(tmp_path):
    """apps/ (every task's server and site app per algorithm) is exactly what the code exports, and each
    jobs/<task>/ folder is exactly those apps assembled (and, above, exactly FLARE's own export)."""
    from fedbrain.jobs.apps import write_repo_apps_and_jobs

    write_repo_apps_and_jobs(tmp_path)
    repo = JOBS_DIR.parent
    for folder in ("apps", "jobs"):
        fresh = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / folder).rglob("*") if p.is_file()}
        checked_in = {p.relative_to(repo): p.read_bytes() for p in (repo / folder).rglob("*")
                      if p.is_file() and p.suffix == ".json" and not p.name.startswith(".__nvfl")}
        assert sorted(fresh) == sorted(checked_in), f"{folder}/ differs from the export: run `make jobs`"
        assert not [f for f in fresh if fresh[f] != checked_in[f]], f"stale {folder}/ files: run `make jobs`"


@pytest.mark.parametrize("name", JOBS)
def test_site_rebuilds_exactly_the_exported_config(name, tmp_path):
    """Every field set to a non-default value travels: a field that does not fails here."""
    from fedbrain.models import start

    job, config_cls = JOBS[name]
    config = changed(config_cls)
    # a start for exactly this network (its weights: the network's own initial draw)
    made = start.save(config.replace(start_model=None).build_model().state_dict(), tmp_path / "start",
                      {"task": config.TASK, "model_spec": config.model_spec()})
    folder = job.export(config.replace(start_model=str(made.weights)), tmp_path, sites=list(DEFAULT_SITES))
    assert config.start_model == "sha256:" + "ab" * 32
    config = config.replace(start_model=made.reference)  # what the sites get: the hash, never the path
    clients = _client_configs(folder)
    assert clients
    for client in clients:
        assert parse_site_args(config_cls, _site_argv(client)) == config
    server = json.loads(next(folder.glob("app*/config/config_fed_server.json")).read_text())
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    spec = json.loads(json.dumps(config.model_spec()))
    model = persistor["args"]["model"]  # FLARE writes class_path as "path"
    assert (model.get("path") or model.get("class_path")) == spec["class_path"] and model["args"] == spec["args"]
    assert server["workflows"][0]["args"]["num_rounds"] == config.rounds
    assert json.loads((folder / "meta.json").read_text())["min_clients"] == config.min_clients


@pytest.mark.parametrize("name", JOBS)
def test_exported_job_is_portable(name):
    """No path of the machine that exported it; no code at all: each site runs the script of the
    fedbrain it installed (FLARE then treats the job as code-free and checks its class allow-list)."""
    job, config_cls = JOBS[name]
    folder = JOBS_DIR / name / config_cls().name
    machine = {str(Path.home()), str(JOBS_DIR.parent), sys.prefix, tempfile.gettempdir(), str(Path.cwd())}
    for path in folder.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not [m for m in machine if m in text], path
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["name"] == config_cls().name
    assert "scope" not in meta  # no privacy scope named: each site's default_scope applies
    assert not list(folder.rglob("custom")), "a job folder carries configuration only"
    for app in folder.glob("app*"):
        config = app / "config" / "config_fed_client.json"
        if not config.is_file():
            continue
        client = json.loads(config.read_text())
        executors = [e["executor"] for e in client.get("executors", [])]
        assert [e["path"] for e in executors] == ["fedbrain.fl.executor.InstalledScriptExecutor"], app
        assert [e["args"]["site_script"] for e in executors] == [job.SITE_SCRIPT], app
        # The installed fedbrain has the script the job names; a job naming another is refused clearly.
        assert Path(installed_site_script(job.SITE_SCRIPT)).is_file()
    with pytest.raises(ValueError, match="has no site script 'train.py'"):
        installed_site_script("train.py")


def test_classification_job_excludes_exactly_the_head_at_every_site():
    from fedbrain.models.classifier import build_classifier, head_parameter_names

    folder = JOBS_DIR / "classification" / ClassificationConfig().name
    spec = json.loads((folder / "app_server" / "config" / "config_fed_server.json").read_text())
    persistor = next(c for c in spec["components"] if c["id"] == "persistor")
    head = head_parameter_names(build_classifier(**persistor["args"]["model"]["args"]))
    assert head and all(k.startswith("head.") for k in head)
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        client = json.loads((folder / f"app_{site}" / "config" / "config_fed_client.json").read_text())
        filters = [f for group in client["task_result_filters"] for f in group["filters"]]
        assert [f["args"]["exclude_vars"] for f in filters if f["path"].endswith("ExcludeVars")] == [head], site
    audit = [f for group in spec["task_result_filters"] for f in group["filters"]]
    assert any(f["path"].endswith("ReceivedUpdateAudit") for f in audit)


def test_shared_head_baseline_sends_everything(tmp_path):
    folder = classification.export(ClassificationConfig(algorithm="fedavg"), tmp_path)
    client = json.loads((folder / "app_hospital-a" / "config" / "config_fed_client.json").read_text())
    assert not any(f["path"].endswith("ExcludeVars") for g in client["task_result_filters"] for f in g["filters"])
    config = parse_site_args(ClassificationConfig, _site_argv(client))
    assert config.algorithm == "fedavg" and not config.personal


def test_more_required_sites_than_apps_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="min_clients 3 is more than the 2 sites"):
        classification.export(ClassificationConfig(), tmp_path, sites=["site-1", "site-2"])
    folder = classification.export(ClassificationConfig(min_clients=2), tmp_path, sites=["site-1", "site-2"])
    assert sorted(p.name for p in folder.glob("app_*")) == ["app_server", "app_site-1", "app_site-2"]


def test_a_job_cannot_point_a_site_at_data():
    """The site script takes the config only; data paths come from the hospital's own settings. Any other
    argument is ignored (never used) and named, so the site can tell the admin."""
    arg = ClassificationConfig().to_argument()
    ignored = []
    config = parse_site_args(ClassificationConfig, ["--config", arg, "--datalist", "/elsewhere/datalist.json"], ignored)
    assert config == ClassificationConfig() and ignored == ["--datalist"]
    with pytest.raises(SystemExit):  # without the config there is nothing to run
        parse_site_args(ClassificationConfig, ["--datalist", "/elsewhere/datalist.json"])


def test_what_a_site_tells_the_admin_carries_none_of_its_paths():
    from fedbrain.fl.site_loop import redact_paths

    said = redact_paths("site hospital-c: /srv/hospital c/data/datalist.json: malformed JSON at line 3, column 2")
    assert said == "site hospital-c: <site path>: malformed JSON at line 3, column 2"
    assert redact_paths(r"C:\data\dl.json: datalist file not found") == "<site path>: datalist file not found"


@pytest.mark.parametrize("he", [False, True])
def test_job_level_client_dp_runs_on_plaintext_before_any_encryptor(he, tmp_path):
    """Privacy filters at each site, in order: head removed, then clip + noise, then (HE) the encryptor."""
    config = ClassificationConfig(client_dp_clip=0.5, client_dp_noise=1.2, he=he)
    folder = classification.export(config, tmp_path)
    client = json.loads((folder / "app_hospital-a" / "config" / "config_fed_client.json").read_text())
    train = [f for g in client["task_result_filters"] if "train" in g["tasks"] for f in g["filters"]]
    names = [f["path"].rsplit(".", 1)[1] for f in train]
    expected = ["ExcludeVars", "ClientLevelDP"] + (["TimedEncryptor"] if he else [])
    assert names == expected, names
    dp = train[1]["args"]
    assert dp["clip_norm"] == 0.5 and dp["noise_multiplier"] == 1.2


def test_jobs_export_from_several_threads_at_once(tmp_path, monkeypatch):
    """Export runs in the sites/ folder, and the working folder is the process's: the fault tests build three jobs
    in three threads, and one clean-clone run failed with `invalid resource segment_client.py` when one thread's
    return to its folder pulled sites/ from under another (interleaved, they also left the process in sites/).
    Exports now take turns."""
    import threading

    import time

    import fedbrain.jobs as jobs
    from fedbrain.jobs.segmentation import export
    from fedbrain.tasks.segmentation import SegmentationConfig

    build, calls = jobs._build, []

    def slow_build(*args, **kwargs):  # staggered: an early thread leaves sites/ while a later one is still in it
        calls.append(1)
        time.sleep(0.1 * len(calls))
        return build(*args, **kwargs)

    monkeypatch.setattr(jobs, "_build", slow_build)
    failures, done = [], []

    def one(i):
        try:
            done.append(export(SegmentationConfig(name=f"job{i}", he=bool(i % 2), rounds=1), tmp_path / f"out{i}"))
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            failures.append(repr(e))

    before = Path.cwd()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and len(done) == 6
    assert Path.cwd() == before  # interleaved, the last thread out restored another thread's sites/


def test_exporting_a_fedavg_classifier_job_says_the_head_will_not_travel(tmp_path, capsys):
    """Every scope fedbrain provisions removes head.*: an admin exporting --algorithm fedavg is told before submitting."""
    from fedbrain.cli import main

    assert main(["job", "export-classify", "--algorithm", "fedavg", "--out", str(tmp_path / "fedavg")]) == 0
    out = capsys.readouterr().out
    assert "never reaches the server" in out and "--algorithm mixed" in out
    assert main(["job", "export-classify", "--out", str(tmp_path / "personal")]) == 0
    assert "never reaches the server" not in capsys.readouterr().out
