"""`fedbrain site check` on real provisioned kits: a healthy site passes, and each fault (edited,
corrupted, foreign or expiring certificate, unreachable server, skewed clock, missing fedbrain,
bad data, driver/CUDA mismatch) is named in its own row. The server is a small mTLS listener
holding the consortium's server certificate (as FLARE's HTTP driver, it answers with a Date
header): no FLARE server is started. GPU facts are injected."""

from __future__ import annotations

import datetime
import email.utils
import json
import os
import shutil
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_datalist_check import _make_case  # a real-file case from nibabel's scanner image

from fedbrain.ops import site_check as sc
from fedbrain.ops.provision import CONSORTIUM_TEMPLATE, provision

SERVER = "localhost"
CPU_BOX = sc.GpuFacts(torch_version="2.13.0+cpu")
BIG_BOX = sc.Resources("/ws", disk_free_gib=500, ram_total_gib=64, ram_available_gib=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _provision(out: Path, fl_port: int, admin_port: int) -> Path:
    """The production template with the server on this machine's loopback."""
    project = yaml.safe_load(CONSORTIUM_TEMPLATE.read_text())
    for p in project["participants"]:
        if p["type"] == "server":
            p.update(name=SERVER, fed_learn_port=fl_port, admin_port=admin_port)
    out.mkdir(parents=True)
    f = out / "project.yml"
    f.write_text(yaml.safe_dump(project))
    return provision(f, out / "kits", env={**os.environ, "HOME": str(out)})


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    base = tmp_path_factory.mktemp("consortia")
    port = _free_port()
    ours = _provision(base / "ours", port, _free_port())
    foreign = _provision(base / "foreign", port, _free_port())  # same names, another root CA
    return {"ours": ours, "foreign": foreign, "port": port}


class FakeServer:
    """An mTLS listener with a server kit's certificate that requires a client certificate from
    that kit's rootCA and answers any HTTP request with a Date header ``offset_s`` off our clock."""

    def __init__(self, server_kit: Path, port: int, offset_s: float = 0.0):
        startup = server_kit / "startup"
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(startup / "server.crt", startup / "server.key")
        self.ctx.load_verify_locations(startup / "rootCA.pem")
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.offset_s = offset_s
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        try:
            conn.settimeout(3)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(1024)
                    if not chunk:
                        return
                    data += chunk
                date = email.utils.formatdate(time.time() + self.offset_s, usegmt=True)
                tls.sendall(f"HTTP/1.1 404 Not Found\r\nDate: {date}\r\nContent-Length: 0\r\n\r\n".encode())
        except (OSError, ssl.SSLError):
            pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    path = root / "datalist.json"
    path.write_text(json.dumps({"training": [_make_case(root, "c1")], "validation": [_make_case(root, "c2")]}))
    return path


def _site(consortium, tmp_path, datalist=None, name="hospital-a", which="ours") -> Path:
    kit = Path(shutil.copytree(consortium[which] / name, tmp_path / which / name, symlinks=True))
    if datalist:
        (kit / "local" / "fedbrain_site.json").write_text(json.dumps({"datalist": str(datalist), "device": "auto"}))
    return kit


def _rows(check) -> dict:
    return {r.check: r for r in check.rows}


def _check(kit, **kw):
    kw = {"preflight": False, "gpu": CPU_BOX, "resources": BIG_BOX, "python_facts": HEALTHY_PYTHON,
          "python": sys.executable, **kw}
    return sc.run_site_check(kit, **kw)


HEALTHY_PYTHON = {"executable": "/opt/venv/bin/python3", "python": "3.11.7", "fedbrain": "0.1.0",
                  "nvflare": "2.9.0", "torch": "2.13.0+cpu"}


@pytest.fixture(autouse=True)
def _no_server_env(monkeypatch):
    monkeypatch.delenv("FEDBRAIN_DATALIST", raising=False)
    monkeypatch.delenv("NVFL_WORKSPACE", raising=False)


# ---- the whole check -----------------------------------------------------------------------------

def test_a_healthy_site_passes_every_row(consortium, datalist, tmp_path):
    """Real probes of this machine's python (the venv's, as a service's PATH would put first) and FLARE's
    own preflight (a 5 s dry run of the client against the listener)."""
    kit = _site(consortium, tmp_path, datalist)
    venv_bin = str(Path(sys.executable).parent)
    with FakeServer(consortium["ours"] / SERVER, consortium["port"]):
        check = sc.run_site_check(kit, path=venv_bin, resources=BIG_BOX, preflight=True)
    rows = _rows(check)
    assert check.ok, [r for r in check.rows if r.status != sc.OK]
    assert check.site == "hospital-a" and check.role == "client"
    assert {r.check for r in check.rows} >= {"kit integrity", "certificate", "secrets readable by owner only",
                                              "server TLS", "clock vs server",
                                              "FLARE preflight-check", "python of the start script", "site settings",
                                              "data", "GPU / CUDA", "disk for job workspaces", "memory"}
    assert rows["kit integrity"].status == sc.OK  # local/fedbrain_site.json added: expected, not a warning
    assert rows["clock vs server"].status == sc.OK and "in step" in rows["clock vs server"].detail
    assert rows["data"].detail.startswith("2 cases ok / 0 with problems")
    assert "fedbrain 0.1.0" in rows["python of the start script"].detail
    assert rows["FLARE preflight-check"].detail.startswith("passed")
    assert not [r for r in check.rows if r.status == sc.WARN], check.rows
    assert not (kit / "log.txt").exists()  # FLARE's dry run wrote into a copy of the kit


def test_a_kit_whose_server_is_not_running(consortium, datalist, tmp_path):
    kit = _site(consortium, tmp_path, datalist)
    rows = _rows(_check(kit, preflight=True))
    server = rows["server TLS"]
    assert server.status == sc.FAIL and server.detail.startswith(f"unreachable: {SERVER}:{consortium['port']}")
    assert "firewall" in server.fix
    assert rows["clock vs server"].status == sc.WARN and "not reachable" in rows["clock vs server"].detail
    assert rows["FLARE preflight-check"].status == sc.FAIL and "Can't connect" in rows["FLARE preflight-check"].detail
    relaxed = _check(kit, allow_server_down=True)
    assert _rows(relaxed)["server TLS"].status == sc.WARN and relaxed.ok


def test_a_corrupted_certificate_fails_the_certificate_row_naming_the_file(consortium, datalist, tmp_path):
    kit = _site(consortium, tmp_path, datalist)
    crt = kit / "startup" / "client.crt"
    crt.write_bytes(crt.read_bytes().replace(b"M", b"N", 5))
    check = _check(kit)
    rows = _rows(check)
    assert not check.ok
    assert rows["certificate"].status == sc.FAIL and f"{crt}: corrupted" in rows["certificate"].detail
    assert rows["kit integrity"].status == sc.FAIL and "startup/client.crt: edited" in rows["kit integrity"].detail
    assert rows["server TLS"].status == sc.FAIL and "client.crt" in rows["server TLS"].detail


def test_a_foreign_certificate_and_a_foreign_server(consortium, datalist, tmp_path):
    kit = _site(consortium, tmp_path, datalist)
    foreign = consortium["foreign"] / "hospital-a" / "startup"
    for name in ("client.crt", "client.key"):
        shutil.copy(foreign / name, kit / "startup" / name)
    rows = _rows(_check(kit, allow_server_down=True))
    assert rows["certificate"].status == sc.FAIL and "not issued by this kit's root CA" in rows["certificate"].detail
    # An intact kit of another consortium meets our server: the server refuses its certificate.
    other = _site(consortium, tmp_path, datalist, which="foreign")
    with FakeServer(consortium["ours"] / SERVER, consortium["port"]):
        rows = _rows(_check(other, preflight=True))
    assert rows["kit integrity"].status == sc.OK and rows["certificate"].status == sc.OK
    assert rows["server TLS"].status == sc.FAIL
    assert "does not belong to this consortium" in rows["server TLS"].detail or "did not issue" in rows["server TLS"].detail
    # the other rows say why, not "not reachable" or a plain "passed"
    assert "failed on certificates" in rows["clock vs server"].detail, rows["clock vs server"]
    assert "not reachable" not in rows["clock vs server"].detail
    preflight = rows["FLARE preflight-check"]  # FLARE's dry run reaches the listener: it must not read as all clear
    assert preflight.detail.startswith("passed") and preflight.status == sc.WARN, preflight
    assert "does not test this kit's certificate" in preflight.detail


def test_expired_and_expiring_certificates(consortium, tmp_path):
    kit = _site(consortium, tmp_path)
    now = datetime.datetime.now(datetime.timezone.utc)
    soon = sc.check_certificates(kit, "hospital-a", now=now + datetime.timedelta(days=345))
    assert soon.status == sc.WARN and "renew" in soon.fix
    gone = sc.check_certificates(kit, "hospital-a", now=now + datetime.timedelta(days=400))
    assert gone.status == sc.FAIL and "client.crt: expired on" in gone.detail and "new kit" in gone.fix
    wrong = sc.check_certificates(kit, "hospital-b")
    assert wrong.status == sc.FAIL and "issued to 'hospital-a', but this kit is 'hospital-b'" in wrong.detail


def test_edited_kit_files(consortium, datalist, tmp_path):
    kit = _site(consortium, tmp_path, datalist)
    cfg = kit / "startup" / "fed_client.json"
    cfg.write_text(cfg.read_text().replace(SERVER, "evil.example.org"))
    row = _rows(_check(kit, allow_server_down=True))["kit integrity"]
    assert row.status == sc.FAIL and f"{kit}/startup/fed_client.json: edited since provisioning" in row.detail
    kit2 = _site(consortium, tmp_path / "2", datalist)
    privacy = kit2 / "local" / "privacy.json"
    privacy.write_text(privacy.read_text().replace("100.0", "50.0"))
    row = _rows(_check(kit2, allow_server_down=True))["kit integrity"]
    assert row.status == sc.WARN and "local/privacy.json: edited" in row.detail


def test_the_start_script_python_without_fedbrain(consortium, datalist, tmp_path):
    """The service's PATH finds a python3 that has not got fedbrain (here: the base interpreter, isolated)."""
    kit = _site(consortium, tmp_path, datalist)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    python3.write_text(f"#!/bin/sh\nexec {base} -I -S \"$@\"\n")
    python3.chmod(0o755)
    assert sc.start_script_python(str(bin_dir)) == str(python3)
    rows = _rows(sc.run_site_check(kit, path=str(bin_dir), preflight=False, gpu=CPU_BOX, resources=BIG_BOX,
                                   allow_server_down=True))
    row = rows["python of the start script"]
    assert row.status == sc.FAIL and f"{python3} cannot import fedbrain" in row.detail
    assert "pip install fedbrain==0.1.0" in row.fix
    old = sc.diagnose_python({**HEALTHY_PYTHON, "fedbrain": "0.0.9"}, "/opt/venv/bin/python3", "0.1.0")
    assert old.status == sc.FAIL and "has fedbrain 0.0.9, the consortium expects 0.1.0" in old.detail
    assert sc.diagnose_python({"error": "no python3 on PATH"}, None, "0.1.0").status == sc.FAIL


def test_site_settings_and_data(consortium, datalist, tmp_path):
    kit = _site(consortium, tmp_path)
    rows = _rows(_check(kit, allow_server_down=True))
    assert rows["site settings"].status == sc.FAIL and "fedbrain_site.json.template" in rows["site settings"].fix
    (kit / "local" / "fedbrain_site.json").write_text("{not json")
    rows = _rows(_check(kit, allow_server_down=True))
    assert rows["site settings"].status == sc.FAIL and "not valid JSON" in rows["site settings"].detail
    (kit / "local" / "fedbrain_site.json").write_text(json.dumps({"datalist": str(tmp_path / "nowhere.json")}))
    rows = _rows(_check(kit, allow_server_down=True))
    assert rows["site settings"].status == sc.OK and rows["data"].status == sc.FAIL
    assert "nowhere.json" in rows["data"].detail
    # one good, one broken case: training skips the broken one -> a warning with the count
    root = tmp_path / "data"
    good, bad = _make_case(root, "g1"), _make_case(root, "b1")
    (root / "cases" / "b1" / "flair.nii.gz").write_bytes(b"\x1f\x8b truncated")
    mixed = root / "datalist.json"
    mixed.write_text(json.dumps({"training": [good, bad]}))
    rows = _rows(_check(kit, allow_server_down=True, datalist=str(mixed)))
    assert rows["data"].status == sc.WARN and rows["data"].detail.startswith("1 cases ok / 1 with problems: b1:")
    assert rows["site settings"].detail.startswith(f"datalist {mixed} (from caller)")


def test_clock_skew_against_the_server(consortium, datalist, tmp_path):
    kit = _site(consortium, tmp_path, datalist)
    with FakeServer(consortium["ours"] / SERVER, consortium["port"], offset_s=-7200):
        rows = _rows(_check(kit))
    assert rows["server TLS"].status == sc.OK
    clock = rows["clock vs server"]
    assert clock.status == sc.FAIL and "7200 s ahead of the server" in clock.detail
    assert sc.diagnose_clock(120).status == sc.WARN and "behind" in sc.diagnose_clock(-120).detail
    assert sc.diagnose_clock(0.4).status == sc.OK
    assert sc.diagnose_clock(None, "gRPC").status == sc.WARN
    cfg = kit / "startup" / "fed_client.json"
    cfg.write_text(cfg.read_text().replace('"scheme": "http"', '"scheme": "grpc"'))
    grpc = sc.check_clock(kit, sc.Row("server TLS", sc.OK, ""))
    assert grpc.status == sc.WARN and "connects over grpc, which carries no server time" in grpc.detail


def test_server_and_admin_kits(consortium, tmp_path):
    server = _check(consortium["ours"] / SERVER)
    assert server.role == "server" and server.ok
    assert "server TLS" not in _rows(server) and "data" not in _rows(server)
    admin = _check(consortium["ours"] / "admin@example-consortium.org", allow_server_down=True)
    assert admin.role == "admin" and set(_rows(admin)) == {"kit integrity", "certificate", "server TLS",
                                                           "clock vs server", "secrets readable by owner only"}
    assert _rows(admin)["secrets readable by owner only"].status == sc.OK  # an admin's key is a secret too


# ---- GPU / CUDA diagnosis (injected facts) -------------------------------------------------------

CU128 = dict(torch_version="2.13.0+cu128", torch_cuda="12.8",
             arch_list=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"))
A100 = sc.Gpu("NVIDIA A100-SXM4-40GB", (8, 0), 40.0)


def test_old_driver_for_this_torch_is_named_in_plain_words():
    row = sc.diagnose_gpu(sc.GpuFacts(**CU128, driver="470.182.03", gpus=(A100,)))
    assert row.status == sc.FAIL
    assert "driver 470.182.03 supports CUDA <= 11.4; this torch (2.13.0+cu128) needs 12.x" in row.detail
    assert row.fix.startswith("upgrade the driver to >= 525") and "CPU build" in row.fix


def test_gpu_diagnosis_cases():
    ok = sc.diagnose_gpu(sc.GpuFacts(**CU128, driver="570.86.10", gpus=(A100,), cuda_available=True))
    assert ok.status == sc.OK and "A100" in ok.detail
    minor = sc.diagnose_gpu(sc.GpuFacts(**CU128, driver="535.183.01", gpus=(A100,), cuda_available=True))
    assert minor.status == sc.WARN and "supports CUDA <= 12.2" in minor.detail and "minor-version" in minor.detail
    k80 = sc.diagnose_gpu(sc.GpuFacts(**CU128, driver="570.86.10", gpus=(sc.Gpu("Tesla K80", (3, 7), 12.0),)))
    assert k80.status == sc.FAIL and "compute capability 3.7" in k80.detail
    blocked = sc.diagnose_gpu(sc.GpuFacts(**CU128, driver="570.86.10", gpus=(A100,), cuda_available=False,
                                          cuda_error="CUDA initialization: no CUDA-capable device is detected"))
    assert blocked.status == sc.FAIL and "no CUDA-capable device" in blocked.detail and "/dev/nvidia" in blocked.fix
    cpu_build = sc.diagnose_gpu(sc.GpuFacts(torch_version="2.13.0+cpu", driver="550.54.14", gpus=(A100,)))
    assert cpu_build.status == sc.WARN and "CPU build" in cpu_build.detail and "whl/cu124" in cpu_build.fix
    no_driver = sc.diagnose_gpu(sc.GpuFacts(**CU128))
    assert no_driver.status == sc.WARN and "no NVIDIA driver" in no_driver.detail
    assert sc.diagnose_gpu(sc.GpuFacts(**CU128, device="cuda")).status == sc.FAIL
    assert sc.diagnose_gpu(sc.GpuFacts(**CU128, device="cpu")).status == sc.OK
    assert sc.diagnose_gpu(CPU_BOX).status == sc.OK
    assert sc.diagnose_gpu(sc.GpuFacts()).status == sc.FAIL  # torch does not import
    # PTX of an older capability runs on a newer GPU; binaries only within their major
    assert sc.torch_runs_on((9, 0), ("sm_80", "compute_80")) and not sc.torch_runs_on((9, 0), ("sm_80", "sm_86"))
    assert sc.torch_runs_on((8, 9), ("sm_86",)) and not sc.torch_runs_on((8, 0), ("sm_86",))


def test_driver_table_and_nvidia_smi_parsing():
    assert sc.driver_max_cuda("470.82.01") == (11, 4) and sc.driver_max_cuda("580.65.06") == (13, 0)
    assert sc.driver_max_cuda("525.60.13") == (12, 0) and sc.driver_max_cuda("390.1") is None
    majors = [b for b, _ in sc.DRIVER_MAX_CUDA]
    assert majors == sorted(majors, reverse=True)
    driver, gpus = sc.parse_nvidia_smi("550.54.14, NVIDIA A100-SXM4-40GB, 40960, 8.0\n"
                                       "550.54.14, NVIDIA A10, 23028, 8.6\n")
    assert driver == "550.54.14" and [g.capability for g in gpus] == [(8, 0), (8, 6)]
    assert gpus[0].memory_gib == 40.0
    facts = sc.gpu_facts({"torch": "2.13.0+cu128", "torch_cuda": "12.8", "arch_list": ["sm_80"],
                          "cuda_available": True, "capabilities": [[8, 0]]},
                         sc.parse_nvidia_smi("470.1, Tesla T4, 15360"), device=None)
    assert facts.gpus[0].capability == (8, 0) and facts.driver == "470.1"


def test_resources_against_the_need():
    small = sc.Resources("/srv/ws", disk_free_gib=5, ram_total_gib=4, ram_available_gib=3, gpu_memory_gib=(6.0,))
    rows = {r.check: r for r in sc.diagnose_resources(small, sc.Needs(), uses_gpu=True)}
    assert rows["disk for job workspaces"].status == sc.FAIL and "/srv/ws" in rows["disk for job workspaces"].detail
    assert rows["memory"].status == sc.FAIL and rows["GPU memory"].status == sc.FAIL
    busy = sc.Resources("/ws", 100, ram_total_gib=32, ram_available_gib=2)
    assert {r.check: r for r in sc.diagnose_resources(busy, sc.Needs(), False)}["memory"].status == sc.WARN
    assert all(r.status == sc.OK for r in sc.diagnose_resources(BIG_BOX, sc.Needs(), False))
    probed = sc.probe_resources(Path("/nonexistent/ws"))
    assert probed.disk_free_gib > 0 and probed.ram_total_gib > 0


def test_the_injected_gpu_goes_through_the_whole_check(consortium, datalist, tmp_path):
    kit = _site(consortium, tmp_path, datalist)
    check = _check(kit, allow_server_down=True, gpu=sc.GpuFacts(**CU128, driver="470.182.03", gpus=(A100,)))
    assert not check.ok and _rows(check)["GPU / CUDA"].status == sc.FAIL


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_json_is_the_only_stdout_and_the_exit_code_follows_failures(consortium, tmp_path, capsys):
    from fedbrain.cli import main

    kit = _site(consortium, tmp_path)  # no fedbrain_site.json: fails
    code = main(["site", "check", "--kit", str(kit), "--json", "--no-preflight", "--allow-server-down",
                 "--python", sys.executable])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["ok"] is False and out["site"] == "hospital-a"
    statuses = {r["check"]: r["status"] for r in out["rows"]}
    assert statuses["site settings"] == "fail" and statuses["python of the start script"] == "ok"


def test_a_group_or_world_readable_key_fails_with_the_chmod_to_run(consortium, tmp_path):
    """FLARE's provisioning leaves keys and HE contexts 0644 under umask 022; fedbrain's are 0600, and a
    key someone opened up again is a failure that says exactly what to run."""
    kit = _site(consortium, tmp_path)
    assert _rows(_check(kit))["secrets readable by owner only"].status == sc.OK
    key = kit / "startup" / "client.key"
    key.chmod(0o644)
    row = _rows(_check(kit))["secrets readable by owner only"]
    assert row.status == sc.FAIL and f"{key} (644)" in row.detail
    assert row.fix.startswith(f"chmod 600 {key}")
