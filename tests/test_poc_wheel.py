"""The package works as an installed wheel, outside the checkout: job definitions, site
scripts and provisioning templates ship inside it, and nothing resolves through a repo root; and a data
scientist's POC session through that wheel's CLI (slow: marked poc).

A fresh venv gets only the fedbrain wheel; the pinned dependencies (torch, FLARE, MONAI)
are borrowed from the project venv through a .pth path line (installing them again would
cost minutes and gigabytes), so every fedbrain file it imports comes from the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from fedbrain.ops import site_check as sc
from fedbrain.fl.progress import progress_from_stats
from fedbrain.ops.status import consortium_status, open_session, watch
from fedbrain.poc.consortium import PocConsortium

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.poc


def _run(cmd, cwd, env, timeout=600):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    dist, src = base / "dist", base / "src"
    # Built from a copy of what the Dockerfile's wheel stage copies: an in-tree build reuses the checkout's
    # build/lib/, where a module deleted from custom/ would live on and ship in the wheel under test.
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "custom", src / "custom", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
         cwd=base, env=os.environ.copy())
    wheel = next(dist.glob("fedbrain-*.whl"))
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base, env=os.environ.copy())
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=base, env=os.environ.copy()).strip())
    # The project venv's packages, after the fresh venv's own: its editable fedbrain finder is a
    # .pth of that venv, which a plain path line does not run.
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
         cwd=base, env=os.environ.copy())
    # Console scripts the wheel and FLARE declare, pointing at the fresh interpreter.
    for name, target in (("fedbrain", "fedbrain.cli:main"), ("nvflare", "nvflare.cli:main")):
        module, func = target.split(":")
        script = venv / "bin" / name
        script.write_text(f"#!{py}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(base / "home"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    (base / "home").mkdir()
    work = base / "elsewhere"  # not the checkout
    work.mkdir()
    return {"venv": venv, "py": py, "env": env, "work": work, "site": site}


def test_wheel_carries_site_scripts_and_templates(installed):
    out = _run([str(installed["py"]), "-c",
                "import fedbrain, fedbrain.jobs, fedbrain.poc.consortium as c; print(fedbrain.__file__); "
                "print(fedbrain.jobs.SITES_DIR); print(c.DEFAULT_PROJECT)"],
               cwd=installed["work"], env=installed["env"]).split()
    site = str(installed["site"])
    assert all(line.startswith(site) for line in out), (out, site)
    assert (Path(out[1]) / "segment_client.py").is_file() and (Path(out[1]) / "classify_client.py").is_file()
    assert Path(out[2]).is_file()
    version = _run([str(installed["venv"] / "bin" / "fedbrain"), "--version"], cwd=installed["work"],
                   env=installed["env"])
    assert version.strip() == "fedbrain 0.1.0"


def _rc(cmd, cwd, env) -> tuple[int, str]:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return res.returncode, res.stdout + res.stderr


def test_a_data_scientists_poc_session_from_the_wheel(installed, tmp_path):
    """`fedbrain poc up | status | submit | down` from the installed wheel on one real consortium, with
    `fedbrain site check`, `fedbrain status` and `watch` against it: a healthy POC site passes every check
    with FLARE's real server on the other end, the admin kit sees the three sites, `watch` follows the
    running job to its end with each site's round metrics, and `down` leaves nothing running. (One
    consortium for all of it: each POC start and stop costs ~20 s of the suite.)"""
    fedbrain = str(installed["venv"] / "bin" / "fedbrain")
    env, work = installed["env"], installed["work"]
    run_dir = work / "poc"
    poc = PocConsortium(run_dir)
    sites = ("hospital-a", "hospital-b", "hospital-c")
    try:
        # a long start timeout: this lane starts its consortium while the shared POC's first wave loads the machine
        _run([fedbrain, "poc", "up", "--run-dir", str(run_dir), "--cases", "3", "--start-timeout", "420"],
             cwd=work, env=env)
        status = _run([fedbrain, "poc", "status", "--run-dir", str(run_dir)], cwd=work, env=env)
        status = json.loads(status[status.index("{"):])
        assert status["running"] and status["server"] == "up"
        assert status["sites"] == {s: "connected" for s in sites}
        for site in sites:  # every site was pointed at its own synthetic datalist
            cfg = json.loads((poc.kit(site) / "local" / "fedbrain_site.json").read_text())
            assert cfg["datalist"].endswith(f"data/{site}/datalist.json")
        # `up` again must not re-provision under the running processes (new certificates)
        root_ca = (poc.kit("hospital-a") / "startup" / "rootCA.pem").read_bytes()
        rc, out = _rc([fedbrain, "poc", "up", "--run-dir", str(run_dir)], cwd=work, env=env)
        assert rc == 1 and "already running" in out, out[-2000:]
        assert (poc.kit("hospital-a") / "startup" / "rootCA.pem").read_bytes() == root_ca
        for site in sites:
            check = sc.run_site_check(poc.kit(site), python=str(installed["py"]))
            rows = {r.check: r for r in check.rows}
            assert check.ok, [r for r in check.rows if r.status == sc.FAIL]
            assert rows["server TLS"].status == sc.OK
            assert rows["FLARE preflight-check"].status == sc.WARN  # the site runs: FLARE's dry run is skipped
            assert rows["data"].status == sc.OK
        admin = poc.kit(poc.admin)
        assert sorted(s["name"] for s in consortium_status(admin, timeout=30)["sites"]) == list(sites)
        status = _run([fedbrain, "status", "--admin-kit", str(admin), "--json"], cwd=work, env=env)
        assert json.loads(status[status.index("{"):])["user"] == poc.admin

        _run([fedbrain, "job", "export-segment", "--out", str(work / "jobs"), "--rounds", "1",
              "--epochs_per_round", "1", "--max_steps", "2"], cwd=work, env=env)
        job = work / "jobs" / "fedbrain_segmentation"
        assert not list(job.rglob("custom")), "the job carries no code: sites run the wheel's site script"
        submit = subprocess.Popen([fedbrain, "poc", "submit", "--run-dir", str(run_dir), "--job", str(job),
                                   "--result", str(work / "results")], cwd=work, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            job_id = _submitted_job(poc)
            # `fedbrain watch` follows the running job to its end, showing each site's round metrics; while
            # the job runs, from the server job's own record (show_stats), not by downloading its log.
            screen, replies = StringIO(), []

            def recording_session(kit, username, timeout):
                session = open_session(kit, username, timeout)
                asked = session.show_stats
                session.show_stats = lambda *a, **k: replies.append(asked(*a, **k)) or replies[-1]
                return session

            last = watch(admin, job=job_id, interval=2.0, console=Console(file=screen, width=160), timeout=30,
                         polls=200, session_factory=recording_session)
            out, _ = submit.communicate(timeout=300)
        finally:
            if submit.poll() is None:
                submit.kill()
        assert [j["status"] for j in last["jobs"]] == ["FINISHED:COMPLETED"]
        shown = screen.getvalue()
        assert "per site, latest round received" in shown and "val_dice" in shown, shown[-3000:]
        recorded = [p for p in map(progress_from_stats, replies) if p]
        assert recorded and recorded[-1]["round"] == 0, replies[-3:]
        assert set(recorded[-1]["site_metrics"]) <= set(sites)
        assert submit.returncode == 0 and "FINISHED:COMPLETED" in out, out[-3000:]
        report = json.loads(next((work / "results").glob("*/report/report.json")).read_text())
        assert set(report["sites"]) == set(sites)
        assert all(len(e["rounds"]) == 1 for e in report["sites"].values())
    finally:
        _run([fedbrain, "poc", "down", "--run-dir", str(run_dir)], cwd=work, env=env)
    assert poc.pids() == []
    assert (poc.kit("hospital-a") / "startup" / "rootCA.pem").is_file()  # `down` keeps the kits
    assert _rc([fedbrain, "poc", "status", "--run-dir", str(run_dir)], cwd=work, env=env)[0] == 1
    _run([fedbrain, "poc", "down", "--run-dir", str(run_dir), "--remove"], cwd=work, env=env)
    assert not poc.workspace.exists()


def _submitted_job(poc, timeout: float = 120) -> str:
    """The id of the one job `poc submit` handed the server, as soon as the server lists it."""
    sess = poc.session()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = sess.list_jobs() or []
            if jobs:
                return jobs[0]["job_id"]
            time.sleep(1)
    finally:
        sess.close()
    raise AssertionError(f"no job on the server {timeout:g} s after `poc submit`")
