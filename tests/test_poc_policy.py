"""Site-enforced privacy in a real POC (FLARE applies site policies only with real processes).

Sites as provisioned by fedbrain (the session's shared POC), then each hospital's own choices, after
which it restarts (FLARE reads its policy at start-up):
hospital-a tightens its `standard` scope's update-norm clip to 0.5; hospital-b keeps the
defaults; hospital-c makes `encrypted` its default scope. Then:

1. a plaintext FedAvg classifier job at a and b that shares *everything* (``--algorithm fedavg``)
   and names no scope: both apply their default `standard` scope, so no personal head reaches the
   server anyway (each site keeps and trains it as its own, and says so), and hospital-a's update arrives
   clipped to its own bound;
2. the same job at all three, needing 2 answers a round: hospital-c refuses to release plaintext,
   nothing of its update arrives, the server records its one-line reason, and the job completes with
   the two others (a careful hospital does not end everyone's job);
3. a job naming a scope no site defines ("research") is refused;
4. a job naming `standard` at hospital-c, which made `encrypted` its default but (like a hospital that
   edits only ``default_scope``) still defines `standard`: FLARE would apply `standard`; hospital-c's
   final check refuses it at job start because it is weaker than the site's default, and never trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbrain.contracts import AUDIT_FILE
from fedbrain.jobs.classification import export
from fedbrain.poc.runner import run_jobs_side_by_side, submit_and_wait
from fedbrain.report.job_report import build_report
from fedbrain.tasks.classification import ClassificationConfig

pytestmark = pytest.mark.poc

CLIP_A = 0.02  # a classifier update after one epoch has norm ~0.2


def _edit_policy(default_scope: str | None = None, clip: float | None = None):
    def edit(policy: dict) -> None:
        if default_scope:
            policy["default_scope"] = default_scope
        if clip is not None:
            for f in next(s for s in policy["scopes"] if s["name"] == "standard")["task_result_filters"]:
                if f["path"].endswith("UpdateNormClip"):
                    f["args"]["max_norm"] = clip
    return edit


@pytest.fixture(scope="module")
def policy_jobs(shared_poc):
    """On the shared POC: hospital-a and hospital-c change their policies and restart (FLARE reads
    them at start-up); the originals come back, with a restart, when the module is done."""
    poc, run_dir = shared_poc.ready().poc, shared_poc.run_dir / "policy"
    task = ClassificationConfig(name="poc_policy", rounds=1, epochs_per_round=1, seed=5, algorithm="fedavg",
                                min_clients=2, min_trained_sites=2)
    out = {"poc": poc}
    try:
        shared_poc.change_policy("hospital-a", _edit_policy(clip=CLIP_A))
        shared_poc.change_policy("hospital-c", _edit_policy(default_scope="encrypted"))
        job = export(task, run_dir / "jobs_ab", sites=["hospital-a", "hospital-b"])
        out["meta1"], out["result1"] = submit_and_wait(poc, job, rounds=1, result_dir=run_dir / "r1")
        # min_clients 3: the server waits for hospital-c's answer (else a and b may end the round first);
        # min_responses 2: a round closes with the two others.
        job = export(task.replace(min_clients=3, min_responses=2), run_dir / "jobs_abc", sites=poc.sites)
        out["meta2"], out["result2"] = submit_and_wait(poc, job, rounds=1, result_dir=run_dir / "r2")
        out["log_c"] = (poc.kit("hospital-c") / out["meta2"]["job_id"] / "log.txt").read_text(errors="replace")
        _set_scope(job, "research")
        weaker = _set_scope(export(task.replace(name="poc_policy_weaker", min_clients=1, min_responses=1),
                                   run_dir / "jobs_c", sites=["hospital-c"]), "standard")
        results = run_jobs_side_by_side(poc, {"research": job, "weaker": weaker}, run_dir / "r34", max_active=2,
                                        timeout=300)
        out["meta3"] = results["research"][0]
        out["server_log3"] = (poc.kit("localhost") / "log.txt").read_text(errors="replace")
        out["meta4"], out["result4"] = results["weaker"][:2]
        out["log_c4"] = (poc.kit("hospital-c") / out["meta4"]["job_id"] / "log.txt").read_text(errors="replace")
    finally:
        shared_poc.restore_policies()
    return out


def _set_scope(job: Path, scope: str) -> Path:
    meta = json.loads((job / "meta.json").read_text())
    (job / "meta.json").write_text(json.dumps({**meta, "scope": scope}))
    return job


def _audit(result: Path) -> list[dict]:
    path = Path(result) / "workspace" / AUDIT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_default_scope_excludes_the_head_even_from_a_fedavg_job(policy_jobs):
    received = [e for e in _audit(policy_jobs["result1"]) if e["params"]]
    sites = {e["site"] for e in received}
    assert {"hospital-a", "hospital-b"} <= sites
    for entry in received:
        heads = [k for k in entry["params"] if ".head." in f".{k}" or k.startswith("head.")]
        assert not heads, f"{entry['site']} sent its personal head: {heads}"
        assert any(k.startswith("mri") or "trunk" in k or "stream" in k for k in entry["params"]), entry["params"].keys()
    # The head the scope keeps is the site's own: trained and kept there, and the admin told why (without it the
    # server would hand back its untrained head every round, and each site would validate a random head).
    notes = build_report(policy_jobs["result1"])["site_notes"]
    for site in ("hospital-a", "hospital-b"):
        assert any("trained them as its own" in n and "algorithm fedavg" in n for n in notes.get(site, [])), (site, notes)
        assert (policy_jobs["poc"].kit(site) / "personal" / "poc_policy" / "head.pt").stat().st_size > 1000, site


def test_a_sites_own_clip_bounds_what_the_server_receives(policy_jobs):
    norms = {e["site"]: e["l2_norm"] for e in _audit(policy_jobs["result1"]) if e["params"]}
    assert norms["hospital-a"] <= CLIP_A * (1 + 1e-5), norms
    assert norms["hospital-b"] > CLIP_A, norms  # the default clip leaves a normal update alone


def test_the_job_at_a_and_b_completed(policy_jobs):
    assert policy_jobs["meta1"]["status"] == "FINISHED:COMPLETED"


def test_a_site_requiring_encryption_refuses_a_plaintext_job_and_the_others_go_on(policy_jobs):
    audit = _audit(policy_jobs["result2"])
    assert not [e for e in audit if e["site"] == "hospital-c" and e.get("params")]
    (refused,) = [e for e in audit if e.get("refused")]
    assert refused["site"] == "hospital-c" and "requires encrypted model updates" in refused["refused"]
    assert "requires encrypted model updates" in policy_jobs["log_c"]
    assert policy_jobs["meta2"]["status"] == "FINISHED:COMPLETED", policy_jobs["meta2"]
    assert {e["site"] for e in audit if e.get("params")} == {"hospital-a", "hospital-b"}
    server_log = (Path(policy_jobs["result2"]) / "workspace" / "log.txt").read_text(errors="replace")
    assert "hospital-c sent no update: site hospital-c requires encrypted model updates" in server_log
    assert "UNSAFE_JOB" not in server_log


def test_a_scope_no_site_defines_is_refused(policy_jobs):
    assert policy_jobs["meta3"]["status"] != "FINISHED:COMPLETED", policy_jobs["meta3"]
    # FLARE refuses it at deployment: the reason is in the job's deploy detail and the server log.
    detail = " ".join(policy_jobs["meta3"].get("job_deploy_detail", []))
    assert "privacy scope 'research' is not allowed" in detail + policy_jobs["server_log3"], detail


def test_a_job_naming_a_scope_weaker_than_the_sites_default_is_refused_there(policy_jobs):
    """hospital-c's default is `encrypted`; the job names `standard`, which hospital-c still defines. Its final
    check refuses at job start (one line, no training) and the server receives the reason, not an update."""
    weaker = "privacy scope 'standard', weaker than this site's default 'encrypted' (it lacks require_encryption)"
    assert [line for line in policy_jobs["log_c4"].splitlines() if weaker in line and "will not train" in line]
    audit = _audit(policy_jobs["result4"])
    assert audit and all(e["site"] == "hospital-c" and not e.get("params") for e in audit), audit
    assert all(weaker in e["refused"] for e in audit), audit
