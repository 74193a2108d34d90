"""Site-enforced privacy in a real POC (FLARE applies site policies only with real processes).

Sites as provisioned by fedbrain, then each hospital's own choices before start:
hospital-a tightens its `standard` scope's update-norm clip to 0.5; hospital-b keeps the
defaults; hospital-c makes `encrypted` its default scope. Then:

1. a plaintext FedAvg classifier job that shares *everything* (``--algorithm fedavg``) and names
   no scope: a and b apply their default `standard` scope, so no personal head reaches the server
   anyway and hospital-a's updates arrive clipped; hospital-c refuses to release plaintext;
2. a job naming a scope no site defines ("research") is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedbrain.demo import ClassifyDemoSettings, prepare_classification_data
from fedbrain.filters.audit import AUDIT_FILE
from fedbrain.jobs.classification import export
from fedbrain.poc.consortium import PocConsortium
from fedbrain.poc.runner import submit_and_wait
from fedbrain.report.job_report import find_workspace
from fedbrain.tasks.classification import ClassificationConfig

pytestmark = pytest.mark.poc

CLIP_A = 0.5


def _set_policy(kit: Path, default_scope: str | None = None, clip: float | None = None) -> None:
    path = kit / "local" / "privacy.json"
    policy = json.loads(path.read_text())
    if default_scope:
        policy["default_scope"] = default_scope
    if clip is not None:
        for f in next(s for s in policy["scopes"] if s["name"] == "standard")["task_result_filters"]:
            if f["path"].endswith("UpdateNormClip"):
                f["args"]["max_norm"] = clip
    path.write_text(json.dumps(policy, indent=2))


@pytest.fixture(scope="module")
def policy_jobs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("poc_policy")
    poc = PocConsortium(run_dir)
    task = ClassificationConfig(rounds=1, epochs_per_round=1, seed=5, algorithm="fedavg", min_clients=2)
    settings = ClassifyDemoSettings(cases=8, seed=5, task=task)
    data = prepare_classification_data(run_dir / "data", poc.sites, settings)
    out = {"poc": poc}
    try:
        poc.prepare(data_dir=data)
        _set_policy(poc.kit("hospital-a"), clip=CLIP_A)
        _set_policy(poc.kit("hospital-c"), default_scope="encrypted")
        poc.start()
        job = export(task, run_dir / "jobs", sites=poc.sites)  # min_clients 2: the job may finish without c
        out["meta1"], out["result1"] = submit_and_wait(poc, job, rounds=1, result_dir=run_dir / "r1")
        out["log_c"] = (poc.kit("hospital-c") / out["meta1"]["job_id"] / "log.txt").read_text(errors="replace")
        meta = json.loads((job / "meta.json").read_text())
        meta["scope"] = "research"
        (job / "meta.json").write_text(json.dumps(meta))
        sess = poc.session()
        try:
            job_id = sess.submit_job(str(job))
            out["meta2"] = _wait(sess, job_id, timeout=180)
            out["log_a2"] = _site_job_log(poc.kit("hospital-a"), job_id)
        finally:
            sess.close()
    finally:
        poc.clean()
    yield out


def _wait(sess, job_id: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while True:
        meta = sess.get_job_meta(job_id)
        if meta.get("status", "").startswith("FINISHED") or time.time() > deadline:
            return meta
        time.sleep(3)


def _site_job_log(kit: Path, job_id: str) -> str:
    parts = [p.read_text(errors="replace") for p in (kit / job_id).rglob("log.txt")] if (kit / job_id).exists() else []
    return "\n".join(parts + [(kit / "log.txt").read_text(errors="replace")])


def _audit(result: Path) -> list[dict]:
    path = next(Path(find_workspace(result)).rglob(AUDIT_FILE))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_default_scope_excludes_the_head_even_from_a_fedavg_job(policy_jobs):
    received = [e for e in _audit(policy_jobs["result1"]) if e["params"]]
    sites = {e["site"] for e in received}
    assert {"hospital-a", "hospital-b"} <= sites
    for entry in received:
        heads = [k for k in entry["params"] if ".head." in f".{k}" or k.startswith("head.")]
        assert not heads, f"{entry['site']} sent its personal head: {heads}"
        assert any(k.startswith("mri") or "trunk" in k or "stream" in k for k in entry["params"]), entry["params"].keys()


def test_a_sites_own_clip_bounds_what_the_server_receives(policy_jobs):
    norms = {e["site"]: e["l2_norm"] for e in _audit(policy_jobs["result1"]) if e["params"]}
    assert norms["hospital-a"] <= CLIP_A * (1 + 1e-5), norms
    assert norms["hospital-b"] > CLIP_A, norms  # the default clip leaves a normal update alone


def test_a_site_requiring_encryption_refuses_a_plaintext_job(policy_jobs):
    received = {e["site"] for e in _audit(policy_jobs["result1"]) if e["params"]}
    assert "hospital-c" not in received
    assert "requires encrypted model updates" in policy_jobs["log_c"]
    assert policy_jobs["meta1"]["status"] == "FINISHED:COMPLETED"  # the others went on (min_clients 2)


def test_a_scope_no_site_defines_is_refused(policy_jobs):
    assert policy_jobs["meta2"]["status"] != "FINISHED:COMPLETED", policy_jobs["meta2"]
    assert "research" in policy_jobs["log_a2"] and "not allowed" in policy_jobs["log_a2"]
