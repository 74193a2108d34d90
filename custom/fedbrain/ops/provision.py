"""``fedbrain provision PROJECT --out DIR``: FLARE's provisioning with fedbrain's builders in place.

The consortium's project file names its participants and FLARE's builders; fedbrain adds
:class:`~fedbrain.ops.builder.SitePolicyBuilder` just before FLARE's SignatureBuilder (so FLARE
signs the policies it writes) and :class:`~fedbrain.ops.builder.KitManifestBuilder` last,
unless the file already lists them. The kits land in ``DIR/<project>/prod_NN/``; the root CA
stays in ``DIR/<project>/state/`` (keep it: re-provisioning with it keeps the consortium's trust).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from fedbrain.ops.kit import KitError, protect_secrets

POLICY_BUILDER = "fedbrain.ops.builder.SitePolicyBuilder"
MANIFEST_BUILDER = "fedbrain.ops.builder.KitManifestBuilder"
SIGNATURE_BUILDER = "nvflare.lighter.impl.signature.SignatureBuilder"
HE_BUILDER = "nvflare.lighter.impl.he.HEBuilder"
#: The production template shipped in the package (repo: provisioning/consortium/project.yml).
CONSORTIUM_TEMPLATE = Path(__file__).resolve().parent / "consortium.yml"


def with_fedbrain_builders(project: dict) -> dict:
    """The project with fedbrain's two builders in their places (kept where the file already has them)."""
    builders = list(project.get("builders") or [])
    paths = [b.get("path") for b in builders]
    if not builders:
        raise KitError("the project file lists no builders; start from provisioning/consortium/project.yml")
    if POLICY_BUILDER not in paths:
        at = paths.index(SIGNATURE_BUILDER) if SIGNATURE_BUILDER in paths else len(builders)
        builders.insert(at, {"path": POLICY_BUILDER})
    if MANIFEST_BUILDER not in paths:
        builders.append({"path": MANIFEST_BUILDER})
    paths = [b.get("path") for b in builders]
    if HE_BUILDER in paths and paths.index(HE_BUILDER) > paths.index(POLICY_BUILDER):
        # the policy builder offers the HE scopes only to a kit that holds the HE key: it must come after it
        policy = builders.pop(paths.index(POLICY_BUILDER))
        builders.insert([b.get("path") for b in builders].index(HE_BUILDER) + 1, policy)
    return {**project, "builders": builders}


def trial_project(project: dict, root: Path) -> dict:
    """The production project for a one-machine trial: the server named ``localhost`` (it binds and is reached
    on loopback only), two free ports, its storage inside ``root`` (the template's /var/lib needs root).
    Everything else (policies, allow-lists, manifest, secrets 0600) is the production kit's."""
    from fedbrain.poc.consortium import free_ports

    out = json.loads(json.dumps(project))
    server = next((p for p in out.get("participants", []) if p.get("type") == "server"), None)
    if server is None:
        raise KitError("the project file has no server participant")
    server["name"] = "localhost"
    server["fed_learn_port"], server["admin_port"] = free_ports(2)
    server["storage_root"] = str(Path(root).resolve() / "server-storage")
    return out


def provision(project_file: Path, out_dir: Path, env: dict | None = None) -> Path:
    """Provision every participant's kit; returns the folder holding them (``prod_NN``)."""
    project_file, out_dir = Path(project_file), Path(out_dir).resolve()
    try:
        project = yaml.safe_load(project_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise KitError(f"{project_file}: cannot read the project file ({e})") from None
    if not isinstance(project, dict) or "participants" not in project or "name" not in project:
        raise KitError(f"{project_file}: not a FLARE project file (needs name, participants, builders)")
    out_dir.mkdir(parents=True, exist_ok=True)
    effective = out_dir / f"{project['name']}.project.yml"
    effective.write_text(yaml.safe_dump(with_fedbrain_builders(project), sort_keys=False))
    before = set((out_dir / project["name"]).glob("prod_*"))
    nvflare = Path(sys.executable).parent / "nvflare"
    # Re-provisioning (a new hospital, a renewed kit) writes the next prod_NN beside the others and reuses the root CA
    # in state/; FLARE asks to confirm that on a terminal and refuses without one unless told --force.
    again = ["--force"] if (out_dir / project["name"]).exists() else []
    res = subprocess.run([str(nvflare), "provision", "-p", str(effective), "-w", str(out_dir), *again],
                         capture_output=True, text=True, env=env or dict(os.environ), stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise KitError(f"FLARE provisioning failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    made = sorted(set((out_dir / project["name"]).glob("prod_*")) - before)
    if not made:
        raise KitError(f"FLARE provisioning wrote no kits under {out_dir / project['name']}:\n{res.stdout[-2000:]}")
    protect_secrets(out_dir / project["name"])  # the CA state, every key, the sites' HE contexts: owner only
    return made[-1]
