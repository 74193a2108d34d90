"""The package works as an installed wheel, outside the checkout: job definitions, site
scripts and provisioning templates ship inside it, and nothing resolves through a repo root.

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
from pathlib import Path

import pytest

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
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
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


def test_poc_and_a_one_round_job_from_the_wheel(installed):
    fedbrain = str(installed["venv"] / "bin" / "fedbrain")
    env, work = installed["env"], installed["work"]
    run_dir = work / "poc"
    try:
        _run([fedbrain, "poc", "up", "--run-dir", str(run_dir), "--cases", "3"], cwd=work, env=env)
        status = _run([fedbrain, "poc", "status", "--run-dir", str(run_dir)], cwd=work, env=env)
        status = json.loads(status[status.index("{"):])
        assert status["sites"] == {s: "connected" for s in ("hospital-a", "hospital-b", "hospital-c")}
        _run([fedbrain, "job", "export-segment", "--out", str(work / "jobs"), "--rounds", "1",
              "--epochs_per_round", "1", "--max_steps", "2"], cwd=work, env=env)
        job = work / "jobs" / "fedbrain_segmentation"
        assert not list(job.rglob("custom")), "the job carries no code: sites run the wheel's site script"
        out = _run([fedbrain, "poc", "submit", "--run-dir", str(run_dir), "--job", str(job),
                    "--result", str(work / "results")], cwd=work, env=env)
        assert "FINISHED:COMPLETED" in out
        report = json.loads(next((work / "results").glob("*/report/report.json")).read_text())
        assert set(report["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
        assert all(e["rounds"] for e in report["sites"].values())
    finally:
        _run([fedbrain, "poc", "down", "--run-dir", str(run_dir)], cwd=work, env=env)
    shutil.rmtree(run_dir, ignore_errors=True)
