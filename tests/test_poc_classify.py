"""Classification job in a real POC: personal heads never reach the server, and survive a new job.

Job 1 is the default algorithm (FedAvg of the shared part, personal heads); job 2 is SCAFFOLD on the
same consortium, which must load job 1's heads and send control differences for shared parts only. Beside
job 2 runs a job of algorithm mixed under the same name: its shared head is federated, its personal
correction is not, and it neither loads nor overwrites job 1's heads.
"""

import itertools
import json
import math
from pathlib import Path

import pytest
from nvflare.app_common.app_constant import AlgorithmConstants

from fedbrain.contracts import GRADES
from fedbrain.report.job_report import build_report, find_workspace

pytestmark = pytest.mark.poc

SITES = ["hospital-a", "hospital-b", "hospital-c"]
IMAGE_SHAPE = (32, 40, 32)  # what the classifier's inputs are resampled to


@pytest.fixture(scope="module")
def two_jobs(shared_poc, first_wave, second_wave):
    """Job 1 (2 rounds, the shared POC's first wave) then a SCAFFOLD job 2 (2 rounds, its second wave)
    under the same job name on the same consortium: the heads must carry over."""
    poc = shared_poc.poc
    out = {"poc": poc, "data": shared_poc.cls_data}  # <site>/datalist.json: what each site trains and validates on
    out["meta1"], out["result1"], _ = first_wave["classify"]
    out["heads_after_job1"] = second_wave["classify_heads_after_job1"]
    out["meta2"], out["result2"], _ = second_wave["classify_scaffold"]
    out["meta_mixed"], out["result_mixed"], _ = second_wave["classify_mixed"]
    # Each site's own log of job 2, read on the site's disk (it stays at the hospital).
    out["site_logs2"] = {s: (poc.kit(s) / out["meta2"]["job_id"] / "log.txt").read_text(errors="replace")
                         for s in SITES}
    out["site_logs_mixed"] = {s: (poc.kit(s) / out["meta_mixed"]["job_id"] / "log.txt").read_text(errors="replace")
                              for s in SITES}
    out["stores"] = {s: poc.kit(s) / "personal" / "poc_classify" for s in SITES}
    return out


def test_both_jobs_completed_with_per_site_metrics(two_jobs):
    assert two_jobs["meta1"]["status"] == "FINISHED:COMPLETED"
    assert two_jobs["meta2"]["status"] == "FINISHED:COMPLETED"
    report = build_report(two_jobs["result1"])
    assert report["task"] == "classification"
    assert set(report["sites"]) == set(SITES)
    for entry in report["sites"].values():
        assert len(entry["rounds"]) == 2
        assert entry["final_source"] == "final global model"
    _check_site_metrics(report, two_jobs["result1"], two_jobs["data"])


def _possible_scores(grades: list[str]) -> list[tuple[float, float]]:
    """Every (accuracy, balanced accuracy) a classifier can reach on validation cases of these grades:
    k_c of the n_c cases of each present class right -> (sum k_c / sum n_c, mean of k_c / n_c)."""
    counts = [grades.count(g) for g in GRADES if g in grades]
    return [(sum(right) / sum(counts), sum(k / n for k, n in zip(right, counts)) / len(counts))
            for right in itertools.product(*(range(n + 1) for n in counts))]


def _check_site_metrics(report: dict, result_dir, data_dir: Path) -> None:
    """Each site's report entry is what that site reported, on exactly its own validation cases.

    The final metrics equal the site's row of FLARE's cross_val_results.json; n_train / n_val
    equal the site's datalist; every accuracy and balanced accuracy (final and per round) is one
    a classifier can score on that site's validation grades (so acc is a multiple of 1/n_val);
    AUC is reported exactly when the validation cases hold two or more grades.
    """
    cross_val = json.loads((find_workspace(result_dir) / "cross_site_val" / "cross_val_results.json").read_text())
    for site, entry in report["sites"].items():
        datalist = json.loads((Path(data_dir) / site / "datalist.json").read_text())
        train, val = datalist["training"], datalist["validation"]
        grades = [item["grade"] for item in val]
        assert val, f"{site}: no validation case in its datalist"
        assert (entry.get("n_train"), entry.get("n_val"), entry.get("n_skipped")) == (len(train), len(val), 0), site

        reported = [m for name, m in cross_val[site].items() if "best" not in name.lower()]
        assert len(reported) == 1, (site, list(cross_val[site]))
        final = entry["final"]
        assert final == {k: float(v) for k, v in reported[0].items() if isinstance(v, (int, float))}, site
        assert final["n_val"] == len(val) and final["n_train"] == len(train), site

        possible = _possible_scores(grades)
        several = len(set(grades)) > 1
        for when, m in [("final", final)] + [(f"round {r['round']}", r) for r in entry["rounds"]]:
            acc, bacc = m.get("val_acc"), m.get("val_bacc")
            assert acc is not None and bacc is not None, (site, when, m)
            assert any(math.isclose(acc, a, abs_tol=1e-9) and math.isclose(bacc, b, abs_tol=1e-9)
                       for a, b in possible), f"{site} {when}: acc {acc}, bacc {bacc} impossible on grades {grades}"
            auc = m.get("val_auc")
            assert (auc is not None) == several, (site, when, auc, grades)
            assert auc is None or 0.0 <= auc <= 1.0, (site, when, auc)


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


def test_mixed_heads_federate_the_shared_head_and_keep_the_correction(two_jobs):
    """What the server received from the mixed job: the shared head, every round, from every site; never a
    personal head. Each site kept its correction in its own file, started it fresh (not from job 1's whole
    head, which job 2 loaded and which is still there) and reports as the other jobs do."""
    assert two_jobs["meta_mixed"]["status"] == "FINISHED:COMPLETED"
    received = _received(two_jobs["result_mixed"])
    assert sorted((r["site"], r["round"]) for r in received) == sorted((s, r) for s in SITES for r in (0, 1))
    for r in received:
        names = list(r["params"])
        assert not [n for n in names if _is_head(n)], r["site"]
        assert [n for n in names if n.startswith("shared_head.")], f"{r['site']}: the shared head was not federated"
    for site in SITES:
        store = two_jobs["stores"][site]
        assert (store / "head_correction.pt").stat().st_size > 1000 and (store / "head.pt").is_file()
        assert "head_correction.pt yet; starting from the global initial head" in two_jobs["site_logs_mixed"][site], site
    assert set(build_report(two_jobs["result_mixed"])["sites"]) == set(SITES)
