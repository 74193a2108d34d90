"""Many sites on one machine: a POC project with N hospitals, per-site memory, and the server's
per-round timeline read back from its job log (used by ``bench/load.py`` and the load test).

The N-site project is the POC project file with its client list replaced (``hospital-a``,
``hospital-b``, ... each its own organisation); the builders, the server and the admins stay, so
every kit still gets fedbrain's site policies and kit check.
"""

from __future__ import annotations

import json
import re
import shutil
import string
import threading
from datetime import datetime
from pathlib import Path

import yaml

from fedbrain.poc.consortium import DEFAULT_PROJECT, processes_under

MAX_SITES = 26


def site_names(n: int) -> list[str]:
    if not 1 <= n <= MAX_SITES:
        raise ValueError(f"1 to {MAX_SITES} sites, got {n}")
    return [f"hospital-{c}" for c in string.ascii_lowercase[:n]]


def project_with_sites(n: int, base: Path = DEFAULT_PROJECT) -> dict:
    """The POC project with ``n`` client sites instead of its own (builders, server, admins kept)."""
    project = yaml.safe_load(Path(base).read_text())
    parts = project["participants"]
    first_client = next(i for i, p in enumerate(parts) if p["type"] == "client")
    clients = [{"name": s, "type": "client", "org": s.replace("-", "_")} for s in site_names(n)]
    rest = [p for p in parts if p["type"] != "client"]
    project["participants"] = rest[:first_client] + clients + rest[first_client:]
    project["description"] = f"{project.get('description', 'fedbrain POC')} ({n} sites)"
    return project


def write_project(n: int, path: Path, base: Path = DEFAULT_PROJECT) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(project_with_sites(n, base), sort_keys=False))
    return path


def flare_default_timing(job: Path, out: Path) -> Path:
    """A copy of the exported job folder ``job`` with fedbrain's round timing taken out, so FLARE's
    defaults apply (server.task_request_interval 2 s, the workflows' task_check_period 0.5 s)."""
    shutil.copytree(job, out)
    for cfg in out.rglob("config_fed_server.json"):
        conf = json.loads(cfg.read_text())
        conf.pop("server", None)
        for wf in conf.get("workflows", []):
            wf.get("args", {}).pop("task_check_period", None)
        cfg.write_text(json.dumps(conf, indent=4))
    return out


# ---- memory --------------------------------------------------------------------------------------
def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def site_processes(workspace: Path, site: str) -> dict[int, str]:
    """The Python processes of one site of a POC workspace: pid -> role (``site``: the site's
    client process; ``job``: its job process, one per running job). Start-script wrappers excluded."""
    pattern = re.compile(rf"/{re.escape(site)}(/|\s|$)")
    out = {}
    for pid in processes_under(workspace):
        cmd = _cmdline(pid)
        if "python" not in cmd or not pattern.search(cmd):
            continue
        out[pid] = "job" if "worker_process" in cmd else "site"
    return out


class Sampler:
    """Calls :meth:`sample` every ``interval`` seconds in a background thread, inside a ``with`` block."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


class PeakRss(Sampler):
    """Samples, in a background thread, each site's peak resident memory (bytes): of its client
    process, of its job process (the kernel's high-water mark, VmHWM, so no peak between two samples
    is missed while the process lives) and of both together."""

    def __init__(self, workspace: Path, sites: list[str], interval: float = 1.0):
        super().__init__(interval)
        self.workspace, self.sites = Path(workspace), list(sites)
        self.peak = {s: {"site": 0, "job": 0, "total": 0} for s in self.sites}

    def sample(self) -> None:
        for site in self.sites:
            total = 0
            for pid, role in site_processes(self.workspace, site).items():
                rss = _status_kb(pid, "VmHWM") * 1024
                total += rss
                self.peak[site][role] = max(self.peak[site][role], rss)
            self.peak[site]["total"] = max(self.peak[site]["total"], total)


# ---- the server's per-round timeline --------------------------------------------------------------
_PEER = re.compile(r"peer=([^,\]]+)")


def _records(log_json: str):
    import json

    for line in log_json.splitlines():
        try:
            rec = json.loads(line)
            yield datetime.strptime(rec["asctime"], "%Y-%m-%d %H:%M:%S,%f"), rec.get("message", ""), rec.get("fl_ctx", "")
        except (ValueError, KeyError, TypeError):
            continue


def round_timeline(log_json: str) -> list[dict]:
    """Per training round, from the server's job log (``log.json`` of the downloaded result):

    - ``results``: updates received; ``seconds``: round start to the next round's start;
    - ``aggregation_s``: from the round's last update received to the end of the round (the model
      saved): closing the round, aggregating, persisting;
    - ``accept_s``: server time spent taking in each update as it arrived (result filters such as
      the audit, the controller's per-update step), summed over the round's updates.
    """
    rounds: list[dict] = []
    pending: dict[str, datetime] = {}
    cur = None
    for t, msg, ctx in _records(log_json):
        started = re.search(r"Round (\d+) started", msg)
        if started:
            cur = {"round": int(started.group(1)), "start": t, "results": 0, "last_result": None, "accept_s": 0.0}
            rounds.append(cur)
            continue
        if cur is None:
            continue
        peer = _PEER.search(ctx)
        if msg.startswith("got result from client") and "name=train" in msg:
            cur["results"] += 1
            cur["last_result"] = t
            if peer:
                pending[peer.group(1)] = t
        elif msg.startswith("finished processing client result by controller") and peer and peer.group(1) in pending:
            cur["accept_s"] += (t - pending.pop(peer.group(1))).total_seconds()
        elif "End persist model on server" in msg:
            cur["end"] = t
        elif re.search(r"Finished (FedAvg|ScatterAndGather|Scaffold)", msg):
            cur["finished"] = t
    out = []
    for i, r in enumerate(rounds):
        nxt = rounds[i + 1]["start"] if i + 1 < len(rounds) else r.get("finished")
        end = r.get("end") or nxt
        out.append({
            "round": r["round"],
            "results": r["results"],
            "seconds": (nxt - r["start"]).total_seconds() if nxt else None,
            "aggregation_s": (end - r["last_result"]).total_seconds() if end and r["last_result"] else None,
            "accept_s": round(r["accept_s"], 4),
        })
    return out
