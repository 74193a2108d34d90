"""docker/: what can be checked without a Docker daemon. The compose file parses and mounts every
kit read-only with a separate writable workspace; no kit, key or certificate can reach an image;
the entry point runs `fedbrain site check` before the kit's sub_start.sh (and not at all if the
check fails); the health check follows FLARE's pid file."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def _mount(volume: str) -> tuple[str, tuple[str, str]]:
    """'SRC:DST[:MODE]' (SRC may hold ${VAR:?message} with colons) -> (DST, (SRC, MODE))."""
    mode = "rw"
    if volume.endswith((":ro", ":rw")):
        volume, mode = volume[:-3], volume[-2:]
    source, _, target = volume.rpartition(":")
    return target, (source, mode)


def test_compose_parses_and_mounts_kits_read_only():
    services = _compose()["services"]
    assert "server" in services and len([s for s in services if s != "server"]) >= 2
    for name, svc in services.items():
        mounts = dict(_mount(v) for v in svc["volumes"])
        source, mode = mounts["/kit"]
        assert mode == "ro" and "${KITS" in source, (name, source, mode)
        source, mode = mounts["/workspace"]
        assert source.endswith("-workspace") and mode == "rw"  # a named volume, writable, not the kit
        assert svc["restart"] == "unless-stopped" and svc["build"]["dockerfile"] == "docker/Dockerfile"
        if name != "server":
            assert mounts["/data"][1] == "ro" and svc["depends_on"] == ["server"]
            assert svc["build"]["target"] == "site" and svc["environment"]["FEDBRAIN_DATALIST"].startswith("/data/")
    assert services["server"]["build"]["target"] == "server"
    named = {src for svc in services.values() for src, _ in (_mount(v)[1] for v in svc["volumes"])
             if not src.startswith(("$", ".", "/"))}
    assert named == set(_compose()["volumes"])  # every writable volume declared, one per participant
    alias = services["server"]["networks"]["flare"]["aliases"][0]
    assert "fl-server.example-consortium.org" in alias  # the server name the sites' kits connect to


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    return [(line.split()[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_no_kit_key_or_certificate_can_reach_an_image():
    steps = _instructions((DOCKER / "Dockerfile").read_text())
    sources = []
    for op, args in steps:
        if op in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    allowed = {"pyproject.toml", "README.md", "custom/", "requirements.txt", "/wheels/",
               "docker/entrypoint.sh", "docker/healthcheck.sh"}
    assert set(sources) <= allowed, set(sources) - allowed
    assert not any(op == "ADD" for op, _ in steps)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {"**/startup/", "**/*.key", "**/prod_*/"} <= set(ignore)
    assert not [p for pattern in ("*.key", "*.crt", "*.pem") for p in (REPO / "custom").rglob(pattern)]


def test_images_run_as_a_user_with_cpu_torch_by_default_and_a_cuda_argument():
    text = (DOCKER / "Dockerfile").read_text()
    steps = _instructions(text)
    targets = [args.split()[-1] for op, args in steps if op == "FROM"]
    assert targets == ["wheel", "runtime", "server", "site"]  # site last: the default target
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "ARG TORCH_VARIANT=cpu" in text and "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert 'HEALTHCHECK' in text and 'ENTRYPOINT ["entrypoint.sh"]' in text and 'CMD ["start"]' in text
    assert "fedbrain-*.whl" in text and "COPY custom/" in text.split("AS runtime")[0]  # source only in the wheel stage


def _fake_env(tmp_path: Path, check_exit: int) -> tuple[dict, Path, Path]:
    """A PATH whose `fedbrain` records its arguments, and a kit whose sub_start.sh records that it ran."""
    bin_dir, kit = tmp_path / "bin", tmp_path / "kit"
    (kit / "startup").mkdir(parents=True)
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    (bin_dir / "fedbrain").write_text(f'#!/bin/sh\necho "fedbrain $*" >> {log}\nexit {check_exit}\n')
    (kit / "startup" / "sub_start.sh").write_text(f'#!/bin/sh\necho "sub_start NVFL_WORKSPACE=$NVFL_WORKSPACE" >> {log}\n')
    for f in (bin_dir / "fedbrain", kit / "startup" / "sub_start.sh"):
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FEDBRAIN_KIT": str(kit), "NVFL_WORKSPACE": str(tmp_path / "ws")}
    return env, kit, log


def test_entrypoint_runs_the_site_check_before_the_kit(tmp_path):
    env, kit, log = _fake_env(tmp_path, check_exit=0)
    res = subprocess.run([str(DOCKER / "entrypoint.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith(f"fedbrain site check --kit {kit} --workspace {tmp_path / 'ws'} --allow-server-down")
    assert calls[1] == f"sub_start NVFL_WORKSPACE={tmp_path / 'ws'}"


def test_entrypoint_does_not_start_a_kit_that_fails_the_check(tmp_path):
    env, _, log = _fake_env(tmp_path, check_exit=1)
    res = subprocess.run([str(DOCKER / "entrypoint.sh"), "start"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and not any(c.startswith("sub_start") for c in log.read_text().splitlines())
    # other commands run as given, without the check
    res = subprocess.run([str(DOCKER / "entrypoint.sh"), "fedbrain", "--version"], env=env, timeout=30)
    assert log.read_text().splitlines()[-1] == "fedbrain --version"
    missing = subprocess.run([str(DOCKER / "entrypoint.sh")], env={**env, "FEDBRAIN_KIT": str(tmp_path / "none")},
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "mount the participant's kit" in missing.stderr


def test_a_restarted_container_starts_flare_despite_its_previous_pid_files(tmp_path):
    """FLARE's sub_start.sh refuses to start when daemon_pid.fl names a live process: after a container restart
    that is PID 1 again, the entry point itself (seen with podman: the site stayed down, exit status 0)."""
    env, kit, log = _fake_env(tmp_path, check_exit=0)
    ws = Path(env["NVFL_WORKSPACE"])
    ws.mkdir()
    for stale in ("daemon_pid.fl", "pid.fl", "shutdown.fl", "restart.fl"):
        (ws / stale).write_text("1\n")
    (kit / "startup" / "sub_start.sh").write_text(
        f'#!/bin/sh\nls "$NVFL_WORKSPACE" | sed "s/^/left: /" >> {log}\necho "sub_start ran" >> {log}\n')
    res = subprocess.run([str(DOCKER / "entrypoint.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert calls[-1] == "sub_start ran" and not [c for c in calls if c.startswith("left: ")], calls


def test_a_stopped_container_stops_flare_at_once(tmp_path):
    """`docker stop` and a pod's end send SIGTERM to PID 1, the entry point: it asks sub_start.sh to stop
    (shutdown.fl), TERMs the FLARE process it supervises and exits 0 within seconds, not after the grace period."""
    import signal
    import time

    env, kit, log = _fake_env(tmp_path, check_exit=0)
    # shaped like FLARE's sub_start.sh: starts "FLARE", writes pid.fl, polls; ends once FLARE is gone and shutdown.fl is there
    (kit / "startup" / "sub_start.sh").write_text(f"""#!/bin/bash
mkdir -p "$NVFL_WORKSPACE"
sleep 300 &
echo $! > "$NVFL_WORKSPACE/pid.fl"
echo started >> {log}
while true; do
  sleep 0.2
  if ! kill -0 "$(cat "$NVFL_WORKSPACE/pid.fl")" 2>/dev/null && [[ -f "$NVFL_WORKSPACE/shutdown.fl" ]]; then
    echo gracefully >> {log}
    break
  fi
done
rm -f "$NVFL_WORKSPACE/pid.fl" "$NVFL_WORKSPACE/shutdown.fl"
""")
    proc = subprocess.Popen([str(DOCKER / "entrypoint.sh")], env=env)
    try:
        deadline = time.monotonic() + 20
        while "started" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.1)
        flare = int((tmp_path / "ws" / "pid.fl").read_text())
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - asked < 5
    finally:
        proc.kill()
    assert log.read_text().splitlines()[-1] == "gracefully"
    assert not Path(f"/proc/{flare}").exists()  # the supervised process was stopped, not left behind


def test_healthcheck_follows_flares_pid_file(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "NVFL_WORKSPACE": str(tmp_path)}
    check = [str(DOCKER / "healthcheck.sh")]
    assert subprocess.run(check, env=env).returncode != 0  # no pid.fl yet
    (tmp_path / "pid.fl").write_text(f"{os.getpid()}\n")
    assert subprocess.run(check, env=env).returncode == 0
    (tmp_path / "pid.fl").write_text("999999999\n")
    assert subprocess.run(check, env=env).returncode != 0


def test_the_dockerfile_passes_hadolint():
    """hadolint (requirements-dev.txt), every rule at every level: the images are built rarely (their own make
    target), so the suite is where a Dockerfile mistake is caught."""
    import shutil
    import sys

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed: make test installs requirements-dev.txt"
    res = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
