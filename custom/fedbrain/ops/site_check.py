"""``fedbrain site check --kit DIR``: will this machine work as a consortium site, before it joins?

Sites of comparable federations lost days to faults whose errors pointed elsewhere: a CUDA
driver too old for the installed torch, a corrupted certificate (FLARE then waits forever
without a log line), a service whose ``python3`` was not the one fedbrain was installed in.
Each check here is one :class:`Row` (ok / warn / fail, what was found, what to do), and
every check that needs hardware or the network is split in two: a probe that gathers facts
and a pure ``diagnose_*`` function that judges them, so tests inject the facts of a GPU
machine, an old driver or a skewed clock without having one.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedbrain.ops.kit import (
    KitError,
    check_certificate,
    kit_identity,
    server_address,
    tls_handshake,
    verify_manifest,
)

OK, WARN, FAIL = "ok", "warn", "fail"

#: A certificate closer than this to its expiry is a warning: renewing a kit takes the
#: consortium days (docs/hospital-it.md, "Renewing a kit").
CERT_WARN_DAYS = 30
#: Clock skew against the server: above WARN the logs of site and server no longer line up;
#: above FAIL a freshly provisioned certificate can look "not yet valid" (or expired).
CLOCK_WARN_S = 60.0
CLOCK_FAIL_S = 3600.0
#: What a fedbrain site needs, by default (3D segmentation, FLARE keeps every job's workspace).
NEED_DISK_GIB = 20.0
NEED_RAM_GIB = 8.0
NEED_GPU_GIB = 8.0
#: FLARE's preflight dry-runs the client for 5 s; the whole command must end within this.
PREFLIGHT_TIMEOUT_S = 90
#: Importing torch and nvflare in the start script's python, cold.
PYTHON_PROBE_TIMEOUT_S = 180
NETWORK_TIMEOUT_S = 5.0
SITE_CONFIG = "fedbrain_site.json"

#: Newest CUDA each driver branch supports (Linux; NVIDIA CUDA toolkit release notes, table 3),
#: newest branch first.
DRIVER_MAX_CUDA = (
    (580, (13, 0)), (575, (12, 9)), (570, (12, 8)), (565, (12, 7)), (560, (12, 6)), (555, (12, 5)),
    (550, (12, 4)), (545, (12, 3)), (535, (12, 2)), (530, (12, 1)), (525, (12, 0)), (520, (11, 8)),
    (515, (11, 7)), (510, (11, 6)), (495, (11, 5)), (470, (11, 4)), (465, (11, 3)), (460, (11, 2)),
    (455, (11, 1)), (450, (11, 0)), (440, (10, 2)), (418, (10, 1)), (410, (10, 0)),
)
#: Oldest driver that runs every toolkit of a CUDA major (CUDA minor-version compatibility).
MIN_DRIVER_FOR_CUDA_MAJOR = {11: 450, 12: 525, 13: 580}


@dataclass
class Row:
    """One check: its status, what was found, and what to do about it (empty when nothing)."""

    check: str
    status: str
    detail: str
    fix: str = ""


# ---- GPU / CUDA ------------------------------------------------------------------------------

@dataclass
class Gpu:
    name: str
    capability: tuple[int, int] | None = None  # (major, minor), e.g. (8, 6)
    memory_gib: float | None = None


@dataclass
class GpuFacts:
    """What the start script's python and ``nvidia-smi`` report; every field injectable in tests."""

    torch_version: str | None = None  # None: torch does not import
    torch_cuda: str | None = None  # torch.version.cuda; None: the CPU build
    arch_list: tuple[str, ...] = ()  # kernels compiled into torch: sm_80, ..., compute_90 (PTX)
    driver: str | None = None  # NVIDIA driver version; None: no driver (nvidia-smi absent or failing)
    gpus: tuple[Gpu, ...] = ()
    cuda_available: bool = False  # torch.cuda.is_available() in that python
    cuda_error: str = ""  # torch's own warning when it is not
    device: str | None = None  # the site's local/fedbrain_site.json "device" (auto, cpu, cuda)


def _version(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in str(text or "").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def driver_max_cuda(driver: str) -> tuple[int, int] | None:
    """Newest CUDA a driver version supports (None: older than the table)."""
    major = (_version(driver) or (0,))[0]
    return next((cuda for branch, cuda in DRIVER_MAX_CUDA if major >= branch), None)


def _arch(tag: str) -> tuple[str, tuple[int, int]] | None:
    """'sm_86' -> ('sm', (8, 6)); 'compute_90' -> ('compute', (9, 0)); 'sm_120' -> ('sm', (12, 0))."""
    kind, _, number = tag.partition("_")
    digits = "".join(ch for ch in number if ch.isdigit())
    if kind not in ("sm", "compute") or len(digits) < 2:
        return None
    return kind, (int(digits[:-1]), int(digits[-1]))


def torch_runs_on(capability: tuple[int, int], arch_list) -> bool:
    """A GPU runs torch's kernels if torch holds binaries for its major at a minor <= its own,
    or PTX for a capability <= its own (which the driver compiles on first use)."""
    for tag in arch_list:
        parsed = _arch(tag)
        if not parsed:
            continue
        kind, (major, minor) = parsed
        if kind == "sm" and major == capability[0] and minor <= capability[1]:
            return True
        if kind == "compute" and (major, minor) <= tuple(capability):
            return True
    return False


def _cuda(text) -> str:
    return ".".join(map(str, text)) if isinstance(text, tuple) else str(text)


def diagnose_gpu(f: GpuFacts) -> Row:
    """torch build, CUDA runtime, driver and GPU capability judged together, in plain words."""
    name = "GPU / CUDA"
    if f.torch_version is None:
        return Row(name, FAIL, "torch does not import in the start script's python",
                   "install the pinned stack there: pip install -r requirements.txt (docs/hospital-it.md, Install)")
    if (f.device or "auto") == "cpu":
        return Row(name, OK, f"torch {f.torch_version}; local/{SITE_CONFIG} sets device cpu: trains on CPU")
    gpus = ", ".join(g.name for g in f.gpus) or "a GPU"
    if f.torch_cuda is None:
        if f.driver is None:
            return Row(name, OK, f"torch {f.torch_version} (CPU build), no NVIDIA driver: trains on CPU")
        top = driver_max_cuda(f.driver)
        return Row(name, WARN, f"{gpus} with driver {f.driver} is present, but torch {f.torch_version} is the CPU "
                               f"build: the site trains on CPU",
                   f"to use the GPU install torch built for CUDA <= {_cuda(top)} "
                   f"(pip install torch --index-url https://download.pytorch.org/whl/cu{''.join(map(str, top or ()))})")
    need = _version(f.torch_cuda) or (0, 0)
    if f.driver is None:
        level = FAIL if f.device == "cuda" else WARN
        return Row(name, level, f"torch {f.torch_version} is built for CUDA {f.torch_cuda} but no NVIDIA driver was "
                                f"found (nvidia-smi missing or failing): the site trains on CPU",
                   "install the NVIDIA driver (and in Docker run with --gpus all), or install the CPU build of "
                   "torch to say so")
    top = driver_max_cuda(f.driver)
    floor = MIN_DRIVER_FOR_CUDA_MAJOR.get(need[0]) if need else None
    driver_major = (_version(f.driver) or (0,))[0]
    if top is None or (floor and driver_major < floor) or (not floor and top < need[:2]):
        supports = f"supports CUDA <= {_cuda(top)}" if top else "is older than CUDA 10"
        upgrade = f"upgrade the driver to >= {floor}" if floor else "upgrade the driver"
        return Row(name, FAIL, f"driver {f.driver} {supports}; this torch ({f.torch_version}) needs "
                               f"{need[0]}.x (built for {f.torch_cuda}): torch cannot use the GPU",
                   f"{upgrade}, or install torch built for CUDA <= {_cuda(top)}, or the CPU build")
    for gpu in f.gpus:
        if gpu.capability and f.arch_list and not torch_runs_on(gpu.capability, f.arch_list):
            cc = ".".join(map(str, gpu.capability))
            return Row(name, FAIL, f"{gpu.name} has compute capability {cc}; this torch ({f.torch_version}) has "
                                   f"kernels for {' '.join(f.arch_list)} only: CUDA calls fail with 'no kernel image'",
                       "install a torch build that supports this GPU (an older torch for old GPUs), or use the CPU build")
    if not f.cuda_available:
        return Row(name, FAIL, f"driver {f.driver} and torch {f.torch_version} (CUDA {f.torch_cuda}) should work, "
                               f"but torch cannot use the GPU: {f.cuda_error or 'torch.cuda.is_available() is False'}",
                   "check that the service user can open /dev/nvidia* (group video), or in Docker that the "
                   "container runs with --gpus all")
    minor_note = ""
    if top < need[:2]:
        minor_note = (f"; the driver supports CUDA <= {_cuda(top)} and runs this {f.torch_cuda} build through "
                      f"minor-version compatibility")
    level = WARN if minor_note else OK
    return Row(name, level, f"{gpus}: driver {f.driver}, torch {f.torch_version} with CUDA {f.torch_cuda}{minor_note}",
               "upgrade the driver when you can (kernels compiled at run time may need it)" if minor_note else "")


def parse_nvidia_smi(text: str) -> tuple[str | None, tuple[Gpu, ...]]:
    """``nvidia-smi --query-gpu=driver_version,name,memory.total,compute_cap --format=csv,noheader,nounits``."""
    driver, gpus = None, []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 3:
            continue
        driver = cells[0]
        cap = _version(cells[3]) if len(cells) > 3 else ()
        try:
            memory = float(cells[2]) / 1024
        except ValueError:
            memory = None
        gpus.append(Gpu(cells[1], (cap[0], cap[1]) if len(cap) >= 2 else None, memory))
    return driver, tuple(gpus)


def probe_nvidia() -> tuple[str | None, tuple[Gpu, ...]]:
    """The driver and GPUs (None, () without a driver); old drivers lack the compute_cap field."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None, ()
    for fields in ("driver_version,name,memory.total,compute_cap", "driver_version,name,memory.total"):
        try:
            res = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return None, ()
        if res.returncode == 0:
            return parse_nvidia_smi(res.stdout)
    return None, ()


# ---- the start script's python ------------------------------------------------------------------

#: Run in the python the kit's sub_start.sh runs (``python3`` on the service's PATH).
PYTHON_PROBE = r"""
import json, sys, warnings
out = {"executable": sys.executable, "python": sys.version.split()[0]}
for mod in ("fedbrain", "nvflare", "torch"):
    try:
        out[mod] = getattr(__import__(mod), "__version__", "?")
    except Exception as e:
        out[mod] = None
        out[mod + "_error"] = f"{type(e).__name__}: {e}"
if out["torch"]:
    import torch
    out["torch_cuda"] = torch.version.cuda
    flags = getattr(torch._C, "_cuda_getArchFlags", None)
    out["arch_list"] = (flags() or "").split() if flags and torch.version.cuda else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["cuda_available"] = bool(torch.cuda.is_available())
    out["cuda_error"] = "; ".join(str(w.message) for w in caught)
    if out["cuda_available"]:
        out["capabilities"] = [list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
print("FEDBRAIN_PROBE " + json.dumps(out))
"""


def start_script_python(path: str | None = None) -> str | None:
    """The ``python3`` the kit's sub_start.sh runs: the first on PATH (the service's PATH)."""
    return shutil.which("python3", path=path if path is not None else os.environ.get("PATH", ""))


def probe_python(python: str | None) -> dict:
    """Versions and torch's CUDA facts as that python sees them; ``{"error": ...}`` if it cannot run."""
    if not python:
        return {"error": "no python3 on PATH"}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        res = subprocess.run([python, "-c", PYTHON_PROBE], capture_output=True, text=True, env=env,
                             timeout=PYTHON_PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{python} could not run ({e})"}
    for line in res.stdout.splitlines():
        if line.startswith("FEDBRAIN_PROBE "):
            return json.loads(line.split(" ", 1)[1])
    return {"error": f"{python} exited {res.returncode}: {res.stderr.strip()[-500:]}"}


def diagnose_python(facts: dict, python: str | None, expect_version: str) -> Row:
    name = "python of the start script"
    where = f"{python or 'python3'}"
    if "error" in facts:
        return Row(name, FAIL, facts["error"],
                   "put the python that has fedbrain installed first on the site's PATH (the service unit sets it)")
    if not facts.get("fedbrain"):
        return Row(name, FAIL, f"{where} cannot import fedbrain ({facts.get('fedbrain_error', '')}): sub_start.sh "
                               f"would refuse the kit or fail every job",
                   f"pip install fedbrain=={expect_version} into that python, or put the right venv's bin/ first on "
                   f"PATH")
    if not facts.get("nvflare"):
        return Row(name, FAIL, f"{where} imports fedbrain but not nvflare ({facts.get('nvflare_error', '')})",
                   "pip install -r requirements.txt into that python")
    if facts["fedbrain"] != expect_version:
        return Row(name, FAIL, f"{where} has fedbrain {facts['fedbrain']}, the consortium expects {expect_version}",
                   f"pip install fedbrain=={expect_version} (upgrade in step with the consortium)")
    return Row(name, OK, f"{where}: python {facts.get('python')}, fedbrain {facts['fedbrain']}, "
                         f"nvflare {facts['nvflare']}, torch {facts.get('torch')}")


def gpu_facts(python_facts: dict, nvidia: tuple[str | None, tuple[Gpu, ...]], device: str | None) -> GpuFacts:
    driver, gpus = nvidia
    caps = python_facts.get("capabilities") or []
    gpus = tuple(Gpu(g.name, g.capability or (tuple(caps[i]) if i < len(caps) else None), g.memory_gib)
                 for i, g in enumerate(gpus))
    return GpuFacts(torch_version=python_facts.get("torch"), torch_cuda=python_facts.get("torch_cuda"),
                    arch_list=tuple(python_facts.get("arch_list") or ()), driver=driver, gpus=gpus,
                    cuda_available=bool(python_facts.get("cuda_available")),
                    cuda_error=python_facts.get("cuda_error", ""), device=device)


# ---- resources ----------------------------------------------------------------------------------

@dataclass
class Resources:
    workspace: str
    disk_free_gib: float
    ram_total_gib: float
    ram_available_gib: float
    gpu_memory_gib: tuple[float, ...] = ()


@dataclass
class Needs:
    disk_gib: float = NEED_DISK_GIB
    ram_gib: float = NEED_RAM_GIB
    gpu_gib: float = NEED_GPU_GIB


def probe_resources(workspace: Path, gpus: tuple[Gpu, ...] = ()) -> Resources:
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            mem[key] = float(value.split()[0]) / 2**20  # kB -> GiB
    except OSError:
        pass
    folder = Path(workspace)
    while not folder.exists() and folder != folder.parent:  # a workspace not made yet: its disk
        folder = folder.parent
    return Resources(str(workspace), shutil.disk_usage(folder).free / 2**30, mem.get("MemTotal", 0.0),
                     mem.get("MemAvailable", 0.0), tuple(g.memory_gib for g in gpus if g.memory_gib))


def diagnose_resources(r: Resources, needs: Needs, uses_gpu: bool) -> list[Row]:
    rows = []
    disk = f"{r.disk_free_gib:.1f} GiB free at {r.workspace} (need {needs.disk_gib:g})"
    rows.append(Row("disk for job workspaces", OK if r.disk_free_gib >= needs.disk_gib else FAIL, disk,
                    "" if r.disk_free_gib >= needs.disk_gib else
                    "free space there, or run the site with NVFL_WORKSPACE on a larger disk (docs/hospital-it.md)"))
    ram = f"{r.ram_total_gib:.1f} GiB RAM, {r.ram_available_gib:.1f} GiB available (need {needs.ram_gib:g})"
    if r.ram_total_gib < needs.ram_gib:
        rows.append(Row("memory", FAIL, ram, "give the site machine more RAM, or train smaller crops"))
    elif r.ram_available_gib < needs.ram_gib:
        rows.append(Row("memory", WARN, ram, "other programs use the memory a job needs: stop them while jobs run"))
    else:
        rows.append(Row("memory", OK, ram))
    if uses_gpu and r.gpu_memory_gib:
        best = max(r.gpu_memory_gib)
        text = f"{best:.1f} GiB on the largest GPU (need {needs.gpu_gib:g})"
        rows.append(Row("GPU memory", OK if best >= needs.gpu_gib else FAIL, text,
                        "" if best >= needs.gpu_gib else "use a GPU with more memory, or set device cpu in "
                                                         f"local/{SITE_CONFIG}"))
    return rows


# ---- server and clock ---------------------------------------------------------------------------

def server_date(kit: Path, timeout: float = NETWORK_TIMEOUT_S) -> datetime.datetime | None:
    """The server's clock, from the Date header FLARE's HTTP driver (aiohttp) sends on any request,
    over mTLS with the kit's certificate. None when the server answers without one (gRPC)."""
    kit = Path(kit)
    _, cert, key = kit_identity(kit)
    host, port = server_address(kit)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(kit / "startup" / "rootCA.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(kit / "startup" / cert), str(kit / "startup" / key))
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = tls.recv(4096)
            if not chunk:
                break
            data += chunk
    for line in data.decode("latin-1").split("\r\n")[1:]:
        key_, _, value = line.partition(":")
        if key_.strip().lower() == "date":
            return email.utils.parsedate_to_datetime(value.strip())
    return None


def diagnose_clock(skew_s: float | None, why_not: str = "") -> Row:
    name = "clock vs server"
    if skew_s is None:
        return Row(name, WARN, f"not measured: {why_not}",
                   "compare `date -u` here with the server's; keep NTP (chrony/systemd-timesyncd) on")
    text = f"this machine is {abs(skew_s):.0f} s {'ahead of' if skew_s > 0 else 'behind'} the server"
    if abs(skew_s) > CLOCK_FAIL_S:
        return Row(name, FAIL, text + ": certificates can look not yet valid or expired",
                   "set the clock right and keep NTP on (timedatectl set-ntp true)")
    if abs(skew_s) > CLOCK_WARN_S:
        return Row(name, WARN, text + ": site and server logs will not line up",
                   "turn NTP on (timedatectl set-ntp true)")
    return Row(name, OK, text.replace(" 0 s ahead of", " in step with").replace(" 0 s behind", " in step with"))


# ---- FLARE's own preflight ----------------------------------------------------------------------

def site_running(kit: Path, workspace: Path | None = None) -> bool:
    """Is the kit's FLARE process (or its supervisor) alive? (pid files sub_start.sh writes)."""
    for folder in {Path(kit), Path(workspace or kit)}:
        for name in ("pid.fl", "daemon_pid.fl"):
            try:
                os.kill(int((folder / name).read_text().strip()), 0)
                return True
            except (OSError, ValueError):
                continue
    return False


def flare_preflight(kit: Path, python: str | None, server_row: Row | None) -> Row:
    """``nvflare preflight-check`` on a copy of the kit (its dry run writes logs into the kit), with a
    time limit. Its server-reachability rule repeats ours, so an unreachable server counts as
    that row does; any other problem it reports is a failure."""
    name = "FLARE preflight-check"
    if not python:
        return Row(name, FAIL, "not run: no python3 on PATH")
    with tempfile.TemporaryDirectory(prefix="fedbrain-preflight-") as tmp:
        copy = Path(tmp) / Path(kit).name
        copy.mkdir()
        for folder in ("startup", "local"):
            if (Path(kit) / folder).is_dir():
                shutil.copytree(Path(kit) / folder, copy / folder)
        cmd = [python, "-m", "nvflare.cli", "--format", "json", "preflight-check", "-p", str(copy)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=PREFLIGHT_TIMEOUT_S,
                                 stdin=subprocess.DEVNULL, cwd=tmp, start_new_session=True)
        except subprocess.TimeoutExpired:
            return Row(name, WARN, f"did not finish within {PREFLIGHT_TIMEOUT_S} s", "run it by hand: "
                       f"nvflare preflight-check -p {kit}")
        except OSError as e:
            return Row(name, FAIL, f"could not run: {e}")
    summary = {}
    for line in res.stdout.splitlines():
        try:
            summary = json.loads(line).get("data", {})
        except (ValueError, AttributeError):
            continue
    problems = []
    for line in res.stderr.splitlines():  # FLARE's human table: | check | problem | how to fix |
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("", "Checks") and cells[1] not in ("PASSED", ""):
            problems.append(f"{cells[0]}: {cells[1]}")
    failed = [c["component"] for c in summary.get("checks", []) if c.get("status") == "fail"]
    if not summary:
        return Row(name, FAIL, f"no result (exit {res.returncode}): {(res.stderr or res.stdout).strip()[-300:]}")
    if not failed:
        passed = "passed (" + ", ".join(c["component"] for c in summary.get("checks", [])) + ")"
        if _certificate_refused(server_row):  # FLARE's dry run only connects; it never presents the certificate
            return Row(name, WARN, f"{passed}, but it does not test this kit's certificate, and the server's TLS "
                                   f"handshake with it failed (server TLS row)", server_row.fix)
        return Row(name, OK, passed)
    only_server = problems and all("server available" in p.lower() for p in problems)
    if only_server and server_row is not None:
        return Row(name, server_row.status, "; ".join(problems) + " (as the server row says; FLARE's dry run of the "
                   "site needs the server)", server_row.fix)
    return Row(name, FAIL, "; ".join(problems) or f"failed: {', '.join(failed)}",
               f"see `nvflare preflight-check -p {kit}`")


# ---- the site check -----------------------------------------------------------------------------

@dataclass
class SiteCheck:
    """Every row for one kit; ``ok`` when no row fails."""

    kit: str
    site: str
    role: str
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != FAIL for r in self.rows)

    def to_json(self) -> dict:
        return {"kit": self.kit, "site": self.site, "role": self.role, "ok": self.ok,
                "rows": [asdict(r) for r in self.rows]}


def _uid_from_start_script(kit: Path) -> str | None:
    try:
        text = (Path(kit) / "startup" / "sub_start.sh").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("uid="):
            return word[4:]
    return None


def check_kit_integrity(kit: Path) -> tuple[Row, str | None]:
    """The signed manifest: startup/ edits fail, local/ edits warn, the site's own fedbrain_site.json is expected."""
    name = "kit integrity"
    try:
        state = verify_manifest(kit)
    except KitError as e:
        return Row(name, FAIL, str(e), "restore the kit you were sent, or ask the consortium for a new one"), None
    refused = state.refused()
    if refused:
        return Row(name, FAIL, "; ".join(f"{kit / f}: {why} since provisioning" for f, why in refused),
                   "startup/ is the consortium's: restore those files from the kit you were sent"), state.participant
    expected = f"local/{SITE_CONFIG}"
    local = [(f, why) for f, why in state.local_changes() if not (f == expected and why == "added")]
    if local:
        return Row(name, WARN, "; ".join(f"{f}: {why} since provisioning" for f, why in local),
                   "local/ is yours: fine if you changed it on purpose (restart the site after editing policies)"), \
            state.participant
    by = " (signed with the site's own key: a kit it assembled itself, distributed provisioning)" \
        if state.signer == "participant" else ""
    return Row(name, OK, f"signed manifest of '{state.participant}' matches every file{by}"), state.participant


def check_certificates(kit: Path, site: str | None, now: datetime.datetime | None = None) -> Row:
    name = "certificate"
    try:
        info = check_certificate(kit, expected_name=site, now=now)
    except KitError as e:
        return Row(name, FAIL, str(e), "ask the consortium for a new kit" if "expired" in str(e) else
                   "restore the kit you were sent; if it is the one you were sent, ask the consortium")
    days = info.days_left(now)
    text = (f"{info.path.name}: CN '{info.common_name}', issued by the kit's rootCA.pem, key matches, "
            f"expires {info.not_after:%Y-%m-%d} ({days:.0f} days)")
    if days < CERT_WARN_DAYS:
        return Row(name, WARN, text, "ask the consortium to renew this kit now (docs/hospital-it.md, renewing)")
    return Row(name, OK, text)


def check_server(kit: Path, allow_server_down: bool, timeout: float = NETWORK_TIMEOUT_S) -> Row:
    name = "server TLS"
    try:
        result = tls_handshake(kit, timeout=timeout)
    except KitError as e:
        return Row(name, FAIL, str(e), "restore the kit you were sent, or ask the consortium for the current one")
    host, port = server_address(kit)
    if result == "ok":
        return Row(name, OK, f"{host}:{port} reachable; mTLS handshake with this kit's certificate accepted")
    fix = (f"allow outbound TCP to {host}:{port} in the firewall, check DNS for {host}, and ask the consortium "
           f"whether the server is up")
    return Row(name, WARN if allow_server_down else FAIL, result, fix)


def _scheme(kit: Path) -> str:
    """The transport FLARE uses to the server (fed_client.json / fed_admin.json): http, grpc, tcp..."""
    startup = Path(kit) / "startup"
    try:
        if (startup / "fed_client.json").exists():
            return json.loads((startup / "fed_client.json").read_text())["servers"][0]["service"].get("scheme", "grpc")
        return json.loads((startup / "fed_admin.json").read_text())["admin"].get("scheme", "grpc")
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "unknown"


def _certificate_refused(server_row: Row | None) -> bool:
    """The server TLS row failed on certificates (the server answered), not on the network."""
    return server_row is not None and server_row.status != OK and not server_row.detail.startswith("unreachable")


def check_clock(kit: Path, server_row: Row) -> Row:
    if _certificate_refused(server_row):
        return diagnose_clock(None, "the server answered but the TLS handshake failed on certificates (server TLS row)")
    if server_row.status != OK:
        return diagnose_clock(None, "the server is not reachable")
    scheme = _scheme(kit)
    if scheme not in ("http", "https"):
        return diagnose_clock(None, f"the kit connects over {scheme}, which carries no server time; only FLARE's "
                                    f"http scheme answers with a Date header")
    try:
        server_now = server_date(kit)
    except (OSError, ssl.SSLError, KitError, ValueError) as e:
        return diagnose_clock(None, f"no answer to an HTTP request ({e})")
    if server_now is None:
        return diagnose_clock(None, "the server sent no Date header (FLARE's gRPC scheme has none)")
    # The Date header has 1 s resolution and is stamped before we read it: half a second on average.
    skew = (datetime.datetime.now(datetime.timezone.utc) - server_now).total_seconds() - 0.5
    return diagnose_clock(skew)


def check_site_config(kit: Path, site: str, datalist: str | None, progress: bool) -> tuple[list[Row], str | None]:
    """local/fedbrain_site.json (or FEDBRAIN_DATALIST / --data) is valid and its datalist passes `fedbrain data check`."""
    from fedbrain.data.check import check_datalist, summarize
    from fedbrain.data.datalist import DatalistError
    from fedbrain.fl.site import SiteConfigError, resolve_site_settings

    try:
        settings = resolve_site_settings(site, datalist, cwd=Path(kit))
    except SiteConfigError as e:
        return [Row("site settings", FAIL, str(e), f"copy local/{SITE_CONFIG}.template to local/{SITE_CONFIG} "
                                                    f"and set datalist (docs/hospital-it.md, section 4)")], None
    rows = [Row("site settings", OK, f"datalist {settings.datalist} (from {settings.source})"
                + (f", DP budget epsilon {settings.budget.epsilon:g}" if settings.budget.epsilon else ""))]
    try:
        results = check_datalist(settings.datalist, root=settings.data_root, progress=progress)
    except (DatalistError, OSError) as e:
        rows.append(Row("data", FAIL, f"{e}", f"fix the datalist, then run `fedbrain data check {settings.datalist}`"))
        return rows, settings.device
    counts = summarize(results)
    bad = [r for r in results if not r.ok]
    text = f"{counts['ok']} cases ok / {counts['problems']} with problems"
    if bad:
        text += ": " + "; ".join(f"{r.case_id}: {r.problems[0]}" for r in bad[:3]) + (" ..." if len(bad) > 3 else "")
    status = OK if not bad else (FAIL if not counts["ok"] else WARN)
    rows.append(Row("data", status, text, "" if not bad else
                    f"`fedbrain data check {settings.datalist}` lists every problem; training skips those cases"))
    return rows, settings.device


def check_secrets(kit: Path) -> Row:
    """Private keys and HE contexts readable by the owner only (FLARE leaves them 0644 under umask 022)."""
    from fedbrain.ops.kit import SECRET_PATTERNS, exposed_secrets, secret_files

    name = "secrets readable by owner only"
    exposed = exposed_secrets(kit)
    if exposed:
        return Row(name, FAIL, "group/world-readable: " + ", ".join(f"{p} ({p.stat().st_mode & 0o777:o})" for p in exposed),
                   "chmod 600 " + " ".join(str(p) for p in exposed) + " && chmod 700 "
                   + " ".join(sorted({str(p.parent) for p in exposed})))
    return Row(name, OK, f"{len(secret_files(kit))} secret file(s) ({', '.join(SECRET_PATTERNS)}), all owner-only")


def run_site_check(kit: Path, datalist: str | None = None, expect_version: str | None = None,
                   path: str | None = None, python: str | None = None, allow_server_down: bool = False,
                   workspace: Path | None = None, needs: Needs | None = None, preflight: bool = True,
                   gpu: GpuFacts | None = None, resources: Resources | None = None,
                   python_facts: dict | None = None, progress: bool = False) -> SiteCheck:
    """All checks for one kit. ``path``/``python`` say which python3 the start script runs; ``gpu``,
    ``resources`` and ``python_facts`` (what :func:`probe_python` returns) replace the probes:
    tests inject the facts of other machines."""
    from fedbrain import __version__

    kit = Path(kit).resolve()
    try:
        role, _, _ = kit_identity(kit)
    except KitError as e:
        return SiteCheck(str(kit), kit.name, "unknown", [Row("kit", FAIL, str(e), "point --kit at the folder you "
                                                                               "were sent (it holds startup/)")])
    integrity, participant = check_kit_integrity(kit)
    site = participant or _uid_from_start_script(kit) or kit.name
    result = SiteCheck(str(kit), site, role, [integrity, check_certificates(kit, site), check_secrets(kit)])
    server_row = None
    if role in ("client", "admin"):
        server_row = check_server(kit, allow_server_down)
        result.rows += [server_row, check_clock(kit, server_row)]
    python = python or start_script_python(path)
    if preflight:
        if site_running(kit, workspace or os.environ.get("NVFL_WORKSPACE")):
            result.rows.append(Row("FLARE preflight-check", WARN, "skipped: this site is running, and FLARE's dry run "
                                   "would start a second copy of it", "run it while the site is stopped"))
        else:
            result.rows.append(flare_preflight(kit, python, server_row))
    facts = {} if role == "admin" else python_facts if python_facts is not None else probe_python(python)
    if role != "admin":
        result.rows.append(diagnose_python(facts, python, expect_version or __version__))
    device = None
    if role == "client":
        config_rows, device = check_site_config(kit, site, datalist, progress)
        result.rows += config_rows
    if role == "admin":
        return result
    if gpu is None:
        gpu = gpu_facts(facts, probe_nvidia(), device)
    elif device and gpu.device is None:
        gpu.device = device
    gpu_row = diagnose_gpu(gpu)
    result.rows.append(gpu_row)
    uses_gpu = gpu_row.status == OK and gpu.torch_cuda is not None and gpu.cuda_available
    if resources is None:
        resources = probe_resources(Path(workspace or os.environ.get("NVFL_WORKSPACE") or kit), gpu.gpus)
    result.rows += diagnose_resources(resources, needs or Needs(), uses_gpu)
    return result


def render(check: SiteCheck, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    colour = {OK: "green", WARN: "yellow", FAIL: "red"}
    fails = sum(r.status == FAIL for r in check.rows)
    warns = sum(r.status == WARN for r in check.rows)
    table = Table(title=f"Site check: {escape(check.site)} ({check.role} kit {escape(check.kit)})", show_lines=True,
                  caption=f"{fails} failed, {warns} warnings: " + ("ready" if not fails else "not ready"))
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("found", overflow="fold")
    table.add_column("what to do", overflow="fold")
    for r in check.rows:
        table.add_row(r.check, f"[{colour[r.status]}]{r.status}[/]", escape(r.detail), escape(r.fix))
    console.print(table)
