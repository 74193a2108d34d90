"""A production deployment on this machine, as hospitals would run it (not POC).

The production template is provisioned as ``fedbrain provision --trial`` does it (server renamed
``localhost`` so it binds and resolves to loopback, free ports, storage in the test folder);
the server and each site start from their own kit folder with the kit's own ``start.sh``;
the admin logs in with an admin kit through FLARE's API. Teardown kills by PID whatever
runs from the kits (wrappers first, since ``sub_start.sh`` restarts what dies).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedbrain.ops.provision import CONSORTIUM_TEMPLATE, provision, trial_project
from fedbrain.poc.consortium import kill_processes_under


class Deployment:
    def __init__(self, root: Path, project_name: str = "fedbrain_consortium"):
        self.root = Path(root).resolve()
        self.home = self.root / "home"
        self.project_name = project_name
        self.kits: Path | None = None
        self.project: dict = {}

    # ---- provisioning, as the consortium admin does it --------------------------------------
    def provision(self, edit=None) -> Path:
        """The template as `fedbrain provision --trial` makes it (server on localhost, free ports, storage here)."""
        project = trial_project(yaml.safe_load(CONSORTIUM_TEMPLATE.read_text()), self.root)
        project["name"] = self.project_name
        if edit:
            edit(project)
        self.project = project
        self.root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        (self.root / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
        self.kits = provision(self.root / "project.yml", self.root / "kits", env=self.env())
        return self.kits

    @property
    def sites(self) -> list[str]:
        return [p["name"] for p in self.project["participants"] if p["type"] == "client"]

    @property
    def admin(self) -> str:
        return next(p["name"] for p in self.project["participants"] if p.get("role") == "project_admin")

    def kit(self, name: str) -> Path:
        return self.kits / name

    def env(self) -> dict:
        env = dict(os.environ)
        env["HOME"] = str(self.home)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("NVFL_WORKSPACE", None)
        return env

    # ---- running, as each hospital does it -------------------------------------------------
    def start(self, kit: Path) -> subprocess.Popen:
        """``startup/start.sh`` from the kit folder, like a hospital's IT team runs it."""
        kit = Path(kit)
        out = open(kit / "start.out", "ab")
        return subprocess.Popen(["bash", str(kit / "startup" / "start.sh")], cwd=kit, env=self.env(),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def session(self, timeout: float = 30):
        from fedbrain.ops.status import open_session  # the admin kit's session, as `fedbrain status` opens it

        old = os.environ.get("HOME")
        os.environ["HOME"] = str(self.home)
        try:
            return open_session(self.kit(self.admin), self.admin, timeout)
        finally:
            if old is not None:
                os.environ["HOME"] = old

    def wait_for_sites(self, sites: list[str], timeout: float = 120) -> None:
        deadline = time.time() + timeout
        last = set()
        while time.time() < deadline:
            try:
                sess = self.session(timeout=10)
                try:
                    last = {c.name for c in sess.get_system_info().client_info}
                finally:
                    sess.close()
                if set(sites) <= last:
                    return
            except Exception:  # noqa: BLE001 - server not up yet
                pass
            time.sleep(2)
        raise TimeoutError(f"sites {sorted(set(sites) - last)} did not connect in {timeout:.0f} s")

    def stop(self) -> None:
        kill_processes_under(self.root)
