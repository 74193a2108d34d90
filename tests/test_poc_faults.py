"""Faults injected into a real POC federation (issue 14), asserting what the server did.

Its own consortium (first in its lane, beside unit tests only), three short jobs side by side, each fault
aimed at its own job's process (the full matrix with figures is `python bench/run.py --only faults`):

- min_clients 2 of 3: hospital-c's job process is SIGSTOPped through round 1 (longer than
  round_timeout), SIGCONTed, then SIGKILLed in round 3 and never comes back. The job must finish
  every round: round 1 closes at the timeout without hospital-c, hospital-c trains again in round 2,
  and the rounds after the crash go on with the two others.
- min_clients 3 of 3: the same crash must end the job with a clear reason instead of waiting.
- encrypted, min_clients 2 of 3: the same straggler; the encrypted round closes at the timeout too.
"""

from __future__ import annotations

import threading
import time

import pytest

from fedbrain_testing import faults as F
from fedbrain.poc.consortium import PocConsortium
from fedbrain.synthetic.cohort import synthesize_consortium
from fedbrain.tasks.segmentation import SegmentationConfig

pytestmark = pytest.mark.poc

VICTIM = "hospital-c"
#: Round 0 includes every site's job start (deployment, imports, data): on a busy 2-core machine with the other
#: jobs of this module starting beside it, one suite run saw round 0 close at 20 s with none of 3 answers.
TIMEOUT = 30.0
HE_TIMEOUT = 45.0


def _straggle(poc, job: F.JobRun, round_no: int, timeout: float = TIMEOUT) -> float:
    """hospital-c's job process stops (SIGSTOP) once round ``round_no`` starts, for longer than the round
    timeout, then goes on; returns when the round started."""
    started = job.wait_round(round_no)
    time.sleep(1)
    stopped = F.stop_job_process(poc, VICTIM, job.job_id)
    time.sleep(timeout + 1)
    F.continue_job_process(stopped)
    return started


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    """Its own consortium: a fault must hit only this module's job processes, and the shared POC's
    first job wave must not slow its rounds past the 30 s timeout (a run that put these jobs on the
    shared consortium saw job 1 never deployed within 300 s)."""
    from fedbrain.jobs.segmentation import export

    run_dir = tmp_path_factory.mktemp("faults")
    poc = PocConsortium(run_dir / "poc")
    data = run_dir / "data"
    synthesize_consortium(data, sites=3, cases=3, seed=1, site_names=poc.sites, progress=False)
    base = SegmentationConfig(rounds=4, epochs_per_round=1, max_steps=1, min_clients=2, min_trained_sites=2, round_timeout=TIMEOUT,
                              dead_site_grace=30.0)
    out = {}

    def survives():  # Job 1: straggler in round 1, crash in round 3.
        job = F.JobRun(poc, export(base.replace(name="survives"), run_dir / "jobs1"))
        out["stop_at"] = _straggle(poc, job, 1)
        job.wait_round(3)
        time.sleep(1)
        out["crash_at"] = time.time()
        out["killed"] = F.kill_job_process(poc, VICTIM, job.job_id)
        meta = job.wait_done(timeout=240)
        result = job.download(run_dir / "results1")
        out["survives"] = {"meta": meta, "record": F.round_record(result), "log": F.server_log(result)}

    def needs_all():  # Job 2: all three needed; hospital-c crashes in round 1.
        job = F.JobRun(poc, export(base.replace(name="needs_all", min_clients=3, round_timeout=90.0, dead_site_grace=10.0),
                                   run_dir / "jobs2"))
        job.wait_round(1)
        time.sleep(1)
        F.kill_job_process(poc, VICTIM, job.job_id)
        meta = job.wait_done(timeout=180)
        result = job.download(run_dir / "results2")
        out["needs_all"] = {"meta": meta, "record": F.round_record(result), "log": F.server_log(result)}

    def he_straggler():
        # Job 3: encrypted (FLARE's ScatterAndGather), the same straggler in round 1: the round closes at the
        # timeout with the two others, as a plaintext round does (the setting was dropped before).
        # An encrypted round takes longer (decrypt, encrypt): 45 s, not 20, so that no site misses round 0 on a
        # busy machine (one run saw round 0 close at 20 s with one update).
        job = F.JobRun(poc, export(base.replace(name="he_straggler", rounds=2, he=True, round_timeout=HE_TIMEOUT),
                                   run_dir / "jobs3"))
        _straggle(poc, job, 1, HE_TIMEOUT)
        meta = job.wait_done(timeout=240)
        result = job.download(run_dir / "results3")
        out["he"] = {"meta": meta, "log": F.server_log(result), "result": result}

    try:
        poc.up(data_dir=data)
        # The three jobs side by side, each fault aimed at its own job's process (job ids in FLARE's command line):
        # the module's wall time is its longest job's, not their sum.
        failures = []

        def run(scenario):
            try:
                scenario()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the fixture
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in (survives, needs_all, he_straggler)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
    finally:
        poc.stop(graceful=False)  # results are downloaded: teardown by PID
    return out


def test_a_crashed_site_does_not_end_the_job_when_min_clients_allows(faulted):
    got = faulted["survives"]
    assert got["meta"]["status"] == "FINISHED:COMPLETED", got["log"][-3000:]
    record = {r["round"]: r for r in got["record"]}
    assert sorted(record) == [0, 1, 2, 3] and all(r["accepted"] for r in record.values())  # no round lost
    assert VICTIM in record[0]["aggregated"]
    assert VICTIM not in record[3]["aggregated"] and set(record[3]["aggregated"]) == {"hospital-a", "hospital-b"}
    assert "Failing job" not in got["log"]  # FLARE's own reaction to a killed job process, before fedbrain


def test_a_straggler_is_left_out_of_its_round_at_the_timeout_and_trains_again_later(faulted):
    record = {r["round"]: r for r in faulted["survives"]["record"]}
    assert record[1]["missing"] == [VICTIM] and record[1]["closed_by"].startswith("round_timeout")
    assert TIMEOUT - 1 <= record[1]["seconds"] <= TIMEOUT + 10
    assert VICTIM in record[2]["aggregated"]  # back after SIGCONT, in the very next round


def test_a_crash_with_all_sites_required_ends_the_job_with_the_reason(faulted):
    got = faulted["needs_all"]
    assert got["meta"]["status"].startswith("FINISHED:") and got["meta"]["status"] != "FINISHED:COMPLETED"
    assert "Alive clients 2 < required min 3" in got["log"]
    assert [r["round"] for r in got["record"]] == [0]


def test_an_encrypted_round_closes_at_the_timeout_without_the_straggler(faulted):
    """round_timeout and min_responses reach FLARE's ScatterAndGather: round 1 aggregates the two sites that
    answered (the server's encrypted-sum record says how many) and the job completes."""
    import json

    from fedbrain.contracts import HE_AGGREGATION_FILE

    got = faulted["he"]
    assert got["meta"]["status"] == "FINISHED:COMPLETED", got["log"][-3000:]
    records = [json.loads(line) for line in (got["result"] / "workspace" / HE_AGGREGATION_FILE).read_text().splitlines()]
    updates = {r["round"]: r["updates"] for r in records}
    assert updates[0] == 3 and updates[1] == 2, records
    assert all(r["min_responses"] == 2 for r in records)
