"""A provisioned POC consortium on this machine, isolated from the user's own FLARE setup.

Everything lives under one run folder: ``home/`` (HOME for nvflare, so ``~/.nvflare`` is never the
user's), ``poc/`` (NVFLARE_POC_WORKSPACE, never ``/tmp/nvflare``) and ``project.yml`` (the
consortium with two free loopback ports). Teardown stops FLARE, then kills by PID whatever still
runs from this workspace: wrappers first, because ``sub_start.sh`` restarts killed processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedbrain.fl.site import write_site_config

#: The POC consortium's project file, shipped in the package (copy it to change the consortium).
DEFAULT_PROJECT = Path(__file__).resolve().parent / "project.yml"


class PocError(RuntimeError):
    """A POC step failed; the message carries the command's own output."""


def free_ports(n: int) -> list[int]:
    """Ports free on loopback right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Participant:
    name: str
    type: str
    org: str
    role: str | None = None


class PocConsortium:
    def __init__(self, run_dir: Path, project_file: Path = DEFAULT_PROJECT):
        self.run_dir = Path(run_dir).resolve()
        self.project_file = Path(project_file)
        self.home = self.run_dir / "home"
        self.workspace = self.run_dir / "poc"
        self.project_copy = self.run_dir / "project.yml"
        #: Added to every nvflare call's environment (and so to the server's and sites' processes).
        self.extra_env: dict[str, str] = {}

    # ---- the consortium as provisioned ------------------------------------------------------
    def project(self) -> dict:
        src = self.project_copy if self.project_copy.exists() else self.project_file
        return yaml.safe_load(src.read_text())

    def participants(self, kind: str | None = None) -> list[Participant]:
        out = [
            Participant(p["name"], p["type"], p.get("org", ""), p.get("role"))
            for p in self.project()["participants"]
        ]
        return [p for p in out if kind is None or p.type == kind]

    @property
    def sites(self) -> list[str]:
        return [p.name for p in self.participants("client")]

    @property
    def admin(self) -> str:
        return next(p.name for p in self.participants("admin") if p.role == "project_admin")

    def kit(self, name: str) -> Path:
        """The startup kit folder of a participant (server, site or admin)."""
        return self.workspace / self.project()["name"] / "prod_00" / name

    def env(self) -> dict:
        """Environment for every nvflare call: isolated HOME and workspace, this Python first on PATH."""
        env = dict(os.environ)
        env["HOME"] = str(self.home)
        env["NVFLARE_POC_WORKSPACE"] = str(self.workspace)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        # 3 sites + server share the machine's cores; one BLAS thread each avoids oversubscription.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.extra_env)
        return env

    def _nvflare(self, *args: str, timeout: float = 180) -> str:
        cmd = [str(Path(sys.executable).parent / "nvflare"), *args]
        try:
            res = subprocess.run(
                cmd, env=self.env(), cwd=self.run_dir, capture_output=True, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise PocError(f"`nvflare {' '.join(args)}` did not finish in {timeout:.0f} s") from e
        if res.returncode != 0:
            raise PocError(f"`nvflare {' '.join(args)}` failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res.stdout

    # ---- lifecycle ------------------------------------------------------------------------
    def prepare(self, data_dir: Path | None = None) -> None:
        """Provision kits (mTLS certs, roles) from project.yml on two free ports; point sites at data."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        project = yaml.safe_load(self.project_file.read_text())
        server = next(p for p in project["participants"] if p["type"] == "server")
        if server["name"] != "localhost":
            raise PocError(f"{self.project_file}: the POC server must be named 'localhost' (binds loopback only)")
        server["fed_learn_port"], server["admin_port"] = free_ports(2)
        self.project_copy.write_text(yaml.safe_dump(project, sort_keys=False))
        self._nvflare("poc", "prepare", "-i", str(self.project_copy), "--force")
        from fedbrain.ops.kit import protect_secrets

        protect_secrets(self.workspace)  # keys and HE contexts: owner only, as in production kits
        if data_dir is not None:
            for site in self.sites:
                datalist = Path(data_dir).resolve() / site / "datalist.json"
                # Synthetic patients: per-site validation metrics are shown even over a few cases.
                write_site_config(self.kit(site), datalist, num_threads=1, min_validation_cases=1)

    def start(self, timeout: float = 90) -> None:
        """Start server and all sites; returns once every site has connected (else one line naming the missing).

        FLARE's own readiness wait (``nvflare poc start --timeout``) logs in with a 1 s connection timeout, which a
        loaded machine misses again and again (2026-12-06, during the suite: every site connected 37 s after the
        start, FLARE's wait still failing at 420 s); so the POC starts without it and fedbrain waits through its own
        admin session, which allows a login 30 s."""
        self._nvflare("poc", "start", "--no-wait", timeout=120)
        self.wait_connected(timeout)
        (self.run_dir / "pids.json").write_text(json.dumps(self.pids()))

    def wait_connected(self, timeout: float) -> None:
        deadline, missing, why = time.time() + timeout, list(self.sites), "the server did not answer yet"
        while True:
            try:
                status = self.status()
                missing = [site for site, state in status["sites"].items() if state != "connected"]
                if not missing:
                    return
                why = "not connected"
            except Exception as e:  # noqa: BLE001 - the server still starting: FLARE's errors have no common base
                why = f"the server did not answer yet ({type(e).__name__}: {str(e)[:200]})"
            if time.time() > deadline:
                kit_logs = ", ".join(str(self.kit(s) / "log.txt") for s in missing)
                raise PocError(f"POC not ready {timeout:.0f} s after the start: {', '.join(missing)} {why}; see {kit_logs}")
            time.sleep(2)

    def up(self, data_dir: Path | None = None, timeout: float = 90) -> None:
        self.prepare(data_dir)
        self.start(timeout)

    def pids(self) -> list[int]:
        """Processes started from this workspace (server, sites, their job processes, wrappers)."""
        return processes_under(self.workspace)

    def is_running(self) -> bool:
        return bool(self.pids())

    def memory_bytes(self) -> dict[str, int]:
        """Memory of the whole consortium right now (for the peak-memory benchmark): ``pss``, each process's
        proportional share (what the machine spends), and ``rss``, the sum of resident sizes. The sum counts a
        page shared by several processes once per process, and POC job processes are forked from a warm process
        that has imported torch, MONAI and FLARE (``fedbrain.poc.warm``), sharing those pages with it."""
        total = {"pss": 0, "rss": 0}
        for pid in self.pids():
            for name, key, path in (("pss", "Pss:", "smaps_rollup"), ("rss", "VmRSS:", "status")):
                try:
                    for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
                        if line.startswith(key):
                            total[name] += int(line.split()[1]) * 1024
                            break
                except OSError:
                    pass
        return total

    def stop(self, grace: float = 20, graceful: bool = True) -> None:
        """Stop via FLARE, then kill by PID anything left: wrappers first so nothing restarts.

        ``graceful=False`` skips FLARE's shutdown (~11 s on 2 cores, against ~2 s by PID): for test
        teardown, where the results were already downloaded and nothing is resumed."""
        if graceful and self.is_running():
            try:
                self._nvflare("poc", "stop", timeout=60)
            except PocError:
                pass
            deadline = time.time() + grace
            while self.is_running() and time.time() < deadline:
                time.sleep(0.5)
        kill_processes_under(self.workspace)

    def clean(self, graceful: bool = True) -> None:
        """Remove the provisioned workspace (kits, keys, job stores); results downloaded elsewhere stay."""
        import shutil

        self.stop(graceful=graceful)
        shutil.rmtree(self.workspace, ignore_errors=True)

    # ---- admin API ------------------------------------------------------------------------
    def session(self, timeout: float = 30):
        """An admin session as the project admin, over mTLS, like the admin console uses."""
        from fedbrain.ops.status import open_session  # the admin kit's session, as `fedbrain status` opens it

        old = os.environ.get("HOME")
        os.environ["HOME"] = str(self.home)  # nvflare reads ~/.nvflare: keep it inside the run
        try:
            return open_session(self.kit(self.admin), self.admin, timeout)
        finally:
            if old is not None:
                os.environ["HOME"] = old

    def status(self) -> dict:
        """Server and site connection state, as the admin console reports it."""
        if not self.is_running():
            return {"running": False, "server": "down", "sites": {s: "not connected" for s in self.sites}}
        sess = self.session()
        try:
            info = sess.get_system_info()
            connected = {c.name for c in info.client_info}
            return {
                "running": True,
                "server": "up",
                # FLARE reports the server's *job engine* state: "stopped" just means no job is running.
                "server_job_engine": info.server_info.status,
                "sites": {s: ("connected" if s in connected else "not connected") for s in self.sites},
                "jobs": [{"job_id": j.job_id, "app": j.app_name} for j in info.job_info],
            }
        finally:
            sess.close()


def processes_under(folder: Path) -> list[int]:
    """PIDs whose command line or working directory lies in ``folder`` (this process excluded)."""
    marker = str(Path(folder).resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if marker in cmdline or cwd.startswith(marker):
            found.append(int(entry.name))
    return sorted(found)


def kill_processes_under(folder: Path) -> None:
    """Kill by PID what runs from ``folder``: start-script wrappers first (they restart killed
    processes), TERM then KILL; raises PocError if anything survives."""
    for pass_no in range(3):
        left = processes_under(folder)
        if not left:
            return
        wrappers = [p for p in left if _is_wrapper(p)]
        for pid in wrappers or left:
            _kill(pid, signal.SIGTERM if pass_no == 0 else signal.SIGKILL)
        time.sleep(1.0)
    left = processes_under(folder)
    if left:
        raise PocError(f"processes still running from {folder}: {left}")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_wrapper(pid: int) -> bool:
    cmd = _cmdline(pid)
    return "sub_start.sh" in cmd or "start.sh" in cmd


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
