"""The per-site report from a job result folder laid out the way FLARE 2.9 writes it."""

import json
from pathlib import Path

import pytest

from fedbrain.cli import main as cli_main
from fedbrain.report.job_report import ReportError, build_report, flag_sites, write_report

SITES = ("hospital-a", "hospital-b", "hospital-c")


def _site_metrics(wt, n_skipped=0):
    vals = {"val_dice_tc": wt - 0.1, "val_dice_wt": wt, "val_dice_et": wt - 0.2, "n_train": 6, "n_val": 2, "n_skipped": n_skipped}
    vals["val_dice"] = (vals["val_dice_tc"] + wt + vals["val_dice_et"]) / 3
    return [{"name": k, "value": v} for k, v in vals.items()]


def make_result(tmp_path: Path, curves: dict[str, list[float]], final: dict[str, float] | None = None,
                job_id: str = "job-123", demo_meta: bool = True) -> Path:
    ws = tmp_path / job_id / "workspace"
    (ws / "metrics").mkdir(parents=True)
    rounds = len(next(iter(curves.values())))
    with open(ws / "metrics" / "round_metrics.jsonl", "w") as f:
        for r in range(rounds):
            sites = [{"name": s, "metrics": _site_metrics(curves[s][r], n_skipped=int(s == "hospital-b"))} for s in curves]
            agg = _site_metrics(sum(c[r] for c in curves.values()) / len(curves))
            f.write(json.dumps({"round": r, "aggregated_metrics": agg, "sites": sites}) + "\n")
    log = []
    for r in range(rounds):
        log.append({"asctime": f"2026-11-23 10:00:{10 * r:02d},000", "name": "FedAvg", "message": f"\n---\n  Round {r} started.  \n---\n"})
    log.append({"asctime": f"2026-11-23 10:00:{10 * rounds + 5:02d},000", "name": "FedAvg", "message": "=== Finished FedAvg. ==="})
    (ws / "log.json").write_text("\n".join(json.dumps(x) for x in log) + "\n")
    if final:
        cse = {s: {"SRV_FL_global_model.pt": {m["name"]: m["value"] for m in _site_metrics(v)}} for s, v in final.items()}
        (ws / "cross_site_val").mkdir()
        (ws / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(cse))
    (ws / "app_server").mkdir()
    (ws / "app_server" / "best_FL_global_model.pt").write_bytes(b"x")
    if demo_meta:  # what `fedbrain demo` writes beside the download: the admin API's get_job_meta
        (ws.parent / "job_meta.json").write_text(json.dumps({"job_id": job_id, "name": "fedbrain_segmentation", "status": "FINISHED:COMPLETED"}))
    return ws.parent


FLARE_JOB_ID = "5b1f3c2e-8d4a-4f7e-9c61-2a0d7e3b9f10"


def flare_meta(**changes) -> dict:
    """The job store's meta of a finished job, keys as FLARE 2.9 writes them (nvflare/apis/job_def.py JobMetaKey;
    values as JobDefManager.create and set_status write them)."""
    meta = {
        "name": "fedbrain_segmentation", "resource_spec": {}, "min_clients": 3,
        "deploy_map": {"app": ["@ALL"]}, "job_folder_name": "fedbrain_segmentation",
        "submitter_name": "admin@nvidia.com", "submitter_org": "nvidia", "submitter_role": "project_admin",
        "job_id": FLARE_JOB_ID, "data_storage_format": 2, "study": "default",
        "submit_time": 1795428000.123456, "submit_time_iso": "2026-11-23T10:00:00.123456+01:00",
        "start_time": "2026-11-23T09:00:02.500000+00:00", "duration": "0:01:05.250000",
        "status": "FINISHED:COMPLETED",
        "job_deploy_detail": ["server: OK", "hospital-a: OK", "hospital-b: OK", "hospital-c: OK"],
        "schedule_count": 1, "last_schedule_time": 1795428001.0,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def make_flare_download(tmp_path: Path, curves, meta: dict, final=None) -> Path:
    """A result laid out as `nvflare job download` / Session.download_job_result writes it: the server sends the
    job store's meta.json, job.zip and workspace.zip; the admin client unzips the zips into job/ and workspace/
    (nvflare/private/fed/server/job_cmds.py _download_job_comps, nvflare/fuel/hci/client/file_transfer.py)."""
    download = tmp_path / "transfer"
    job = make_result(download, curves, final, job_id=FLARE_JOB_ID, demo_meta=False)
    (job / "meta.json").write_text(json.dumps(meta, indent=4))
    # The server run folder's own meta.json: AppDeployer's copy from before the job was dispatched.
    deployed = flare_meta(status="SUBMITTED", start_time="", duration="N/A")
    (job / "workspace" / "meta.json").write_text(json.dumps(deployed, indent=4))
    definition = job / "job" / "fedbrain_segmentation"
    (definition / "app" / "config").mkdir(parents=True)
    (definition / "meta.json").write_text(json.dumps({"name": "fedbrain_segmentation", "deploy_map": {"app": ["@ALL"]}, "min_clients": 3}))
    return job


def test_report_per_site_curves_final_and_round_times(tmp_path):
    result = make_result(tmp_path, {s: [0.1, 0.5, 0.7] for s in SITES}, final={s: 0.8 for s in SITES})
    report = write_report(result, tmp_path / "out")
    assert report["status"] == "FINISHED:COMPLETED"
    assert report["rounds"] == 3
    a = report["sites"]["hospital-a"]
    assert [r["val_dice_wt"] for r in a["rounds"]] == [0.1, 0.5, 0.7]
    assert a["final"]["val_dice_wt"] == pytest.approx(0.8)  # final global evaluation wins over last round
    assert report["sites"]["hospital-b"]["n_skipped"] == 1
    assert [r["seconds"] for r in report["round_seconds"]] == [10.0, 10.0, 15.0]
    assert report["summary"]["mean_final_wt_dice"] == pytest.approx(0.8)
    for name in ("report.md", "report.json", "metrics_per_round.png", "final_by_site.png", "round_time.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| hospital-a |" in md and "![metrics_per_round](metrics_per_round.png)" in md


def test_low_site_is_flagged_against_the_others(tmp_path):
    curves = {"hospital-a": [0.1, 0.8], "hospital-b": [0.1, 0.78], "hospital-c": [0.1, 0.3]}
    report = build_report(make_result(tmp_path, curves))
    assert report["summary"]["flagged_sites"] == ["hospital-c"]
    assert "SD below" in report["sites"]["hospital-c"]["flag_reason"]
    assert not report["sites"]["hospital-a"]["flagged"]


def test_flagging_needs_a_real_gap():
    assert flag_sites({"a": 0.80, "b": 0.79, "c": 0.78}) == {}
    # Two near-equal sites give a tiny SD: a 7-point gap is not a problem site (the classify demo's case).
    assert flag_sites({"a": 0.75, "b": 0.722, "c": 0.667}) == {}
    assert set(flag_sites({"a": 0.75, "b": 0.722, "c": 0.60})) == {"c"}
    assert set(flag_sites({"a": 0.80, "b": 0.79, "c": 0.81, "d": 0.2})) == {"d"}


def test_not_a_job_result_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="round_metrics.jsonl"):
        build_report(tmp_path)


def test_cli_report_renders_any_downloaded_result(tmp_path, capsys):
    result = make_result(tmp_path, {s: [0.2, 0.6] for s in SITES})
    assert cli_main(["report", str(result)]) == 0
    assert (result / "report" / "report.md").is_file()


@pytest.mark.parametrize("given", ["job folder", "download folder", "workspace"])
def test_flare_download_reports_the_jobs_final_status_and_duration(tmp_path, given):
    """Regression: the report read workspace/meta.json (deploy-time copy) and showed "Status SUBMITTED, duration N/A"."""
    job = make_flare_download(tmp_path, {s: [0.1, 0.5, 0.7] for s in SITES}, flare_meta())
    result = {"job folder": job, "download folder": job.parent, "workspace": job / "workspace"}[given]
    report = write_report(result, tmp_path / "out")
    assert report["status"] == "FINISHED:COMPLETED"
    assert report["job_id"] == FLARE_JOB_ID
    assert report["duration"] == "0:01:05.250000"
    assert report["duration_s"] == pytest.approx(65.25)
    assert report["duration_source"] == "job meta"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Status **FINISHED:COMPLETED**, 3 rounds, duration 0:01:05.250000." in md
    assert "SUBMITTED" not in md and "N/A" not in md


@pytest.mark.parametrize("duration", ["N/A", None])
def test_flare_download_without_duration_takes_the_server_log_span(tmp_path, duration):
    # set_status leaves "N/A" for e.g. FINISHED:ABANDONED, or when start_time was never set.
    meta = flare_meta(duration=duration, start_time=None if duration is None else "")
    job = make_flare_download(tmp_path, {s: [0.1, 0.5, 0.7] for s in SITES}, meta)
    report = write_report(job, tmp_path / "out")
    assert report["status"] == "FINISHED:COMPLETED"
    assert report["duration_s"] == pytest.approx(35.0)  # 10:00:00 "Round 0 started" .. 10:00:35 "Finished FedAvg."
    assert report["duration"] == "0:00:35"
    assert report["duration_source"] == "server log"
    assert "duration 0:00:35 (span of the server log)." in (tmp_path / "out" / "report.md").read_text()


def test_demo_job_meta_still_wins_and_a_bare_deploy_copy_is_not_a_status(tmp_path):
    job = make_flare_download(tmp_path, {s: [0.2, 0.6] for s in SITES}, flare_meta())
    (job / "job_meta.json").write_text(json.dumps({**flare_meta(), "status": "FINISHED:ABORTED", "duration": "0:00:12"}))
    report = build_report(job)
    assert (report["status"], report["duration_s"]) == ("FINISHED:ABORTED", 12.0)
    (job / "job_meta.json").unlink()
    (job / "meta.json").unlink()  # only the deploy-time copy left: its SUBMITTED is not the job's status
    report = build_report(job)
    assert report["status"] == "unknown"
    assert report["job_id"] == FLARE_JOB_ID and report["job_name"] == "fedbrain_segmentation"


def test_cli_report_on_a_flare_download(tmp_path, capsys):
    job = make_flare_download(tmp_path, {s: [0.2, 0.6] for s in SITES}, flare_meta())
    assert cli_main(["report", str(job.parent)]) == 0
    out = capsys.readouterr().out
    assert "FINISHED:COMPLETED" in out and "SUBMITTED" not in out
    assert "duration 0:01:05.250000" in (job.parent / "report" / "report.md").read_text()


def test_a_site_without_a_value_is_never_the_minimum_and_its_reason_is_listed(tmp_path):
    """Two sites without usable data (issue 29): before, the report named a site that had no value as
    the minimum site, with the other site's figure (NaN compares false, so min() kept the first site)."""
    result = make_result(tmp_path, {s: [0.2, 0.8] for s in SITES})
    path = result / "workspace" / "metrics" / "round_metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        for site in row["sites"]:
            if site["name"] in ("hospital-a", "hospital-b"):  # no data: site_error, no Dice
                site["metrics"] = [{"name": "site_error", "value": 1}, {"name": "n_train", "value": 0}]
            if site["name"] == "hospital-c":
                site["metrics"] = _site_metrics(0.013)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = build_report(result)
    s = report["summary"]
    assert s["min_site"] == "hospital-c" and s["min_final"] == pytest.approx(0.013)
    assert sorted(s["sites_without_value"]) == ["hospital-a", "hospital-b"]
    assert all("site error" in why for why in s["sites_without_value"].values())
    md = (write_report(result, tmp_path / "out") and (tmp_path / "out" / "report.md").read_text())
    assert "**hospital-b: no value** (site error" in md and "(hospital-c)" in md


def test_an_unbounded_epsilon_is_shown_as_infinity(tmp_path):
    """A budgeted site that released without DP sends dp_epsilon_unbounded (FLARE drops an infinite number
    from its metrics file); the report and `fedbrain watch` show epsilon as ∞, not as missing."""
    import math

    from fedbrain.contracts import SITE_METRICS_LOG_TAG
    from fedbrain.fl.progress import parse_log

    result = make_result(tmp_path, {"hospital-a": [0.5, 0.6], "hospital-b": [0.4, 0.5]})
    path = result / "workspace" / "metrics" / "round_metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["sites"][0]["metrics"] += [{"name": "dp_epsilon_unbounded", "value": 1}]
        row["sites"][1]["metrics"] += [{"name": "dp_epsilon_spent", "value": 2.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_report(result)
    assert report["privacy"]["hospital-a"]["final_epsilon"] == math.inf
    assert report["privacy"]["hospital-b"]["final_epsilon"] == 2.5
    write_report(result, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| 1 | ∞ | 2.500 |" in text, text
    line = f'{SITE_METRICS_LOG_TAG} {{"site": "hospital-a", "round": 1, "metrics": {{"dp_epsilon_unbounded": 1}}}}'
    assert parse_log(line)["site_metrics"]["hospital-a"]["dp_epsilon_spent"] == math.inf
