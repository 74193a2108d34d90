"""Classification job in a real POC: personal heads never reach the server, and survive a new job.

Job 1 is the default algorithm (FedAvg of the shared part, personal heads); job 2 is SCAFFOLD on the
same consortium, which must load job 1's heads and send control differences for shared parts only.
"""

import json
from pathlib import Path

import pytest
from nvflare.app_common.app_constant import AlgorithmConstants

from fedbrain.demo import ClassifyDemoSettings, export_classification_job, prepare_classification_data
from fedbrain.poc.consortium import PocConsortium
from fedbrain.poc.runner import submit_and_wait
from fedbrain.report.job_report import build_report

pytestmark = pytest.mark.poc

SITES = ["hospital-a", "hospital-b", "hospital-c"]
IMAGE_SHAPE = (32, 40, 32)  # what the classifier's inputs are resampled to


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    """Job 1 (2 rounds) then a SCAFFOLD job 2 (2 rounds) on the same consortium: the heads must carry over."""
    run_dir = tmp_path_factory.mktemp("poc_cls")
    poc = PocConsortium(run_dir)
    settings = ClassifyDemoSettings(cases=8, rounds=2, local_epochs=1, seed=3)
    data = prepare_classification_data(run_dir / "data", poc.sites, settings)
    out = {"poc": poc}
    try:
        poc.up(data_dir=data)
        job1 = export_classification_job(run_dir / "jobs1", settings, poc.sites)
        out["meta1"], out["result1"] = submit_and_wait(poc, job1, rounds=2, result_dir=run_dir / "r1")
        out["heads_after_job1"] = {s: (poc.kit(s) / "personal" / "fedbrain_classification" / "head.pt").read_bytes()
                                   for s in SITES}
        job2 = export_classification_job(run_dir / "jobs2", ClassifyDemoSettings(rounds=2, local_epochs=1,
                                                                                algorithm="scaffold"), poc.sites)
        out["meta2"], out["result2"] = submit_and_wait(poc, job2, rounds=2, result_dir=run_dir / "r2")
        # Each site's own log of job 2, read on the site's disk (it stays at the hospital).
        out["site_logs2"] = {s: (poc.kit(s) / out["meta2"]["job_id"] / "log.txt").read_text(errors="replace")
                             for s in SITES}
    finally:
        poc.clean()
    yield out


def test_both_jobs_completed_with_per_site_metrics(two_jobs):
    assert two_jobs["meta1"]["status"] == "FINISHED:COMPLETED"
    assert two_jobs["meta2"]["status"] == "FINISHED:COMPLETED"
    report = build_report(two_jobs["result1"])
    assert report["task"] == "classification"
    assert set(report["sites"]) == set(SITES)
    for site, entry in report["sites"].items():
        assert len(entry["rounds"]) == 2
        assert entry["final_source"] == "final global model"
        assert 0.0 <= entry["final"]["val_acc"] <= 1.0, site


def _received(result) -> list[dict]:
    return [json.loads(line) for line in
            (Path(result) / "workspace" / "received_updates.jsonl").read_text().splitlines()]


def _is_head(name: str) -> bool:
    return name.startswith("head.") or ".head." in name


@pytest.mark.parametrize("job", ["result1", "result2"])
def test_server_never_received_a_head_or_anything_image_shaped(two_jobs, job):
    received = _received(two_jobs[job])
    assert sorted((r["site"], r["round"]) for r in received) == sorted((s, r) for s in SITES for r in (0, 1))
    for r in received:
        names = list(r["params"])
        assert names, r["site"]
        assert not [n for n in names if _is_head(n)], r["site"]
        for arrays in r["meta_arrays"].values():  # SCAFFOLD control differences
            assert not [n for n in arrays if _is_head(n)], r["site"]
        for name, p in r["params"].items():
            shape = p["shape"]
            # conv kernels are 3x3x3; an image (or a feature map of one) would carry its spatial size
            assert not (len(shape) >= 3 and max(shape[-3:]) >= min(IMAGE_SHAPE) // 4), (name, shape)


def test_heads_persist_across_jobs(two_jobs):
    for site in SITES:
        assert len(two_jobs["heads_after_job1"][site]) > 1000
    job1 = two_jobs["meta1"]["job_id"]
    logs = two_jobs["site_logs2"]
    for site in SITES:
        text = logs.get(site, "")
        assert "personal head loaded" in text and job1 in text, f"{site} did not reuse its head from job 1"


def test_scaffold_job_sends_control_differences_for_the_shared_part(two_jobs):
    assert two_jobs["meta2"]["status"] == "FINISHED:COMPLETED"
    for r in _received(two_jobs["result2"]):
        controls = r["meta_arrays"].get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF)
        assert controls, f"{r['site']} round {r['round']}: no SCAFFOLD control difference received"
        # one control per shared trainable parameter (buffers such as GroupNorm have none)
        assert set(controls) <= set(r["params"]) and len(controls) >= 0.5 * len(r["params"])
    report = build_report(two_jobs["result2"])
    assert set(report["sites"]) == set(SITES)
    assert all(len(e["rounds"]) == 2 for e in report["sites"].values())
