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


def make_result(tmp_path: Path, curves: dict[str, list[float]], final: dict[str, float] | None = None) -> Path:
    ws = tmp_path / "job-123" / "workspace"
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
    (ws.parent / "job_meta.json").write_text(json.dumps({"job_id": "job-123", "name": "fedbrain_segmentation", "status": "FINISHED:COMPLETED"}))
    return ws.parent


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
