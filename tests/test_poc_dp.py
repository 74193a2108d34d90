"""Differential privacy in a real POC: the hospital's budget and require_dp (local/fedbrain_site.json)
stop a site's updates while the job completes with the others; epsilon per site per round in the report
equals Opacus' accountant computed offline; the ledger lives in the site's kit, so a site whose machine
went down and came back through its start script goes on from what it had spent, in the next job too."""

import json
import math

import pytest
from opacus.accountants import RDPAccountant

from fedbrain.contracts import DP_EPSILON_SPENT, DP_WITHHELD, SITE_METRICS_LOG_TAG, TRAIN_STEPS
from fedbrain.data.datalist import load_datalist
from fedbrain.demo import ClassifyDemoSettings, export_job, prepare_classification_data
from fedbrain.contracts import AUDIT_FILE
from fedbrain_testing.faults import kill_participant, start_participant
from fedbrain.poc.runner import submit_and_wait
from fedbrain.privacy.budget import BUDGET_EXHAUSTED, DP_REQUIRED, LEDGER_BROKEN
from fedbrain.privacy.ledger import PrivacyLedger
from fedbrain.report.job_report import build_report

pytestmark = pytest.mark.poc

ROUNDS, NOISE, DELTA, BATCH = 3, 1.0, 1e-5, 4


def _epsilon(steps: int, q: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=NOISE, sample_rate=q)
    return acc.get_epsilon(DELTA)


def _site_round(n_train: int) -> tuple[int, float]:
    """Steps per round (1 epoch) and the Poisson rate of a site with ``n_train`` cases."""
    steps = math.ceil(n_train / BATCH)
    return steps, 1.0 / steps


def _rows(result):
    lines = (result / "workspace" / "metrics" / "round_metrics.jsonl").read_text().splitlines()
    return [{s["name"]: {m["name"]: m["value"] for m in s["metrics"]} for s in json.loads(line)["sites"]}
            for line in lines]


@pytest.fixture(scope="module")
def dp_jobs(shared_poc):
    """On the shared POC, with this module's own classification cohort (so its own privacy ledger);
    every site's local config is put back afterwards."""
    poc, run_dir = shared_poc.ready().poc, shared_poc.run_dir / "dp"
    task = ClassifyDemoSettings().task.replace(name="poc_dp", rounds=ROUNDS, epochs_per_round=1, batch_size=BATCH,
                                               dp_noise_multiplier=NOISE, dp_delta=DELTA)
    settings = ClassifyDemoSettings(cases=8, seed=5, task=task)
    data = prepare_classification_data(run_dir / "data", poc.sites, settings, cohort="DP")  # its own patients
    n_train = {s: len(load_datalist(data / s / "datalist.json")["training"]) for s in poc.sites}
    steps, q = _site_round(n_train["hospital-c"])
    out = {"poc": poc, "n_train": n_train}

    def site_config(site, **privacy):
        shared_poc.site_config(site, datalists={"classification": str(data / site / "datalist.json")}, **privacy)

    try:
        for site in poc.sites:
            site_config(site)
        # hospital-c's budget allows one round; hospital-b refuses jobs without DP.
        out["budget"] = (_epsilon(steps, q) + _epsilon(2 * steps, q)) / 2
        site_config("hospital-c", dp_budget={"epsilon": out["budget"], "delta": DELTA})
        site_config("hospital-b", require_dp=True)
        job1 = export_job(run_dir / "jobs1", settings, poc.sites)
        out["meta1"], out["result1"] = submit_and_wait(poc, job1, rounds=ROUNDS, result_dir=run_dir / "r1")
        # hospital-a's machine goes down and comes back through its kit's start script; a later DP job
        # on the same data goes on from the ledger in its kit (FLARE 2.9 does not take a restarted site
        # back into the job it left, so the next job is where a restart shows).
        out["killed"] = kill_participant(poc, "hospital-a")
        out["back_after_s"] = start_participant(poc, "hospital-a")
        # Someone edits hospital-b's ledger by hand (one release made smaller): the next DP job is refused there.
        ledger_b = PrivacyLedger(poc.kit("hospital-b"))
        original_b = ledger_b.path.read_text()
        lines = original_b.splitlines()
        lines[1] = lines[1].replace('"steps": [[', '"steps": [[0.0, 0.0, 0], [', 1)
        ledger_b.path.write_text("\n".join(lines) + "\n")
        # ... and hospital-c's, whose budget the first job spent, is deleted (a fresh start would reset it).
        ledger_c = PrivacyLedger(poc.kit("hospital-c"))
        original_c = ledger_c.path.read_bytes()
        ledger_c.path.unlink()
        job2 = export_job(run_dir / "jobs2", ClassifyDemoSettings(cases=8, seed=5, task=task.replace(rounds=1)),
                          poc.sites)
        out["meta2"], out["result2"] = submit_and_wait(poc, job2, rounds=1, result_dir=run_dir / "r2")
        out["log_b2"], out["log_c2"] = ((poc.kit(s) / out["meta2"]["job_id"] / "log.txt").read_text(errors="replace")
                                        for s in ("hospital-b", "hospital-c"))
        out["ledger_c_recreated"] = ledger_c.path.exists()
        ledger_b.path.write_text(original_b)  # the hospitals restore their ledgers from their backups
        ledger_c.path.write_bytes(original_c)
        plain = ClassifyDemoSettings(task=ClassifyDemoSettings().task.replace(name="poc_dp_plain", rounds=1,
                                                                              epochs_per_round=1))
        # Every hospital now requires DP: a job without it has no site left to learn from.
        for site in poc.sites:
            site_config(site, require_dp=True)
        job3 = export_job(run_dir / "jobs3", ClassifyDemoSettings(task=plain.task.replace(rounds=3)), poc.sites)
        out["meta3"], out["result3"] = submit_and_wait(poc, job3, rounds=3, result_dir=run_dir / "r3")
        out["log_c"] = (poc.kit("hospital-c") / out["meta1"]["job_id"] / "log.txt").read_text(errors="replace")
        out["logs3"] = {s: (poc.kit(s) / out["meta3"]["job_id"] / "log.txt").read_text(errors="replace")
                        for s in poc.sites}
        out["ledgers"] = {s: PrivacyLedger(poc.kit(s)) for s in poc.sites}
    finally:
        shared_poc.reset_site_configs()
    return out


def test_jobs_complete_with_the_other_sites(dp_jobs):
    assert dp_jobs["meta1"]["status"] == "FINISHED:COMPLETED"
    assert dp_jobs["meta2"]["status"] == "FINISHED:COMPLETED"


def test_budget_exhausted_site_stops_releasing(dp_jobs):
    rows = _rows(dp_jobs["result1"])
    assert len(rows) == ROUNDS
    c = [r["hospital-c"] for r in rows]
    assert c[0][TRAIN_STEPS] > 0 and DP_WITHHELD not in c[0]
    for later in c[1:]:
        assert later[TRAIN_STEPS] == 0 and later[DP_WITHHELD] == BUDGET_EXHAUSTED
        assert later[DP_EPSILON_SPENT] == c[0][DP_EPSILON_SPENT] <= dp_jobs["budget"]
    for site in ("hospital-a", "hospital-b"):
        assert all(r[site][TRAIN_STEPS] > 0 for r in rows), site
    assert dp_jobs["log_c"].count("privacy budget exhausted") == 1
    report = build_report(dp_jobs["result1"])
    assert [w["round"] for w in report["privacy"]["hospital-c"]["withheld"]] == [1, 2]


def test_epsilon_per_round_equals_opacus_offline(dp_jobs):
    rows = _rows(dp_jobs["result1"])
    for site in ("hospital-a", "hospital-b"):
        steps, q = _site_round(dp_jobs["n_train"][site])
        for k, row in enumerate(rows, start=1):
            assert row[site][DP_EPSILON_SPENT] == pytest.approx(_epsilon(k * steps, q), rel=1e-6), (site, k)
    report = build_report(dp_jobs["result1"])
    assert set(report["privacy"]) == {"hospital-a", "hospital-b", "hospital-c"}


def test_a_restarted_site_goes_on_from_its_ledger(dp_jobs):
    """After hospital-a's restart, the next job's epsilon composes all its steps (not one round's)."""
    assert dp_jobs["killed"] and dp_jobs["back_after_s"] > 0
    (row,) = _rows(dp_jobs["result2"])
    steps, q = _site_round(dp_jobs["n_train"]["hospital-a"])
    assert row["hospital-a"][TRAIN_STEPS] == steps
    assert row["hospital-a"][DP_EPSILON_SPENT] == pytest.approx(_epsilon((ROUNDS + 1) * steps, q), rel=1e-6)
    assert row["hospital-a"][DP_EPSILON_SPENT] > 1.5 * _epsilon(steps, q)  # a reset would report one round


def test_a_ledger_edited_by_hand_refuses_the_next_dp_job_at_that_site_in_one_line(dp_jobs):
    (row,) = _rows(dp_jobs["result2"])
    assert row["hospital-b"][TRAIN_STEPS] == 0 and row["hospital-b"][DP_WITHHELD] == LEDGER_BROKEN
    lines = [line for line in dp_jobs["log_b2"].splitlines() if "does not follow the one before" in line]
    assert len(lines) == 1 and "no job may use this site's privacy budget until it is restored" in lines[0]


def test_a_deleted_ledger_does_not_give_a_spent_budget_back(dp_jobs):
    """hospital-c spent its budget in the first job; its ledger is then deleted by hand. The next DP job is
    refused there in one line (the head record in local/ still counts the entries), not started afresh, and
    no new ledger is begun."""
    (row,) = _rows(dp_jobs["result2"])
    assert row["hospital-c"][TRAIN_STEPS] == 0 and row["hospital-c"][DP_WITHHELD] == LEDGER_BROKEN
    lines = [line for line in dp_jobs["log_c2"].splitlines() if "is missing, but" in line and "(deleted?)" in line]
    assert len(lines) == 1 and "no job may use this site's privacy budget until it is restored" in lines[0]
    assert not dp_jobs["ledger_c_recreated"]


def test_ledgers_live_in_the_site_kits(dp_jobs):
    """Each site's ledger is in its own kit: one cohort for this module's patients (hashed), then one release per
    round it trained; hospital-a's includes the job after its restart, hospital-b's not (its ledger was broken).
    Other modules' DP jobs on other cohorts write to the same ledgers, and do not count for these patients."""
    ours = {dp_jobs["meta1"]["job_id"], dp_jobs["meta2"]["job_id"]}
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        ledger = dp_jobs["ledgers"][site]
        assert ledger.path.is_relative_to(dp_jobs["poc"].kit(site))
        entries = ledger.entries()
        releases = [e for e in entries if e["kind"] == "release" and e["job_id"] in ours]
        (cohort_id,) = {e["cohort"] for e in releases}
        (cohort,) = [e for e in entries if e["kind"] == "cohort" and e["cohort"] == cohort_id]
        steps, q = _site_round(dp_jobs["n_train"][site])
        rounds = {"hospital-a": ROUNDS + 1, "hospital-b": ROUNDS, "hospital-c": 1}[site]
        assert ledger.history_for(cohort["patients"]) == [(NOISE, q, rounds * steps)], site
        jobs = {dp_jobs["meta1"]["job_id"]} | ({dp_jobs["meta2"]["job_id"]} if site == "hospital-a" else set())
        assert {e["job_id"] for e in releases} == jobs, site


def test_require_dp_sites_refuse_a_job_without_dp(dp_jobs):
    """Each site's own local config is what refuses: every site logs it, and what the server received
    from each site in that job (its audit of the wire) is an all-zero update (nothing learnt from its
    data), with dp_withheld = DP_REQUIRED in the metrics the server holds."""
    for site, log in dp_jobs["logs3"].items():
        assert "this site requires DP (require_dp in local/fedbrain_site.json) and the job has none" in log, site
    audit = [json.loads(line) for line in (dp_jobs["result3"] / "workspace" / AUDIT_FILE).read_text().splitlines()]
    assert {e["site"] for e in audit} == set(dp_jobs["poc"].sites)
    for entry in audit:
        assert entry["l2_norm"] == 0.0, entry
        assert DP_WITHHELD in entry["metrics"], entry
    server_log = (dp_jobs["result3"] / "workspace" / "log.txt").read_text(errors="replace")
    received = [json.loads(line.split(SITE_METRICS_LOG_TAG, 1)[1]) for line in server_log.splitlines()
                if SITE_METRICS_LOG_TAG in line]
    assert {r["site"] for r in received} == set(dp_jobs["poc"].sites)
    assert all(r["metrics"][DP_WITHHELD] == DP_REQUIRED for r in received), received


def test_a_job_no_site_may_release_to_ends_with_that_reason(dp_jobs):
    """Every site requires DP of a 3-round job without it: the job ends instead of running on."""
    assert dp_jobs["meta3"]["status"] != "FINISHED:COMPLETED", dp_jobs["meta3"]
    log = (dp_jobs["result3"] / "workspace" / "log.txt").read_text(errors="replace")
    assert "no site may release updates any more (hospital-a: site requires DP; the job has none; " in log
    assert "Round 2 started" not in log  # FLARE's abort is asynchronous: the next round may begin, not the last
