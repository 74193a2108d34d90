"""End to end with real parts: provisioned POC (mTLS kits), real server and site processes,
the exported segmentation job submitted through the admin API, the result checked on disk.
The consortium is the session's shared one (tests/poc_shared.py), whose teardown fails the
session if any process of its workspace survives or the workspace is left behind."""

import json
from pathlib import Path

import pytest

from fedbrain.report.job_report import build_report
from poc_shared import SEG_ROUNDS as ROUNDS

pytestmark = pytest.mark.poc


@pytest.fixture(scope="module")
def finished_job(shared_poc, first_wave, second_wave):
    """The clean segmentation job of the shared POC's first wave (hospital-b holds one broken case;
    test_poc_attacks uses the same job as its clean baseline), then the second wave's job in which
    hospital-c's IT points it at a datalist that is not there."""
    meta, result, _ = first_wave["attack_clean"]
    bad_meta, bad_result, _ = second_wave["e2e_bad_site"]
    return {"meta": meta, "result": result, "poc": shared_poc.poc, "bad_site": (bad_meta, bad_result),
            **shared_poc.user_state_before}


def test_job_completed_through_admin_api(finished_job):
    meta = finished_job["meta"]
    assert meta["status"] == "FINISHED:COMPLETED"
    assert meta["submitter_role"] == "project_admin"
    assert sorted(d.split(":")[0] for d in meta["job_deploy_detail"]) == ["hospital-a", "hospital-b", "hospital-c", "server"]


def test_every_site_improved_over_round_zero(finished_job):
    report = build_report(finished_job["result"])
    assert set(report["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
    for site, entry in report["sites"].items():
        assert len(entry["rounds"]) == ROUNDS, site
        first, last = entry["first"]["val_dice"], entry["final"]["val_dice"]
        assert last > first + 0.05, f"{site}: Dice {first:.3f} -> {last:.3f}"


def test_bad_case_skipped_and_reported(finished_job):
    report = build_report(finished_job["result"])
    assert report["sites"]["hospital-b"]["n_skipped"] == 1
    assert report["sites"]["hospital-a"]["n_skipped"] == 0


def test_metrics_and_best_model_present(finished_job):
    ws = Path(finished_job["result"]) / "workspace"
    assert (ws / "app_server" / "best_FL_global_model.pt").is_file()
    assert (ws / "app_server" / "FL_global_model.pt").is_file()
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        assert list((ws / "tb_events" / site).glob("events.out.tfevents.*")), site
    final = json.loads((ws / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(final) == {"hospital-a", "hospital-b", "hospital-c"}


def test_user_flare_config_untouched(finished_job):
    real = finished_job["real_nvflare"]
    after = real.exists() and sorted(p.name for p in real.iterdir())
    assert after == finished_job["real_before"]
    assert Path("/tmp/nvflare").exists() == finished_job["tmp_nvflare_before"]


def test_a_misconfigured_site_does_not_take_the_federation_down(finished_job):
    meta, result = finished_job["bad_site"]
    assert meta["status"] == "FINISHED:COMPLETED"
    rows = [json.loads(line) for line in (Path(result) / "workspace" / "metrics" / "round_metrics.jsonl").read_text().splitlines()]
    sites = {s["name"]: {m["name"]: m["value"] for m in s["metrics"]} for s in rows[0]["sites"]}
    assert sites["hospital-c"]["site_error"] == 1 and sites["hospital-c"]["train_steps"] == 0
    assert "val_dice" not in sites["hospital-c"]  # nothing to validate on: no made-up number
    for ok in ("hospital-a", "hospital-b"):
        assert sites[ok]["site_error"] == 0 and sites[ok]["train_steps"] > 0


def test_the_admin_reads_why_a_site_has_no_data_without_its_paths(finished_job):
    """hospital-c's IT pointed it at a datalist that is not there: the reason reaches the server's log, the audit
    and the report, with the site's path replaced (issue 29: reasons that reach the admin)."""
    from fedbrain.contracts import AUDIT_FILE

    meta, result = finished_job["bad_site"]
    audit = [json.loads(line) for line in (Path(result) / "workspace" / AUDIT_FILE).read_text().splitlines()]
    notes = {n for e in audit if e["site"] == "hospital-c" for n in e.get("notes", [])}
    assert notes == {"cannot use its data: <site path>: datalist file not found"}, notes
    assert not [e for e in audit if e["site"] != "hospital-c" and e.get("notes")]
    report = build_report(Path(result))
    assert report["summary"]["sites_without_value"]["hospital-c"] == (
        "site error: cannot use its data: <site path>: datalist file not found")
    log = (Path(result) / "workspace" / "log.txt").read_text(errors="replace")
    assert "hospital-c: cannot use its data: <site path>: datalist file not found" in log
    assert "missing/datalist.json" not in json.dumps(audit) + json.dumps(report)


def test_a_round_with_fewer_trained_sites_than_the_minimum_is_not_published(finished_job):
    """The misconfigured site's job: two sites trained, min_trained_sites 3 (the default): the server keeps
    the global model as it was, its round record and the report say why, and the sites saw no new model."""
    from fedbrain.contracts import ROUND_FILE

    meta, result = finished_job["bad_site"]
    (record,) = [json.loads(line) for line in (Path(result) / "workspace" / ROUND_FILE).read_text().splitlines()]
    assert record["accepted"] and record["published"] is False
    assert sorted(record["trained"]) == ["hospital-a", "hospital-b"] and record["min_trained_sites"] == 3
    assert record["why_unpublished"].startswith("2 trained site(s) (hospital-a, hospital-b), fewer than min_trained_sites 3")
    assert build_report(Path(result))["unpublished"] == [{"round": 0, "why": record["why_unpublished"]}]
    log = (Path(result) / "workspace" / "log.txt").read_text(errors="replace")
    assert "round 0 not published: 2 trained site(s)" in log


def test_the_server_log_carries_each_sites_round_metrics_for_watch(finished_job):
    """What `fedbrain watch` shows per site comes from the server's job log (the update audit's lines)."""
    from fedbrain.fl.progress import parse_log
    from fedbrain.ops.status import _metrics_table

    log = (Path(finished_job["result"]) / "workspace" / "log.txt").read_text(errors="replace")
    latest = parse_log(log)["site_metrics"]
    assert set(latest) == {"hospital-a", "hospital-b", "hospital-c"}
    for site, m in latest.items():
        assert m["round"] == ROUNDS - 1 and 0.0 <= m["val_dice"] <= 1.0 and m["site_error"] == 0.0, (site, m)
    bad = parse_log((Path(finished_job["bad_site"][1]) / "workspace" / "log.txt").read_text(errors="replace"))["site_metrics"]
    assert bad["hospital-c"]["site_error"] == 1.0

    from io import StringIO

    from rich.console import Console

    out = StringIO()
    Console(file=out, width=140).print(_metrics_table({"job_id": "j", "site_metrics": bad}))
    assert "site error (its data could not be used)" in out.getvalue()


def test_a_dp_job_from_a_public_start_moves_only_its_declared_part(second_wave, shared_poc):
    """The server started from the start the job carried, and what the sites released under DP-SGD and
    client-level DP changed the declared part only: every frozen parameter of the final global model is the
    start's, bit for bit (client-level noise there would have moved it)."""
    import torch

    from fedbrain.models import start as start_mod
    from poc_shared import DP_START_JOB

    meta, result, _ = second_wave["dp_start"]
    assert meta["status"] == "FINISHED:COMPLETED"
    start = start_mod.load(shared_poc.run_dir / "start")
    weights = start.state_dict()
    saved = torch.load(result / "workspace" / "app_server" / "FL_global_model.pt", weights_only=False)
    final = saved.get("model", saved)
    part = set(DP_START_JOB.replace(start_model=start.reference).trainable_names(weights))
    assert part and len(part) < len(weights)
    frozen = [k for k in weights if k not in part]
    assert all(torch.equal(torch.as_tensor(final[k]), weights[k]) for k in frozen)
    assert all(not torch.equal(torch.as_tensor(final[k]), weights[k]) for k in part)  # the round was published
    report = build_report(result)
    assert report["start_model"]["sha256"] == start.sha256
