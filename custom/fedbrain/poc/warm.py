"""Warm job start for POC consortia: FLARE's job processes forked from a process that has already
imported torch, MONAI, FLARE and fedbrain, instead of each importing them again.

Why: FLARE starts one new process per participant for every job, and on this product's CPU
machines each of them spends ~6-7 s of CPU importing torch, MONAI and torch._dynamo (which every
torch optimizer step imports) before it does anything: measured 2026-12-06, about half of a small
POC job's CPU, and most of what a one-machine POC (the data scientists' trial, ``make demo``, the
test suite) waits for. The process that runs is still FLARE's own job process (``worker_process``
/ ``runner_process``, with FLARE's own arguments, environment, working folder, session and
``/proc`` command line): only its imports are already done.

Production kits never use it (a hospital's job process starts clean, through
:class:`fedbrain.fl.launcher.SiteJobLauncher` and FLARE's server launcher); the POC project opts in
with ``SitePolicyBuilder(warm_job_start=True)``. Noise for privacy is drawn from ``os.urandom`` at
use time (``fedbrain.privacy``, ``fedbrain.secagg``), so forked processes share no random state
that matters. Anything the warm process cannot do falls back to FLARE's ordinary start.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.job_launcher.process_launcher import ProcessHandle
from nvflare.app_common.job_launcher.server_process_launcher import ServerProcessJobLauncher
from nvflare.utils.job_launcher_utils import add_custom_dir_to_path, get_credential_env
from nvflare.utils.process_utils import ProcessAdapter

from fedbrain.fl.launcher import SiteJobLauncher, _SignalTolerantHandle

log = logging.getLogger("fedbrain.warm")

#: What a job process imports anyway; a module that fails to import here is simply imported cold later.
_FLARE_COMMON = ("nvflare.app_opt.pt", "nvflare.fuel.f3.drivers.aio_http_driver", "nvflare.fuel.f3.drivers.grpc_driver",
                 "nvflare.fuel.f3.drivers.aio_grpc_driver", "nvflare.fuel.f3.drivers.tcp_driver",
                 "nvflare.fuel.f3.drivers.aio_tcp_driver", "nvflare.app_common.filters",
                 "nvflare.app_common.streamers.log_streamer", "fedbrain.jobs", "fedbrain.ops.kit", "fedbrain.updates")
PREIMPORT = {
    "site": ("torch", "monai", "torch._dynamo", "opacus", *_FLARE_COMMON,
             "nvflare.private.fed.app.client.worker_process", "nvflare.client.tracking",
             "nvflare.app_common.executors.client_api.in_process_backend",
             "nvflare.app_common.executors.task_script_runner", "nvflare.app_common.logging.site_log_streamer",
             "nvflare.app_common.resource_managers.gpu_resource_manager",
             "nvflare.app_common.resource_consumers.gpu_resource_consumer",
             "fedbrain.fl.executor", "fedbrain.fl.site_loop", "fedbrain.tasks.segmentation",
             "fedbrain.tasks.classification", "fedbrain.privacy.dpsgd", "fedbrain.privacy.client_dp",
             "fedbrain.filters.final_check", "fedbrain.filters.require_encryption", "fedbrain.data.datalist",
             "fedbrain.secagg.site"),
    "server": ("torch", "monai", *_FLARE_COMMON, "nvflare.private.fed.app.server.runner_process",
               "fedbrain.models.segmentation", "fedbrain.models.classifier", "fedbrain.fl.resilient",
               "fedbrain.secagg.server"),
}
#: Bytes of command line the warm process reserves, so that each forked job process can show FLARE's own
#: command line in ``/proc/<pid>/cmdline`` (``ps``, and whatever finds job processes by it).
CMDLINE_ROOM = 4096


# ---------------------------------------------------------------- the warm process (its own module main)

def _set_cmdline(argv: list[str]) -> bool:
    """Write ``argv`` over this process's command-line memory (Linux), as ``setproctitle`` does."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49 of proc(5))
        data = b"\0".join(a.encode() for a in argv) + b"\0"
        if len(data) > end - start:
            return False
        ctypes.memmove(start, data + b"\0" * (end - start - len(data)), end - start)
        return True
    except (OSError, ValueError, IndexError):
        return False


def _run_job(request: dict) -> int:
    """In the forked child: become the job process FLARE asked for and run its module as ``__main__``."""
    import runpy
    import traceback

    os.setsid()  # its own session and process group, as FLARE's posix_spawn(setsid=True) gives it
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for path in reversed([p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]):
        if path not in sys.path:
            sys.path.insert(0, path)
    argv = request["argv"]
    _set_cmdline(argv)
    module = argv[argv.index("-m") + 1]
    sys.argv = [module, *argv[argv.index("-m") + 2:]]
    if "-u" in argv[1:argv.index("-m")]:
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True, write_through=True)
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends a Python process: traceback, status 1
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    return code


def serve(fd: int, kind: str) -> None:
    """The warm process: import, then fork one job process per request until FLARE's process goes."""
    import importlib

    for name in PREIMPORT.get(kind, ()):  # an unknown kind preloads nothing
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            print(f"fedbrain warm start: {name} not preloaded ({type(exc).__name__}: {exc})", file=sys.stderr)
    conn = socket.socket(fileno=fd)
    if threading.active_count() != 1:  # a Python thread would not survive fork: say so and serve nothing
        conn.sendall(json.dumps({"ready": False, "why": f"{threading.active_count()} threads after imports"}).encode() + b"\n")
        return
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    conn.sendall(json.dumps({"ready": True}).encode() + b"\n")
    buffer = b""
    while True:
        ready, _, _ = select.select([conn, wake_r], [], [], 1.0)
        if wake_r in ready:
            os.read(wake_r, 4096)
        while True:  # reap every finished job process and tell the launcher its status
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn.sendall(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        if conn in ready:
            chunk = conn.recv(1 << 20)
            if not chunk:
                return  # FLARE's process is gone; its job processes watch it themselves
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:  # the job process keeps none of the warm process's descriptors
                    signal.set_wakeup_fd(-1)
                    conn.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    os._exit(_run_job(request))
                conn.sendall(json.dumps({"started": pid}).encode() + b"\n")


# ---------------------------------------------------------------- in FLARE's site or server process

class WarmStarter:
    """One warm process per FLARE site or server process, started on its first job."""

    def __init__(self, kind: str, label: str):
        self.kind, self.label = kind, label
        self._lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._failed = False
        self._exits: dict[int, int] = {}
        self._started: list[int] = []
        self._changed = threading.Condition()

    def _ensure(self) -> bool:
        if self._conn is not None or self._failed:
            return not self._failed
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "fedbrain.poc.warm", str(theirs.fileno()), self.kind, self.label,
                 "-" * CMDLINE_ROOM], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        reader = ours.makefile("rb")
        hello = json.loads(reader.readline() or b'{"ready": false, "why": "no answer"}')
        if not hello.get("ready"):
            log.warning("warm job start unavailable (%s); job processes start cold", hello.get("why"))
            self._failed = True
            ours.close()
            return False
        self._conn = ours
        threading.Thread(target=self._read, args=(reader,), name="fedbrain-warm-start", daemon=True).start()
        return True

    def _read(self, reader) -> None:
        for line in reader:
            message = json.loads(line)
            with self._changed:
                if "started" in message:
                    self._started.append(message["started"])
                else:
                    self._exits[message["exit"]] = message["code"]
                self._changed.notify_all()
        with self._changed:  # the warm process is gone: nothing more will be reported
            self._failed = True
            self._changed.notify_all()

    def warm_up(self) -> None:
        with self._lock:
            self._ensure()

    def start(self, argv: list[str], env: dict, cwd: str) -> int | None:
        """Fork FLARE's job process ``argv``; None when it must be started the ordinary way."""
        with self._lock:
            if not self._ensure():
                return None
            with self._changed:
                self._started.clear()
            self._conn.sendall(json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode() + b"\n")
            with self._changed:
                if not self._changed.wait_for(lambda: self._started or self._failed, timeout=30):
                    return None
                return self._started.pop(0) if self._started else None

    def exit_code(self, pid: int, timeout: float | None = 0) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self._failed, timeout=timeout)
            if pid in self._exits:
                return self._exits[pid]
            return -signal.SIGKILL if self._failed and not _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class _WarmProcess(ProcessAdapter):
    """FLARE's process adapter for a job process the warm process forked (it, not FLARE, reaps it)."""

    def __init__(self, pid: int, starter: WarmStarter):
        super().__init__(pid=pid)
        self.starter = starter

    def poll(self):
        return self.starter.exit_code(self.pid)

    def wait(self):
        self.starter.exit_code(self.pid, timeout=None)


def _warm_launch(launcher, starter: WarmStarter, job_meta: dict, fl_ctx):
    """What FLARE's ProcessJobLauncher.launch_job does, with the process forked warm; None: start it cold."""
    env = os.environ.copy()
    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    custom = workspace.get_app_custom_dir(job_meta.get("job_id"))
    if custom != "":
        add_custom_dir_to_path(custom, env)
    env.update(get_credential_env(fl_ctx.get_prop(FLContextKey.JOB_PROCESS_ARGS) or {}))
    argv = shlex.split(launcher.get_command(job_meta, fl_ctx), True)
    if "-m" not in argv:
        return None
    pid = starter.start(argv, env, os.getcwd())
    if pid is None:
        return None
    log.info("Launch the job in process ID: %s (fedbrain warm start)", pid)
    return ProcessHandle(process_adapter=_WarmProcess(pid, starter))


def _starter_for(launcher, kind: str, fl_ctx) -> WarmStarter:
    if getattr(launcher, "_warm", None) is None:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        launcher._warm = WarmStarter(kind, f"--workspace={workspace.get_root_dir()}")
    return launcher._warm


def _warm_up_at_start(launcher, kind: str, event_type: str, fl_ctx) -> None:
    """Start the warm process when FLARE's process starts, so that its imports are done before the first job."""
    if event_type == EventType.SYSTEM_START and fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT) is not None:
        starter = _starter_for(launcher, kind, fl_ctx)
        threading.Thread(target=starter.warm_up, name="fedbrain-warm-up", daemon=True).start()


class WarmSiteJobLauncher(SiteJobLauncher):
    """:class:`fedbrain.fl.launcher.SiteJobLauncher` with its job processes forked warm (POC kits)."""

    def launch_job(self, job_meta: dict, fl_ctx):
        handle = _warm_launch(self, _starter_for(self, "site", fl_ctx), job_meta, fl_ctx)
        return _SignalTolerantHandle(handle) if handle is not None else super().launch_job(job_meta, fl_ctx)

    def handle_event(self, event_type: str, fl_ctx):
        super().handle_event(event_type, fl_ctx)
        _warm_up_at_start(self, "site", event_type, fl_ctx)


class WarmServerJobLauncher(ServerProcessJobLauncher):
    """FLARE's server job launcher with its job processes forked warm (POC kits)."""

    def launch_job(self, job_meta: dict, fl_ctx):
        handle = _warm_launch(self, _starter_for(self, "server", fl_ctx), job_meta, fl_ctx)
        return handle if handle is not None else super().launch_job(job_meta, fl_ctx)

    def handle_event(self, event_type: str, fl_ctx):
        super().handle_event(event_type, fl_ctx)
        _warm_up_at_start(self, "server", event_type, fl_ctx)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
