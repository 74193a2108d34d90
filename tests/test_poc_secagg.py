"""Secure aggregation in a real POC (the shared consortium): signed keys, shares and masks through FLARE's
server; what the server received, kept by a curious server filter, is each site's masked vector and nothing
else; a site whose job process dies after the key setup and before its masked update costs no round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedbrain.contracts import AUDIT_FILE, SECAGG_MASKED
from fedbrain.jobs import classification
from fedbrain.poc.runner import run_jobs_side_by_side
from fedbrain_testing.faults import round_record, server_log
from poc_shared import classify_config

pytestmark = pytest.mark.poc

SITES = ("hospital-a", "hospital-b", "hospital-c")


def _edit(job: Path, app: str, edit) -> None:
    path = job / app / "config" / ("config_fed_server.json" if app == "app_server" else "config_fed_client.json")
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def _secagg_job(out: Path, name: str, **changes) -> Path:
    job = classification.export(classify_config(name=name, secagg=True, **changes), out, sites=SITES)
    meta = json.loads((job / "meta.json").read_text())
    meta["scope"] = "secagg"  # every site's final check then refuses anything but a masked update
    (job / "meta.json").write_text(json.dumps(meta, indent=2))
    def curious(config):  # after the server's audit, in its `train` chain (FLARE takes one chain per task)
        (chain,) = [c for c in config["task_result_filters"] if c["tasks"] == ["train"]]
        chain["filters"].append({"path": "fedbrain_testing.attack.CuriousServer", "args": {}})
    _edit(job, "app_server", curious)
    return job


@pytest.fixture(scope="module")
def secagg_jobs(shared_poc):
    poc, run_dir = shared_poc.ready().poc, shared_poc.run_dir / "secagg"
    jobs = {"curious": _secagg_job(run_dir / "jobs1", "poc_secagg")}
    lost = _secagg_job(run_dir / "jobs2", "poc_secagg_lost", min_clients=2, min_responses=2, min_trained_sites=2,
                       round_timeout=45, dead_site_grace=10)

    def crash(config):  # hospital-c dies in round 0 after the key setup, before its masked update
        config["task_result_filters"][0]["filters"].insert(0, {"path": "fedbrain_testing.attack.CrashBeforeSend",
                                                              "args": {"site": "hospital-c", "round_no": 0}})
    _edit(lost, "app_hospital-c", crash)
    jobs["lost"] = lost
    results = run_jobs_side_by_side(poc, jobs, run_dir / "results", max_active=2, timeout=600)
    missing = {name: meta.get("status") for name, (meta, path, _) in results.items() if path is None}
    assert not missing, f"secure-aggregation jobs did not finish: {missing}"
    return {name: (meta, path) for name, (meta, path, _) in results.items()}


def test_the_server_receives_only_masked_vectors_that_look_uniform(secagg_jobs):
    meta, result = secagg_jobs["curious"]
    assert meta["status"] == "FINISHED:COMPLETED", meta
    kept = sorted((result / "workspace" / "curious_server").glob("*.npz"))
    assert len(kept) == 2 * len(SITES), kept  # every site, both rounds
    for path in kept:
        with np.load(path) as arrays:
            assert list(arrays) == [SECAGG_MASKED], (path.name, list(arrays))
            masked = arrays[SECAGG_MASKED]
        assert masked.dtype == np.uint32 and masked.size == 65536
        counts = np.bincount((masked >> 24).astype(np.int64), minlength=256)  # top byte of every value
        assert stats.chisquare(counts).pvalue > 1e-4, path.name
    audit = [json.loads(line) for line in (result / "workspace" / AUDIT_FILE).read_text().splitlines()]
    assert {e["site"] for e in audit} == set(SITES)
    assert all(list(e["params"]) == [SECAGG_MASKED] and e["l2_norm"] is None for e in audit), audit[0]
    log = server_log(result)
    for round_no in (0, 1):
        assert f"round {round_no}: unmasked the sum of {list(SITES)}" in log
    assert all(r["published"] for r in round_record(result))


def test_a_site_lost_after_the_key_setup_costs_no_round(secagg_jobs):
    meta, result = secagg_jobs["lost"]
    assert meta["status"] == "FINISHED:COMPLETED", meta
    rounds = round_record(result)
    assert [r["round"] for r in rounds] == [0, 1] and all(r["published"] for r in rounds), rounds
    assert rounds[0]["aggregated"] == ["hospital-a", "hospital-b"] or sorted(rounds[0]["aggregated"]) == ["hospital-a", "hospital-b"]
    log = server_log(result)
    assert "round 0: unmasked the sum of ['hospital-a', 'hospital-b']; removed the masks of ['hospital-c']" in log
    assert "masking group ['hospital-a', 'hospital-b', 'hospital-c'], threshold 2" in log
