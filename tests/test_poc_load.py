"""Load with real parts: 12 provisioned hospitals and the server on this machine, a small model and
small data, the segmentation job submitted through the admin API: every round completes with
every site's update received (the server's audit). Timings live in bench/load.py, not here."""

import json
from pathlib import Path

import pytest

from fedbrain.jobs import TASK_CHECK_PERIOD, TASK_REQUEST_INTERVAL
from fedbrain.jobs.segmentation import export
from fedbrain.poc.consortium import DEFAULT_PROJECT, PocConsortium
from fedbrain_testing.load import PeakRss, flare_default_timing, project_with_sites, round_timeline, write_project
from fedbrain.poc.runner import submit_and_wait
from fedbrain.synthetic.cohort import synthesize_consortium

SITES = 12
ROUNDS = 2
TINY = dict(spacing=(6.0, 6.0, 6.0), roi_size=(32, 32, 32), init_filters=4, epochs_per_round=1, max_steps=1,
            batch_size=2, seed=0)


def _config(n, rounds=ROUNDS):
    from fedbrain.tasks.segmentation import SegmentationConfig

    return SegmentationConfig(name="fedbrain_load", rounds=rounds, min_clients=n, **TINY)


# ---- fast: the N-site project and the job's round timing ----------------------------------------------
def test_project_with_sites_keeps_builders_server_and_admins():
    import yaml

    base = yaml.safe_load(DEFAULT_PROJECT.read_text())
    p = project_with_sites(SITES)
    clients = [x for x in p["participants"] if x["type"] == "client"]
    assert [c["name"] for c in clients][:3] == ["hospital-a", "hospital-b", "hospital-c"]
    assert len(clients) == SITES and len({c["org"] for c in clients}) == SITES
    assert p["builders"] == base["builders"]  # fedbrain's site policies and kit manifest stay
    assert [x for x in p["participants"] if x["type"] != "client"] == \
        [x for x in base["participants"] if x["type"] != "client"]


def test_exported_job_carries_fedbrain_round_timing(tmp_path):
    job = export(_config(3), tmp_path)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert server["server"]["task_request_interval"] == TASK_REQUEST_INTERVAL < 2  # FLARE's default: 2 s
    assert all(wf["args"]["task_check_period"] == TASK_CHECK_PERIOD < 0.5 for wf in server["workflows"])
    # the checked-in job too (`make jobs`)
    shipped = Path(__file__).resolve().parents[1] / "jobs" / "segmentation" / "fedbrain_segmentation"
    conf = json.loads((shipped / "app" / "config" / "config_fed_server.json").read_text())
    assert conf["server"]["task_request_interval"] == TASK_REQUEST_INTERVAL
    # the bench's "FLARE defaults" arm is the same job without them
    default = json.loads((flare_default_timing(job, tmp_path / "defaults" / job.name) / "app" / "config"
                          / "config_fed_server.json").read_text())
    assert "server" not in default and not any("task_check_period" in wf["args"] for wf in default["workflows"])
    assert default["components"] == server["components"]


def test_round_timeline_reads_the_server_log():
    def rec(t, msg, peer=None):
        ctx = f"[identity=x, wf=controller{', peer=' + peer if peer else ''}]"
        return json.dumps({"asctime": f"2026-01-01 00:00:{t}", "fl_ctx": ctx, "message": msg})

    log = "\n".join([
        rec("00,000", "-----\n   Round 0 started.   \n-----"),
        rec("05,000", "got result from client hospital-a for task: name=train, id=1", "hospital-a"),
        rec("05,010", "finished processing client result by controller", "hospital-a"),
        rec("06,000", "got result from client hospital-b for task: name=train, id=2", "hospital-b"),
        rec("06,030", "finished processing client result by controller", "hospital-b"),
        rec("06,400", "End persist model on server."),
        rec("06,500", "Round 1 started."),
        rec("09,000", "got result from client hospital-a for task: name=train, id=3", "hospital-a"),
        rec("09,500", "End persist model on server."),
        rec("09,600", "Finished FedAvg."),
    ])
    t = round_timeline(log)
    assert [r["results"] for r in t] == [2, 1]
    assert t[0]["seconds"] == pytest.approx(6.5) and t[1]["seconds"] == pytest.approx(3.1)
    assert t[0]["aggregation_s"] == pytest.approx(0.4) and t[0]["accept_s"] == pytest.approx(0.04)


# ---- slow: 12 sites on this machine ------------------------------------------------------------------
@pytest.mark.poc
def test_twelve_sites_complete_every_round(tmp_path):
    poc = PocConsortium(tmp_path / "poc", write_project(SITES, tmp_path / "project.yml"))
    synthesize_consortium(tmp_path / "data", sites=SITES, cases=3, seed=0, spacing_mm=4.0, site_names=poc.sites,
                          progress=False)
    job = export(_config(SITES), tmp_path / "jobs")
    try:
        poc.up(data_dir=tmp_path / "data", timeout=420)  # 12 sites on 2 cores, maybe beside another lane
        with PeakRss(poc.workspace, poc.sites) as rss:
            meta, result = submit_and_wait(poc, job, rounds=ROUNDS, result_dir=tmp_path / "result")
    finally:
        poc.clean(graceful=False)  # results are downloaded: teardown by PID
    assert meta["status"] == "FINISHED:COMPLETED"
    ws = next(Path(result).glob("**/workspace"))
    audit = [json.loads(line) for line in (ws / "received_updates.jsonl").read_text().splitlines() if line.strip()]
    for rnd in range(ROUNDS):
        assert sorted(a["site"] for a in audit if a["round"] == rnd) == poc.sites, f"round {rnd}"
    timeline = round_timeline((ws / "log.json").read_text(errors="replace"))
    assert [r["results"] for r in timeline[:ROUNDS]] == [SITES] * ROUNDS
    assert all(r["aggregation_s"] is not None for r in timeline[:ROUNDS])
    # every site's client and job process was seen (the memory figures of bench/load.py read the same)
    assert all(p["site"] > 0 and p["job"] > 0 for p in rss.peak.values()), rss.peak
