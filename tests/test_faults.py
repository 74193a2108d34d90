"""The fault-tolerance parts that need no running federation (the POC ones: test_poc_faults.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fedbrain.tasks.segmentation import SegmentationConfig


def _handle(code_or_signal: int):
    from nvflare.app_common.job_launcher.process_launcher import ProcessHandle

    from fedbrain.fl.launcher import _SignalTolerantHandle

    proc = subprocess.Popen([sys.executable, "-c", f"import sys, time; time.sleep(30 if {code_or_signal} < 0 else 0); "
                             f"sys.exit({max(code_or_signal, 0)})"])
    if code_or_signal < 0:
        proc.send_signal(-code_or_signal)
    proc.wait()
    return _SignalTolerantHandle(ProcessHandle(process=proc))


def test_a_job_process_killed_by_a_signal_is_reported_as_unknown_not_as_a_failure():
    from nvflare.apis.job_launcher_spec import JobReturnCode
    from nvflare.private.fed.client.client_executor import REPORTABLE_JOB_FAILURES

    killed = _handle(-signal.SIGKILL).poll()
    assert killed == JobReturnCode.UNKNOWN and killed not in REPORTABLE_JOB_FAILURES
    assert _handle(1).poll() == JobReturnCode.EXECUTION_ERROR  # a Python error in the job still counts as one
    assert _handle(0).poll() == JobReturnCode.SUCCESS


def test_poc_kits_start_job_processes_warm_with_the_signal_tolerant_launcher(tmp_path):
    """POC kits fork job processes warm (fedbrain.poc.warm), through the signal-tolerant launcher;
    production kits (tests/test_provision.py) keep FLARE's clean start."""
    from fedbrain.fl.launcher import SiteJobLauncher
    from fedbrain.poc.consortium import PocConsortium
    from fedbrain.poc.warm import WarmServerJobLauncher, WarmSiteJobLauncher

    assert issubclass(WarmSiteJobLauncher, SiteJobLauncher)
    poc = PocConsortium(tmp_path / "poc")
    poc.prepare()
    for site in poc.sites:
        res = json.loads((poc.kit(site) / "local" / "resources.json").read_text())
        paths = [c["path"] for c in res["components"]]
        assert "fedbrain.poc.warm.WarmSiteJobLauncher" in paths and not any("ClientProcessJobLauncher" in p for p in paths)
    server = json.loads((poc.kit("localhost") / "local" / "resources.json").read_text())
    assert "fedbrain.poc.warm.WarmServerJobLauncher" in [c["path"] for c in server["components"]]
    assert WarmServerJobLauncher.__mro__[1].__name__ == "ServerProcessJobLauncher"


def test_a_warm_started_process_is_the_process_flare_asked_for(tmp_path):
    """What FLARE's launcher relies on, through the warm process: the module runs as ``__main__`` with
    FLARE's arguments, environment and folder, in its own session, showing FLARE's command line; its
    exit status (0, an error's 1, a SIGKILL) comes back."""
    from fedbrain.poc.warm import WarmStarter

    (tmp_path / "job_main.py").write_text(
        "import os, sys, time\n"
        "open('out.txt', 'w').write(repr((sys.argv[1:], os.environ['JOB_VAR'], os.getcwd(), os.getsid(0) == os.getpid(),"
        " [a for a in open('/proc/self/cmdline').read().split(chr(0)) if a])))\n"
        "if sys.argv[1] == 'sleep': time.sleep(60)\n"
        "sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else 0)\n")
    starter = WarmStarter("bare", f"--workspace={tmp_path}")
    env = {"JOB_VAR": "from FLARE", "PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    work = tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, "-u", "-m", "job_main"]
    pid = starter.start([*argv, "0", "--job"], env, str(work))
    assert starter.exit_code(pid, timeout=30) == 0
    args, var, cwd, own_session, cmdline = eval((work / "out.txt").read_text())
    assert (args, var, cwd, own_session) == (["0", "--job"], "from FLARE", str(work), True)
    assert cmdline == [*argv, "0", "--job"], cmdline  # what ps and the fault tests find it by
    assert starter.exit_code(starter.start([*argv, "3"], env, str(work)), timeout=30) == 3
    pid = starter.start([*argv, "sleep"], env, str(work))
    time.sleep(1)
    os.kill(pid, signal.SIGKILL)
    assert starter.exit_code(pid, timeout=30) == -signal.SIGKILL


def test_the_job_carries_the_round_policy(tmp_path):
    from fedbrain.jobs.segmentation import export

    folder = export(SegmentationConfig(rounds=3, min_clients=2, round_timeout=45.0, min_responses=1,
                                       dead_site_grace=20.0), tmp_path)
    conf = json.loads(next(folder.glob("*/config/config_fed_server.json")).read_text())
    controller = conf["workflows"][0]
    assert controller["path"] == "fedbrain.fl.resilient.ResilientFedAvg"
    assert controller["args"]["round_timeout"] == 45.0 and controller["args"]["min_responses"] == 1
    assert controller["args"]["aggregator"]["path"].startswith("fedbrain.aggregation")  # a custom aggregator rides along
    assert conf["dead_client_grace_period"] == 20.0
    final_eval = conf["workflows"][1]
    assert final_eval["path"].endswith("CrossSiteModelEval") and final_eval["args"]["validation_timeout"] == 45
    assert json.loads((folder / "meta.json").read_text())["min_clients"] == 2


@pytest.mark.parametrize("path", ["he", "scaffold"])
def test_encrypted_and_scaffold_jobs_carry_the_round_policy_too(tmp_path, path):
    """Before, these paths dropped round_timeout, min_responses and dead_site_grace without a word."""
    from fedbrain.jobs.classification import export

    from fedbrain.tasks.classification import ClassificationConfig

    config = ClassificationConfig(round_timeout=45.0, min_responses=2, dead_site_grace=20.0,
                                  **({"he": True} if path == "he" else {"algorithm": "scaffold"}))
    folder = export(config, tmp_path)
    conf = json.loads(next(folder.glob("*/config/config_fed_server.json")).read_text())
    (controller,) = [w for w in conf["workflows"] if w["id"] == "controller"]
    if path == "he":  # FLARE's ScatterAndGather: wait for every site up to the timeout, need min_responses
        assert controller["path"].endswith("ScatterAndGather")
        assert controller["args"]["train_timeout"] == 45 and controller["args"]["wait_time_after_min_received"] == 45
        assert controller["args"]["min_clients"] == 2
        # ScatterAndGather aggregates whatever arrived at the timeout: the encrypted sum holds the minimum
        aggregator = next(c for c in conf["components"] if c["id"] == "aggregator")
        assert aggregator["args"]["min_responses"] == 2
    else:
        assert controller["path"] == "fedbrain.fl.resilient.ResilientScaffold"
        assert controller["args"]["round_timeout"] == 45 and controller["args"]["min_responses"] == 2
    assert conf["dead_client_grace_period"] == 20.0


def test_round_policy_settings_are_validated():
    with pytest.raises(ValueError, match="min_responses"):
        SegmentationConfig(min_clients=2, min_responses=3)
    with pytest.raises(ValueError, match="round_timeout"):
        SegmentationConfig(round_timeout=-1)
    assert SegmentationConfig(min_clients=2, min_responses=2).min_responses == 2


def test_resume_starts_after_the_last_saved_round_from_its_model(tmp_path):
    from fedbrain.jobs.resume import ResumeError, resume_job
    from fedbrain.jobs.segmentation import export

    folder = export(SegmentationConfig(rounds=5), tmp_path / "jobs")
    run = tmp_path / "server" / "job-id"
    (run / "app_server").mkdir(parents=True)
    model = run / "app_server" / "FL_global_model.pt"
    model.write_bytes(b"model")
    with pytest.raises(ResumeError, match="no saved round"):
        resume_job(folder, tmp_path / "out", run)
    (run / "fedbrain_checkpoint.json").write_text(json.dumps({"round": 2, "checkpoint": str(model), "total_rounds": 5}))
    resumed, found = resume_job(folder, tmp_path / "out", run)
    conf = json.loads(next(resumed.glob("*/config/config_fed_server.json")).read_text())
    args = conf["workflows"][0]["args"]
    assert (args["start_round"], args["num_rounds"]) == (3, 2)  # rounds 3 and 4 of 0..4: none trained twice
    persistor = next(c for c in conf["components"] if c["id"] == "persistor")
    assert persistor["args"]["source_ckpt_file_full_name"] == str(model)
    (run / "fedbrain_checkpoint.json").write_text(json.dumps({"round": 4, "checkpoint": str(model), "total_rounds": 5}))
    with pytest.raises(ResumeError, match="nothing to resume"):
        resume_job(folder, tmp_path / "out", run)


def test_the_proxy_cuts_and_restores_a_connection():
    from fedbrain_testing.faults import TcpProxy

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1024):
                    conn.sendall(data)

    import threading

    threading.Thread(target=echo, daemon=True).start()
    proxy = TcpProxy(port, "127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            c.sendall(b"ping")
            assert c.recv(16) == b"ping"
            proxy.block()
            time.sleep(0.2)
            c.settimeout(2)
            try:  # closed by the proxy: end of stream or a reset; a hang (socket.timeout) fails the test
                c.sendall(b"again")
                assert c.recv(16) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            c.settimeout(2)
            try:  # refused while blocked: end of stream or a reset, never a hang
                c.sendall(b"x")
                assert c.recv(16) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        proxy.restore()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            c.sendall(b"back")
            assert c.recv(16) == b"back"
    finally:
        proxy.close()
        server.close()


def test_status_shows_the_last_round_closed_without_a_site():
    from io import StringIO

    from rich.console import Console

    from fedbrain.fl.progress import parse_log
    from fedbrain.ops.status import render_status

    log = ("2026-11-30 - ResilientFedAvg - INFO - fedbrain-round {\"aggregated\": [\"hospital-a\", \"hospital-b\"], "
           "\"closed_by\": \"round_timeout 15 s\", \"missing\": [\"hospital-c\"], \"round\": 1}\n")
    closed = parse_log(log)["closed"]
    assert closed["missing"] == ["hospital-c"] and parse_log("nothing")["closed"] is None
    out = StringIO()
    render_status({"server": {"address": "s:1", "engine": "started", "start_time": "t"}, "user": "admin",
                   "sites": [], "jobs": [{"job_id": "j1", "status": "RUNNING", "round": 3, "closed": closed}]},
                  Console(file=out, width=200))
    assert "round 1 closed without hospital-c (round_timeout 15 s)" in out.getvalue()  # from 0, as FLARE's log


@pytest.mark.parametrize("path", ["fedavg", "he", "scaffold"])
def test_every_path_carries_the_fewest_trained_sites_a_round_needs_to_be_published(tmp_path, path):
    from fedbrain.jobs.classification import export
    from fedbrain.tasks.classification import ClassificationConfig

    changes = {"fedavg": {"algorithm": "fedavg"}, "he": {"he": True}, "scaffold": {"algorithm": "scaffold"}}[path]
    assert ClassificationConfig().min_trained_sites == 3 and ClassificationConfig.group_of("min_trained_sites") == "privacy"
    conf = json.loads(next(export(ClassificationConfig(min_trained_sites=2, **changes), tmp_path)
                           .glob("*/config/config_fed_server.json")).read_text())
    holder = (next(c for c in conf["components"] if c["id"] == "aggregator") if path == "he"
              else next(w for w in conf["workflows"] if w["id"] == "controller"))
    assert holder["args"]["min_trained_sites"] == 2


def test_an_aggregate_of_one_trained_site_cannot_be_configured():
    with pytest.raises(ValueError, match="min_trained_sites must be >= 2"):
        SegmentationConfig(min_trained_sites=1)
    from fedbrain.fl.resilient import ResilientFedAvg

    with pytest.raises(ValueError, match="min_trained_sites"):
        ResilientFedAvg(num_clients=3, min_trained_sites=1)  # a job config naming the controller directly


def test_the_report_and_status_name_unpublished_rounds(tmp_path):
    from fedbrain.contracts import ROUND_FILE
    from fedbrain.report.job_report import _unpublished

    rows = [{"round": 0, "published": True}, {"round": 1, "published": False, "why_unpublished": "1 trained site(s)"}]
    (tmp_path / ROUND_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _unpublished(tmp_path) == [{"round": 1, "why": "1 trained site(s)"}]


def test_export_warns_when_two_site_aggregates_are_allowed(tmp_path, caplog):
    """At 2, the two trained sites can read each other's update from the global model: export says so."""
    import logging

    from fedbrain.jobs.segmentation import export

    with caplog.at_level(logging.WARNING, logger="fedbrain"):
        export(SegmentationConfig(min_trained_sites=3), tmp_path / "three")
    assert "min_trained_sites 2" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="fedbrain"):
        export(SegmentationConfig(min_trained_sites=2), tmp_path / "two")
    assert "each of the two can then read the other's update from the global model" in caplog.text
