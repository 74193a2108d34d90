"""Running a site for real: the systemd unit `fedbrain site install-service` writes (systemctl is
never called), and `fedbrain status` from an admin kit over FLARE's admin API (a recorded
session stands in for the server; an unreachable server gives one clear line)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from fedbrain.ops import status as st
from fedbrain.ops.provision import provision
from fedbrain.ops.service import TEMPLATE, ServiceError, render_unit

REPO = Path(__file__).resolve().parents[1]
ADMIN = "admin@example-consortium.org"


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    return provision(REPO / "provisioning" / "consortium" / "project.yml", out, env={**os.environ, "HOME": str(out)})


def _settings(unit: str) -> dict:
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_install_service_writes_a_unit_for_the_kit(kits, tmp_path):
    from fedbrain.cli import main

    kit = kits / "hospital-a"
    out = tmp_path / "fedbrain-hospital-a.service"
    assert main(["site", "install-service", "--kit", str(kit), "--user", "fedbrain", "--output", str(out),
                 "--workspace", "/var/lib/fedbrain/hospital-a", "--data", "/data/brats/datalist.json"]) == 0
    s = _settings(out.read_text())
    assert s["User"] == ["fedbrain"] and s["Restart"] == ["on-failure"]
    assert s["ExecStart"] == [f"{kit}/startup/sub_start.sh"]
    pre = s["ExecStartPre"][0]
    assert pre.startswith(f"{Path(sys.executable).parent}/fedbrain site check --kit {kit} ") and "--allow-server-down" in pre
    # a crash or reboot leaves sub_start.sh's pid files behind: a stale daemon_pid.fl would keep the site down
    assert s["ExecStartPre"][1] == ("/bin/rm -f " + " ".join(f"/var/lib/fedbrain/hospital-a/{f}" for f in
                                    ("daemon_pid.fl", "pid.fl", "shutdown.fl", "restart.fl")))
    env = s["Environment"]
    assert "NVFL_WORKSPACE=/var/lib/fedbrain/hospital-a" in env and "FEDBRAIN_DATALIST=/data/brats/datalist.json" in env
    assert f"PATH={Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin" in env  # sub_start.sh's python3
    assert s["ReadWritePaths"] == ["/var/lib/fedbrain/hospital-a"] and s["WantedBy"] == ["multi-user.target"]
    assert not re.search(r"@[A-Z_]+@", out.read_text())  # every placeholder filled


def test_the_unit_template_ships_in_the_package_and_refuses_what_systemd_would_misread(kits, tmp_path):
    assert TEMPLATE.is_file()
    assert 'ops/*.service' in (REPO / "pyproject.toml").read_text()
    unit = render_unit(kits / "hospital-b", "fedbrain")  # defaults: workspace under /var/lib/fedbrain, no datalist
    assert "NVFL_WORKSPACE=/var/lib/fedbrain/hospital-b" in unit and "FEDBRAIN_DATALIST" not in unit
    with pytest.raises(ServiceError, match="admin kit"):
        render_unit(kits / ADMIN, "fedbrain")
    with pytest.raises(ServiceError, match="characters a systemd unit would misread"):
        render_unit(kits / "hospital-a", "fedbrain", workspace=Path("/var/lib/my site"))
    with pytest.raises(ServiceError, match="not a plain account name"):
        render_unit(kits / "hospital-a", "root; rm")
    assert "fl-server" in render_unit(kits / "fl-server.example-consortium.org", "fedbrain")


def test_install_service_that_cannot_write_says_so(kits, tmp_path, capsys):
    from fedbrain.cli import main

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    assert main(["site", "install-service", "--kit", str(kits / "hospital-a"), "--output",
                 str(blocker / "x.service")]) == 1
    assert "run as root or pass --output" in capsys.readouterr().out


class RecordedSession:
    """What FLARE's admin API returns on a server with two sites and one running job."""

    closed = False

    def get_system_info(self):
        return SimpleNamespace(
            server_info=SimpleNamespace(status="started", start_time=1764500000.0),
            client_info=[SimpleNamespace(name="hospital-a", last_connect_time=1764500100.0),
                         SimpleNamespace(name="hospital-b", last_connect_time=1764500101.5)],
            job_info=[SimpleNamespace(job_id="j-run", app_name="app")])

    def list_jobs(self):
        return [{"job_id": "j-run", "job_name": "segmentation", "status": "RUNNING", "submit_time": "2026-11-30T10:00",
                 "duration": "0:05:00"},
                {"job_id": "j-old", "job_name": "segmentation", "status": "FINISHED:COMPLETED",
                 "submit_time": "2026-11-29T10:00", "duration": "0:30:00"}]

    def get_job_logs(self, job_id, target):
        assert (job_id, target) == ("j-run", "server")
        return {"logs": {"server": "Round 0 started.\nRound 1 started.\n"
                                   "[peer=hospital-b, ...] Aggregated 1/2 results\n"}}

    def get_client_job_status(self):
        return [{"client": "hospital-a", "job_id": "j-run", "status": "running"}]

    def close(self):
        RecordedSession.closed = True


def test_status_from_an_admin_kit(kits):
    seen = {}

    def factory(kit, username, timeout):
        seen.update(kit=kit, username=username)
        return RecordedSession()

    status = st.consortium_status(kits / ADMIN, session_factory=factory)
    assert seen["username"] == ADMIN and RecordedSession.closed  # the CN of the kit's client.crt
    assert status["server"]["address"] == "fl-server.example-consortium.org:8003"
    assert [s["name"] for s in status["sites"]] == ["hospital-a", "hospital-b"]
    assert status["sites"][0]["last_contact"].endswith("UTC")
    running, old = status["jobs"]
    assert running["round"] == 1 and running["aggregated"] == ["hospital-b"] and "round" not in old  # from 0
    assert status["site_jobs"][0]["client"] == "hospital-a"
    json.dumps(status)  # --json output


def test_status_when_the_role_may_not_read_the_job_log(kits):
    class Member(RecordedSession):
        def get_job_logs(self, job_id, target):
            raise PermissionError("not authorized")

    status = st.consortium_status(kits / ADMIN, session_factory=lambda *a: Member())
    assert status["jobs"][0]["round"] is None and "not readable with this kit" in status["jobs"][0]["note"]


def test_status_reads_a_running_jobs_own_record_not_its_log(kits):
    """A running job's server answers show_stats with fedbrain's progress record: its log is not downloaded."""
    record = {"round": 4, "aggregated": ["hospital-a"], "site_metrics": {}, "guard": {}, "closed": None}

    class WithRecord(RecordedSession):
        def show_stats(self, job_id, target_type):
            assert (job_id, target_type) == ("j-run", "server")
            return {"server": {"ServerRunner": {"status": "started"}, "fedbrain_progress": record}}

        def get_job_logs(self, job_id, target):
            raise AssertionError("a running job with a progress record is not read from its log")

    status = st.consortium_status(kits / ADMIN, session_factory=lambda *a: WithRecord())
    assert status["jobs"][0]["round"] == 4 and status["jobs"][0]["aggregated"] == ["hospital-a"]


def test_status_refuses_a_site_kit(kits):
    with pytest.raises(st.StatusError, match="needs an admin's kit"):
        st.consortium_status(kits / "hospital-a")


def test_status_against_an_unreachable_server_is_one_clear_line(kits, capsys):
    """The real admin API, whose server name does not resolve here."""
    from fedbrain.cli import main

    code = main(["status", "--admin-kit", str(kits / ADMIN), "--json", "--timeout", "1"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # FLARE's "Connecting to FLARE ..." went to stderr
    assert code == 1 and out["ok"] is False
    assert "cannot log in to the admin server fl-server.example-consortium.org:8003" in out["error"]


def test_watch_follows_a_job_until_it_ends(kits):
    """Two polls of a running job, then it finishes: the watch ends by itself."""
    from io import StringIO

    from rich.console import Console

    from fedbrain.ops.status import watch

    class Ending(RecordedSession):
        polls = 0

        def list_jobs(self):
            Ending.polls += 1
            jobs = super().list_jobs()
            if Ending.polls >= 3:
                jobs[0]["status"] = "FINISHED:COMPLETED"
            return jobs

    out = StringIO()
    sleeps = []
    last = watch(kits / ADMIN, job="j-run", interval=2.0, console=Console(file=out, width=120),
                 session_factory=lambda *a: Ending(), polls=10, sleep=sleeps.append)
    assert Ending.polls == 3 and sleeps == [2.0, 2.0]
    assert [j["job_id"] for j in last["jobs"]] == ["j-run"] and last["jobs"][0]["status"] == "FINISHED:COMPLETED"
    text = out.getvalue()
    assert "2 sites connected" in text and "FINISHED:COMPLETED" in text  # a file console gets the last view


def test_the_printed_service_steps_leave_the_keys_owner_only(kits, tmp_path):
    """The steps open the kit to the service's group (read-only), then give the key and HE context back to
    the service account alone: following them verbatim must pass site check's secrets row."""
    import shutil
    import subprocess

    from fedbrain.ops import site_check as sc
    from fedbrain.ops.service import install_service

    kit = Path(shutil.copytree(kits / "hospital-a", tmp_path / "hospital-a", symlinks=True))
    _, steps = install_service(kit, "fedbrain", output=tmp_path / "unit.service")
    group_line = next(s for s in steps if "g+rX" in s)
    key_line = next(s for s in steps if "chmod 400" in s)
    assert str(kit / "startup" / "client.key") in key_line
    # as root would run them, minus the ownership changes (no such account here)
    subprocess.run(group_line.split("&&")[1].split("#")[0], shell=True, check=True)
    assert sc.check_secrets(kit).status == sc.FAIL  # the group read alone opens the keys
    subprocess.run(key_line.split("&&")[1].split("#")[0], shell=True, check=True)
    assert sc.check_secrets(kit).status == sc.OK, sc.check_secrets(kit)


def test_the_admin_client_looks_for_its_comm_config_in_the_kit_not_the_working_folder(kits, tmp_path, monkeypatch):
    """FLARE's admin client, left alone, walks the current folder for `comm_config.*` (issue 29: `fedbrain
    status` 11-19 s from a big folder); fedbrain confines the search to the admin's kit."""
    from nvflare.fuel.utils.config_service import ConfigService

    decoy = tmp_path / "home" / "a" / "b"
    decoy.mkdir(parents=True)
    (decoy / "comm_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "home")
    ConfigService.reset()
    try:
        found = ConfigService.load_configuration("comm_config.json")  # what FLARE's cell asks, 15 times per session
        assert found is not None and Path(found.file_path).resolve() == decoy / "comm_config.json"  # on its own: a walk
        st.confine_config_search(kits / ADMIN)
        assert ConfigService.load_configuration("comm_config.json") is None
    finally:
        ConfigService.reset()


def test_the_server_logs_a_refused_tls_handshake_once_a_minute_per_source(tmp_path, caplog):
    """A real asyncio TLS server (as FLARE's aiohttp driver runs one) with the server component installed: a
    client holding another consortium's certificate is refused, and the server's log names who tried and why."""
    import asyncio
    import logging
    import ssl

    from cryptography.hazmat.primitives import serialization

    from fedbrain.ops import handshake_log
    from fedbrain_testing import pki

    ours, theirs = pki.consortium(["server", "hospital-a"]), pki.consortium(["hospital-a"], ca_name="other-ca")

    def files(identity, name):
        key = tmp_path / f"{name}.key"
        key.write_bytes(identity.private_key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        (tmp_path / f"{name}.crt").write_bytes(identity.cert_pem)
        (tmp_path / f"{name}.ca").write_bytes(identity.root_ca_pem)
        return str(tmp_path / f"{name}.crt"), str(key), str(tmp_path / f"{name}.ca")

    server_crt, server_key, server_ca = files(ours["server"], "server")
    good = files(ours["hospital-a"], "good")
    foreign = files(theirs["hospital-a"], "foreign")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=server_ca)
    server_ctx.load_cert_chain(server_crt, server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    handshake_log.RefusedHandshakeLog()  # what the server kit's resources.json builds at start

    async def connect(client):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server_ca)
        ctx.check_hostname = False
        ctx.load_cert_chain(client[0], client[1])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            await asyncio.wait_for(reader.read(1), 1.0)
            writer.close()
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass

    async def main():
        nonlocal port
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        for client in (good, foreign, foreign):
            await connect(client)
        await asyncio.sleep(0.2)
        server.close()

    port = 0
    handshake_log._last.clear()
    with caplog.at_level(logging.WARNING, logger="fedbrain.handshakes"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "fedbrain.handshakes"]
    assert len(lines) == 1, lines  # the intact kit is not reported; the foreign one once in its minute
    assert lines[0].startswith("TLS handshake from 127.0.0.1 failed: its certificate was not issued by this "
                               "consortium's root CA"), lines
    exc = ssl.SSLError("x")  # the same source and reason: again only after a minute
    assert handshake_log.report(("10.0.0.9", 1), exc, now=1000.0)
    assert handshake_log.report(("10.0.0.9", 1), exc, now=1030.0) is None
    assert handshake_log.report(("10.0.0.9", 1), exc, now=1061.0)


def test_server_kits_log_refused_handshakes(tmp_path):
    from fedbrain.ops.builder import HANDSHAKE_LOG, log_refused_handshakes

    res = {"components": [{"id": "x", "path": "a.B"}]}
    log_refused_handshakes(res)
    log_refused_handshakes(res)  # once
    assert [c["id"] for c in res["components"]] == ["x", HANDSHAKE_LOG["id"]]


def test_a_connection_closed_mid_handshake_is_unreachable_not_a_refused_kit(kits, tmp_path):
    """A relay or proxy in front of a server that is not up yet accepts and closes: no TLS alert, so nothing judged
    the certificate. The kit check used to refuse the kit for good ("refused this kit's certificate")."""
    import shutil
    import socket
    import threading

    from fedbrain.ops.kit import tls_handshake

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_and_close():
        for _ in range(3):
            try:
                conn, _ = listener.accept()
                conn.settimeout(5)
                conn.recv(4096)  # the ClientHello: closed unread, it would make the close a reset, not an end of stream
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    kit = Path(shutil.copytree(kits / "hospital-a", tmp_path / "hospital-a"))
    cfg = kit / "startup" / "fed_client.json"
    client = json.loads(cfg.read_text())
    client["servers"][0]["service"]["target"] = f"127.0.0.1:{port}"
    cfg.write_text(json.dumps(client))
    try:
        reach = tls_handshake(kit, timeout=5)
    finally:
        listener.close()
    assert reach.startswith("unreachable:") and "without a refusal" in reach, reach


def test_server_kits_resume_interrupted_jobs(kits):
    from fedbrain.ops.builder import AUTO_RESUME, resume_interrupted_jobs

    res = json.loads((kits / "fl-server.example-consortium.org" / "local" / "resources.json").read_text())
    assert [c for c in res["components"] if c["id"] == AUTO_RESUME["id"]] == [AUTO_RESUME]
    resume_interrupted_jobs(res)  # once
    assert len([c for c in res["components"] if c["id"] == AUTO_RESUME["id"]]) == 1
