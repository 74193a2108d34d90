"""Fault injection into a running POC consortium (tests, `bench/faults.py`): real processes, real signals.

Every process is found by PID from the kit's own files (``daemon_pid.fl``: the start-script
wrapper that restarts FLARE when it dies; ``pid.fl``: the FLARE parent) and ``/proc`` (the job
process is the parent's child), never by name. What can be injected:

- :func:`kill_job_process`: SIGKILL a site's (or the server's) job process only: a crash or the
  OOM killer; the site itself stays connected.
- :func:`kill_participant` / :func:`start_participant`: a machine going down (wrapper, FLARE and
  the job process killed) and coming back through its kit's ``startup/start.sh``.
- :func:`stop_job_process` / :func:`continue_job_process`: SIGSTOP/SIGCONT, a straggler.
- :class:`TcpProxy` + :func:`route_site_through`: a site's connection to the server through a
  proxy that can drop and restore traffic (no root needed).

:func:`round_record` and :func:`summarize` read what happened from the downloaded job result.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from fedbrain.fl.progress import ROUND_RE  # FedAvg's "Round N started" server log line
from fedbrain.poc.consortium import PocConsortium, PocError, free_ports

ROUND_FILE = "round_contributions.jsonl"


# ---------------------------------------------------------------------------------- processes
def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def wrapper_pid(poc: PocConsortium, name: str) -> int | None:
    """The kit's start-script loop (restarts FLARE when it dies)."""
    return _read_pid(poc.kit(name) / "daemon_pid.fl")


def flare_pid(poc: PocConsortium, name: str) -> int | None:
    """The participant's FLARE parent process (client_train / server_train)."""
    return _read_pid(poc.kit(name) / "pid.fl")


def job_pids(poc: PocConsortium, name: str, job_id: str | None = None) -> list[int]:
    """The participant's job process(es) (of job ``job_id`` only, when given), started by its FLARE parent:
    its children, or in a POC kit the children of the warm process it started (:mod:`fedbrain.poc.warm`)."""
    parent = flare_pid(poc, name)
    if parent is None:
        return []
    return [p for p in _descendants(parent) if ("worker_process" in _cmd(p) or "runner_process" in _cmd(p))
            and (job_id is None or f" -n {job_id} " in _cmd(p) + " ")]


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal(pids, sig) -> list[int]:
    done = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            done.append(pid)
        except ProcessLookupError:
            pass
    return done


def kill_job_process(poc: PocConsortium, name: str, job_id: str | None = None) -> list[int]:
    """SIGKILL the participant's job process (and what it started); FLARE's parent keeps running."""
    pids = job_pids(poc, name, job_id)
    if not pids:
        raise PocError(f"{name}: no job process to kill")
    everything = [d for p in pids for d in _descendants(p)] + pids
    return _signal(everything, signal.SIGKILL)


def stop_job_process(poc: PocConsortium, name: str, job_id: str | None = None) -> list[int]:
    """SIGSTOP the job process: it stays connected at the socket level but does nothing (a straggler)."""
    pids = job_pids(poc, name, job_id)
    if not pids:
        raise PocError(f"{name}: no job process to stop")
    return _signal(pids, signal.SIGSTOP)


def continue_job_process(pids: list[int]) -> list[int]:
    return _signal(pids, signal.SIGCONT)


def kill_participant(poc: PocConsortium, name: str) -> list[int]:
    """A machine going down: the start-script wrapper first (else it restarts FLARE), then FLARE and its job."""
    wrapper, parent = wrapper_pid(poc, name), flare_pid(poc, name)
    tree = ([wrapper] if wrapper else []) + ([parent] if parent else []) + (_descendants(parent) if parent else [])
    if not tree:
        raise PocError(f"{name}: nothing running to kill")
    killed = _signal(tree, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in killed):
        time.sleep(0.2)
    for stale in ("daemon_pid.fl", "pid.fl"):  # as after a power cut: the start script cleans these itself
        (poc.kit(name) / stale).unlink(missing_ok=True)
    return killed


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def start_participant(poc: PocConsortium, name: str, wait_connected: float = 90) -> float:
    """Start a participant again through its kit's ``startup/start.sh``; returns seconds until it is
    connected (a site seen by the server; the server answering the admin API)."""
    kit = poc.kit(name)
    log = open(poc.run_dir / f"restart-{name}.log", "ab")
    t0 = time.time()
    subprocess.Popen(["bash", str(kit / "startup" / "start.sh")], cwd=kit, env=poc.env(), stdout=log,
                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = t0 + wait_connected
    while time.time() < deadline:
        time.sleep(1.0)
        try:
            status = poc.status()
        except Exception:  # the server is still coming up
            continue
        if name in status.get("sites", {}):
            if status["sites"][name] == "connected":
                return time.time() - t0
        elif status.get("server") == "up":
            return time.time() - t0
    raise PocError(f"{name} did not come back within {wait_connected:.0f} s (see {log.name})")


# ---------------------------------------------------------------------------------- network
class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`block` drops every connection and refuses
    new ones (a cut cable, a firewall), :meth:`restore` lets traffic through again."""

    def __init__(self, target_port: int, target_host: str = "localhost"):
        self.target = (target_host, target_port)
        self.port = free_ports(1)[0]
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._blocked = threading.Event()
        self._stop = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if self._blocked.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
                client.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._stop.is_set() and not self._blocked.is_set():
                for key, _ in sel.select(timeout=0.5):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            sel.close()
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def block(self) -> None:
        self._blocked.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass

    def restore(self) -> None:
        self._blocked.clear()

    def close(self) -> None:
        self._stop.set()
        self.block()
        self._listener.close()


def route_site_through(poc: PocConsortium, site: str, proxy_port: int) -> None:
    """Point a provisioned site kit at ``proxy_port`` and sign the kit again with the consortium's
    root key (what re-issuing that site's kit would do), so fedbrain's kit check accepts it."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from fedbrain.ops.kit import write_manifest

    conf_path = poc.kit(site) / "startup" / "fed_client.json"
    conf = json.loads(conf_path.read_text())
    for server in conf["servers"]:
        host = server["service"]["target"].rsplit(":", 1)[0]
        server["service"]["target"] = f"{host}:{proxy_port}"
    conf_path.write_text(json.dumps(conf, indent=2) + "\n")
    state = json.loads((poc.workspace / poc.project()["name"] / "state" / "cert.json").read_text())
    key = load_pem_private_key(state["root_pri_key"].encode(), password=None)
    startup = poc.kit(site) / "startup"
    if (startup / "signature.json").exists():  # FLARE signs HE kits' startup/ and refuses edited files
        from nvflare.lighter.utils import sign_folders

        sign_folders(str(startup), key, signature_file="signature.json")
    write_manifest(poc.kit(site), site, key)


def server_port(poc: PocConsortium) -> int:
    server = next(p for p in poc.project()["participants"] if p["type"] == "server")
    return int(server["fed_learn_port"])


# ---------------------------------------------------------------------------------- reading results
def round_record(result: Path) -> list[dict]:
    """One entry per closed round (fedbrain.fl.resilient): asked, aggregated, missing, closed_by, time."""
    path = Path(result) / "workspace" / ROUND_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def server_log(result: Path) -> str:
    path = Path(result) / "workspace" / "log.txt"
    return path.read_text(errors="replace") if path.exists() else ""


def final_dice(result: Path) -> float | None:
    """Mean over sites of the final global model's whole-tumour Dice (the report's summary)."""
    from fedbrain.report.job_report import build_report

    try:
        report = build_report(result)
    except Exception:
        return None
    value = report.get("summary", {}).get("mean_final_wt_dice")
    return float(value) if value is not None else None


def summarize(record: list[dict], *, rounds: int, fault_time: float | None) -> dict:
    """Rounds completed (accepted), lost (planned, never aggregated), and seconds from the fault until
    the first round closed after it (the federation moving again). ``record``: :func:`round_record`
    of one job, or of a job and the one that resumed it."""
    done = sorted({r["round"] for r in record if r.get("accepted")})
    after = [r["time"] for r in record if fault_time is not None and r["time"] > fault_time and r.get("accepted")]
    return {
        "rounds_completed": len(done),
        "rounds_lost": rounds - len(done),
        "recovery_seconds": round(min(after) - fault_time, 1) if after else None,
        "per_round": [{k: r.get(k) for k in ("round", "aggregated", "missing", "closed_by", "seconds")}
                      for r in record],
    }


# ---------------------------------------------------------------------------------- running a job
class JobRun:
    """Submit an exported job as the project admin and follow it from the server's own run folder,
    so a fault can be injected at a given round; survives the server going away and coming back."""

    def __init__(self, poc: PocConsortium, job_folder: Path | None, job_id: str | None = None):
        """Submit ``job_folder``, or follow the job ``job_id`` already in the server's store."""
        self.poc = poc
        if job_id is None:
            sess = poc.session()
            try:
                job_id = sess.submit_job(str(Path(job_folder).resolve()))
            finally:
                sess.close()
        self.job_id = job_id
        self.submitted = time.time()

    @property
    def run_log(self) -> Path:
        return self.poc.kit("localhost") / self.job_id / "log.txt"

    def current_round(self) -> int | None:
        try:
            text = self.run_log.read_text(errors="replace")
        except OSError:
            return None
        found = [int(m) for m in ROUND_RE.findall(text)]
        return max(found) if found else None

    def wait_round(self, round_no: int, timeout: float = 300) -> float:
        """Block until round ``round_no`` has started at the server; returns the time."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            current = self.current_round()
            if current is not None and current >= round_no:
                return time.time()
            time.sleep(0.3)
        try:
            tail = self.run_log.read_text(errors="replace")[-1500:]
        except OSError:
            tail = f"(no server run log at {self.run_log.name}: the job was never deployed)"
        raise PocError(f"job {self.job_id}: round {round_no} did not start within {timeout:.0f} s; "
                       f"the server's run log ends:\n{tail}")

    def meta(self) -> dict:
        sess = self.poc.session()
        try:
            return sess.get_job_meta(self.job_id)
        finally:
            sess.close()

    def wait_done(self, timeout: float = 600, poll: float = 2.0) -> dict:
        deadline = time.time() + timeout
        meta = {}
        while time.time() < deadline:
            try:
                meta = self.meta()
            except Exception:  # the server is down or restarting: keep asking
                time.sleep(poll)
                continue
            status = meta.get("status", "")
            if status.startswith("FINISHED") or status in ("FAILED", "ABORTED"):
                meta["wall_seconds"] = round(time.time() - self.submitted, 1)
                return meta
            time.sleep(poll)
        meta["status"] = f"still {meta.get('status', '?')} after {timeout:.0f} s"
        meta["wall_seconds"] = round(time.time() - self.submitted, 1)
        return meta

    def abort(self) -> None:
        sess = self.poc.session()
        try:
            sess.abort_job(self.job_id)
        finally:
            sess.close()

    def download(self, dest: Path) -> Path | None:
        dest.mkdir(parents=True, exist_ok=True)
        sess = self.poc.session()
        try:
            return Path(sess.download_job_result(self.job_id, str(dest)))
        except Exception:
            return None
        finally:
            sess.close()


# ---------------------------------------------------------------------------------- scenarios
#: The faults the harness injects (bench/faults.py runs all; tests/test_poc_faults.py a fast subset).
SCENARIOS = {
    "clean": "no fault (the reference run)",
    "site_crash_min2": "a site's job process SIGKILLed mid-round, never back; min_clients 2 of 3",
    "site_crash_min3": "a site's job process SIGKILLed mid-round, never back; min_clients 3 of 3",
    "site_restart": "a site's machine down mid-round (wrapper, FLARE, job killed), back via start.sh 5 s later",
    "server_restart": "the server's machine down mid-job, back via start.sh, the job resumed",
    "straggler": "a site's job process SIGSTOPped longer than round_timeout, then SIGCONT",
    "network_cut": "a site's connection to the server dropped for 45 s, then restored",
}
VICTIM = "hospital-c"


def _result(poc, job: JobRun, results: Path, timeout: float) -> tuple[dict, Path | None, list[dict]]:
    meta = job.wait_done(timeout=timeout)
    if meta.get("status", "").startswith("still"):
        try:
            job.abort()
        except Exception:
            pass
    result = job.download(results / job.job_id)
    return meta, result, round_record(result) if result else []


def _reason(result: Path | None) -> str | None:
    """The line that says why a job ended early (FLARE's or fedbrain's), from the server log."""
    log = server_log(result) if result else ""
    for marker in ("RoundFailed", "Alive clients", "Required client", "All clients are dead", "deployment policy",
                   "Exception in model controller run"):
        lines = [line for line in log.splitlines() if marker in line]
        if lines:
            return lines[0].split(" - ")[-1].strip()[:300]
    return None


def run_scenario(poc: PocConsortium, name: str, config, work: Path, *, proxy: TcpProxy | None = None,
                 export=None, at_round: int = 1, timeout: float = 600) -> dict:
    """Run one job of ``config`` with fault ``name`` injected when ``at_round`` starts; what happened."""
    if export is None:
        from fedbrain.jobs.segmentation import export
    jobs, results = Path(work) / "jobs" / name, Path(work) / "results" / name
    folder = export(config.replace(name=f"fault_{name}"), jobs)
    job = JobRun(poc, folder)
    out: dict = {"scenario": name, "what": SCENARIOS[name], "job_id": job.job_id, "rounds": config.rounds,
                 "min_clients": config.min_clients, "min_responses": config.min_responses or config.min_clients,
                 "round_timeout": config.round_timeout}
    fault = None
    if name != "clean":
        fault = job.wait_round(at_round)
        time.sleep(2)  # mid-round: the sites have the task and are training
    if name.startswith("site_crash"):
        kill_job_process(poc, VICTIM)
    elif name == "site_restart":
        kill_participant(poc, VICTIM)
        time.sleep(5)
        out["site_back_seconds"] = round(start_participant(poc, VICTIM) + 5, 1)
    elif name == "straggler":
        pids = stop_job_process(poc, VICTIM)
        time.sleep(config.round_timeout + 5)
        continue_job_process(pids)
        out["stopped_seconds"] = config.round_timeout + 5
    elif name == "network_cut":
        if proxy is None:
            raise PocError("network_cut needs the victim site routed through a TcpProxy")
        proxy.block()
        time.sleep(45)
        proxy.restore()
        out["cut_seconds"] = 45
    elif name == "server_restart":
        return {**out, **_server_restart(poc, job, folder, config, work, fault, timeout)}
    meta, result, record = _result(poc, job, results, timeout)
    out.update(status=meta.get("status"), wall_seconds=meta.get("wall_seconds"), reason=_reason(result),
               final_dice=final_dice(result) if result else None, result=str(result) if result else None,
               **summarize(record, rounds=config.rounds, fault_time=fault))
    out["victim_rounds"] = [r["round"] for r in record if VICTIM in r["aggregated"]]
    if name == "site_restart":  # FLARE cannot re-admit it into this job: the next job must include it
        nxt = JobRun(poc, export(config.replace(name="fault_site_restart_next", rounds=1), jobs / "next"))
        meta2, result2, record2 = _result(poc, nxt, results, timeout)
        out["next_job"] = {"job_id": nxt.job_id, "status": meta2.get("status"),
                           "aggregated": [r["aggregated"] for r in record2]}
    return out


def resumed_job_of(poc: PocConsortium, job_id: str, timeout: float = 60) -> dict | None:
    """``{"job_id", "after_round"}`` of the job the restarted server made to continue ``job_id``, or None."""
    from fedbrain.fl.autoresume import RESUMED_FROM_META

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            sess = poc.session()
            try:
                jobs = sess.list_jobs(detailed=True) or []
            finally:
                sess.close()
        except Exception:  # noqa: BLE001 - the server may still be coming up
            jobs = []
        for meta in jobs:
            origin = meta.get(RESUMED_FROM_META) or {}
            if origin.get("job") == job_id:
                return {"job_id": meta.get("job_id"), "after_round": origin.get("after_round")}
        time.sleep(2)
    return None


def _server_restart(poc, job: JobRun, folder: Path, config, work: Path, fault: float, timeout: float) -> dict:
    from fedbrain.jobs.resume import resume_job

    results = Path(work) / "results" / "server_restart"
    run_dir = poc.kit("localhost") / job.job_id
    kill_participant(poc, "localhost")
    time.sleep(5)
    out = {"server_back_seconds": round(start_participant(poc, "localhost") + 5, 1)}
    # What FLARE does with the interrupted job after the restart (status, as an admin sees it).
    deadline = time.time() + 60
    while time.time() < deadline:
        status = poc.status()
        if all(v == "connected" for v in status["sites"].values()):
            break
        time.sleep(2)
    out["sites_back_seconds"] = round(time.time() - fault, 1)
    out["interrupted_status"] = job.meta().get("status")
    record_before = [json.loads(line) for line in (run_dir / ROUND_FILE).read_text().splitlines()] \
        if (run_dir / ROUND_FILE).exists() else []
    # The restarted server continues the job by itself (fedbrain.fl.autoresume): find the job it made.
    auto = resumed_job_of(poc, job.job_id, timeout=240)
    out["resumed_by"] = "server (automatic)" if auto else "admin (fedbrain job resume)"
    if auto:
        resumed = JobRun(poc, None, job_id=auto["job_id"])
        out["resumed_from_round"] = auto["after_round"]
    else:  # a kit without the component: what an admin types
        if out["interrupted_status"] == "RUNNING":
            try:
                job.abort()
            except Exception as e:  # noqa: BLE001 - reported, the resume goes on
                out["abort_error"] = str(e)[:200]
        resumed_folder, found = resume_job(folder, Path(work) / "jobs" / "server_restart", run_dir)
        out["resumed_from_round"] = found["round"]
        resumed = JobRun(poc, resumed_folder)
    meta, result, record_after = _result(poc, resumed, results, timeout)
    record = record_before + record_after
    out.update(status=meta.get("status"), resumed_job_id=resumed.job_id, wall_seconds=round(time.time() - job.submitted, 1),
               reason=_reason(result), final_dice=final_dice(result) if result else None,
               result=str(result) if result else None, **summarize(record, rounds=config.rounds, fault_time=fault))
    out["victim_rounds"] = [r["round"] for r in record if VICTIM in r["aggregated"]]
    out["rounds_trained_twice"] = sorted({r["round"] for r in record_after} & {r["round"] for r in record_before})
    return out
