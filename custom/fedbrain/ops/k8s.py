"""A participant's kit as a Helm chart for Kubernetes, made with FLARE's own `nvflare deploy prepare`.

FLARE 2.9 prepares a kit for Kubernetes by rewriting it: it removes the start scripts, swaps the job
launcher for one that starts every job as a pod of its own (the site's service account may then create
pods and secrets), and writes a Helm chart that runs FLARE directly. fedbrain keeps FLARE's chart
(helpers, service, service account, values) and changes what would break a fedbrain promise:

- **The kit stays as it was signed.** The pod mounts the participant's kit, unchanged, from a Secret
  (``kit-secret.yaml``). The image's entry point copies it into a memory volume readable by the site's user
  only, runs ``fedbrain site check`` (the manifest, certificates, permissions) and starts the kit's own
  ``sub_start.sh``, exactly as in Docker. FLARE's rewritten kit copy is discarded.
- **Jobs run inside the pod**, as in Docker, through the kit's own launcher (fedbrain's, for sites: a killed
  job process leaves the federation instead of failing the job). The pod gets no Kubernetes API token and no
  role: a job cannot start pods or read the namespace's secrets.
- **Data is mounted read-only** from the hospital's own claim (sites); the server's job store lives on its
  workspace claim, so a restarted pod resumes an interrupted job.
- **A NetworkPolicy** lets a site's pod dial only the server's FL port (and DNS) and take no connection; the
  server's pod takes only its FL and admin ports.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from fedbrain.ops.kit import MANIFEST_NAME, KitError, kit_files, kit_identity, server_address

#: The images docker/Dockerfile builds (targets ``server`` and ``site``).
IMAGES = {"server": "fedbrain-server", "client": "fedbrain-site"}
#: Kubernetes refuses a Secret over 1 MiB.
SECRET_LIMIT = 1024 * 1024
WORKSPACE = "/workspace"
SERVER_STORAGE = "/var/lib/fedbrain/server"
#: The image's user (docker/Dockerfile: flare, uid and gid 1000).
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
#: FLARE's chart files fedbrain leaves out: the role lets the pod create pods and read secrets (FLARE's job pods);
#: the site service is what those job pods dial back to.
DROPPED = {"server": ("role.yaml",), "client": ("role.yaml", "service.yaml")}


@dataclass
class Chart:
    chart: Path
    secret: Path
    release: str
    namespace: str
    role: str

    def commands(self) -> list[str]:
        """What hospital IT runs, in order (kubectl and helm on a machine with access to the cluster); each line a
        whole command, to copy as it is. The last one removes the Secret's file: it holds the kit's private key."""
        return [f"kubectl create namespace {self.namespace}",
                f"kubectl apply --namespace {self.namespace} -f {self.secret}",
                f"helm upgrade --install {self.release} {self.chart} --namespace {self.namespace}",
                f"shred -u {self.secret}"]


def k8s_name(name: str) -> str:
    """A participant's name as a Kubernetes object name (DNS-1123 label: ``fl-server.example.org`` ->
    ``fl-server-example-org``)."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].rstrip("-")
    if not out or not out[0].isalpha():
        out = ("p-" + out)[:63].rstrip("-")
    return out


def _secret_key(rel: str) -> str:
    """``startup/client.key`` -> ``startup.client.key`` (a Secret's keys hold no slash)."""
    return rel.replace("/", ".")


def kit_secret(kit: Path, name: str, namespace: str) -> tuple[dict, list[dict]]:
    """The Secret holding every file of the kit's startup/ and local/ (the signed manifest included), and the
    volume items that put each back at its path."""
    files = sorted([*kit_files(kit), f"startup/{MANIFEST_NAME}"])
    data = {_secret_key(rel): base64.b64encode((kit / rel).read_bytes()).decode() for rel in files}
    size = sum((kit / rel).stat().st_size for rel in files)
    if size > SECRET_LIMIT:
        raise KitError(f"{kit}: the kit's files add up to {size / 2**20:.2f} MiB, over Kubernetes' 1 MiB per Secret")
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": name, "namespace": namespace,
                           "labels": {"app.kubernetes.io/part-of": "fedbrain"}},
              "data": data}
    return secret, [{"key": _secret_key(rel), "path": rel} for rel in files]


def _nvflare_prepare(kit: Path, out: Path, image: str, namespace: str, work: Path) -> None:
    """FLARE's own preparation, on a copy (it rewrites the kit it is given)."""
    copy = work / "kit"
    shutil.copytree(kit, copy, symlinks=True, ignore=shutil.ignore_patterns(".*"))
    config = work / "k8s.yaml"
    config.write_text(yaml.safe_dump({"runtime": "k8s", "namespace": namespace, "parent": {"docker_image": image}}))
    env = {**os.environ, "HOME": str(work)}  # never the user's ~/.nvflare
    nvflare = Path(sys.executable).parent / "nvflare"
    res = subprocess.run([str(nvflare), "deploy", "prepare", str(copy), "--output", str(out), "--config", str(config)],
                         capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if res.returncode != 0 or not (out / "helm_chart" / "Chart.yaml").is_file():
        lines = (res.stderr + "\n" + res.stdout).strip().splitlines()
        raise KitError(f"nvflare deploy prepare failed for {kit}: {(lines or [f'exit {res.returncode}'])[-1]}")


def server_storage_root(kit: Path) -> str:
    """Where the server kit keeps its job store (the project file's storage_root; fedbrain's default otherwise)."""
    for name in ("resources.json", "resources.json.default"):
        path = Path(kit) / "local" / name
        if path.is_file():
            for comp in json.loads(path.read_text()).get("components", []):
                uri = (comp.get("args") or {}).get("uri_root") if comp.get("id") == "job_manager" else None
                if uri:
                    return str(Path(uri).parent)
    return SERVER_STORAGE


def _values(flare_values: dict, role: str, name: str, image: str, secret: str, items: list[dict],
            workspace_claim: str | None, data_claim: str | None, datalist: str, gpus: int,
            storage_root: str = SERVER_STORAGE, server_port: int | None = None, server_cidr: str | None = None) -> dict:
    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    values = dict(flare_values)
    values.update({
        "name": name,
        "image": {"repository": repo, "tag": tag, "pullPolicy": "IfNotPresent"},
        "serviceAccount": {"create": True, "annotations": {}, "automountServiceAccountToken": False},
        "rbac": {"create": False},
        "persistence": {"workspace": {"claimName": workspace_claim or f"{name}-workspace", "create": not workspace_claim,
                                      "size": "50Gi" if role == "server" else "20Gi", "storageClassName": None,
                                      "volumeName": "workspace", "mountPath": WORKSPACE}},
        "kit": {"secretName": secret, "items": items},
        "securityContext": POD_SECURITY,
        "containerSecurityContext": CONTAINER_SECURITY,
        "checkArgs": "",
    })
    for flare_only in ("command", "args", "workspaceConfig", "port"):
        values.pop(flare_only, None)
    resources_ = {"requests": {"cpu": "2", "memory": "8Gi"}}
    if gpus:
        resources_["limits"] = {"nvidia.com/gpu": int(gpus)}
    values["resources"] = resources_
    if role == "server":
        values["storage"] = {"mountPath": storage_root, "subPath": "storage"}
        values["service"] = {**(values.get("service") or {}), "type": "LoadBalancer"}  # the sites dial in from outside
        values["parentPort"] = None  # FLARE's job pods dial the server here; fedbrain's jobs run in the pod
        ports = [p for p in (values.get("fedLearnPort"), values.get("adminPort")) if p]
        values["networkPolicy"] = {"enabled": True, "ingressPorts": ports, "egressPorts": [], "serverCIDR": None}
    else:
        values["data"] = {"claimName": data_claim, "mountPath": "/data", "datalist": datalist}
        values["serviceName"] = name  # FLARE's helper names (and labels) a site's pod after it
        values["networkPolicy"] = {"enabled": True, "ingressPorts": [], "egressPorts": [server_port],
                                   "serverCIDR": server_cidr}
    return values


def prepare_chart(kit: Path, out: Path, image: str | None = None, namespace: str = "fedbrain",
                  workspace_claim: str | None = None, data_claim: str | None = None,
                  datalist: str = "/data/datalist.json", gpus: int = 0, server_cidr: str | None = None) -> Chart:
    """Write ``out/chart/`` (a Helm chart) and ``out/kit-secret.yaml`` (0600) for the server or site kit ``kit``."""
    import fedbrain

    kit, out = Path(kit).resolve(), Path(out)
    role, _, _ = kit_identity(kit)
    participant = kit.name
    if role not in IMAGES:
        raise KitError(f"{kit}: an admin kit runs no service; charts are for the server and the sites")
    name = k8s_name(participant)
    image = image or f"{IMAGES[role]}:{fedbrain.__version__}"
    secret_name = f"fedbrain-kit-{name}"[:63].rstrip("-")
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    chart_dir = out / "chart"
    if chart_dir.exists():
        shutil.rmtree(chart_dir)
    with tempfile.TemporaryDirectory(prefix="fedbrain-k8s-") as tmp:
        prepared = Path(tmp) / "prepared"
        _nvflare_prepare(kit, prepared, image, namespace, Path(tmp))
        shutil.copytree(prepared / "helm_chart", chart_dir)  # FLARE's chart; its rewritten kit copy goes with tmp
    templates = chart_dir / "templates"
    for dropped in DROPPED[role]:
        (templates / dropped).unlink(missing_ok=True)
    ours = "server-deployment.yaml" if role == "server" else "site-deployment.yaml"
    flare_deployment = "server-deployment.yaml" if role == "server" else "client-deployment.yaml"
    (templates / flare_deployment).unlink()
    for template in (ours, "workspace-pvc.yaml", "networkpolicy.yaml"):
        (templates / template).write_text((resources.files("fedbrain.ops") / "charts" / template).read_text())
    if role == "server":
        service = templates / "server-service.yaml"
        service.write_text(_without_parent_port(service.read_text()))

    chart_meta = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    chart_meta.update({"name": f"fedbrain-{'server' if role == 'server' else 'site'}", "appVersion": fedbrain.__version__,
                       "description": f"fedbrain {'server' if role == 'server' else 'site'} {participant} "
                                      f"(from nvflare deploy prepare; the kit mounted from the Secret {secret_name})"})
    (chart_dir / "Chart.yaml").write_text(yaml.safe_dump(chart_meta, sort_keys=False))
    secret, items = kit_secret(kit, secret_name, namespace)
    flare_values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    values = _values(flare_values, role, name, image, secret_name, items, workspace_claim, data_claim, datalist, gpus,
                     storage_root=server_storage_root(kit) if role == "server" else SERVER_STORAGE,
                     server_port=server_address(kit)[1] if role == "client" else None, server_cidr=server_cidr)
    (chart_dir / "values.yaml").write_text(
        "# fedbrain values over FLARE's (nvflare deploy prepare). No key is here: the kit is the Secret kit.secretName.\n"
        + yaml.safe_dump(values, sort_keys=False))
    secret_path = out / "kit-secret.yaml"
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# The kit of " + participant + ", private key included: apply it, then delete this file.\n")
        yaml.safe_dump(secret, f, sort_keys=False)
    secret_path.chmod(0o600)
    return Chart(chart=chart_dir, secret=secret_path, release=name, namespace=namespace, role=role)


def _without_parent_port(text: str) -> str:
    """FLARE's server service with its job-pod port (parentPort) only when set."""
    block = re.search(r"\n(\s*)- name: nvflare-server\n(?:\1  .*\n?)+", text)
    if not block:
        raise KitError("FLARE's server chart changed: no 'nvflare-server' port in its service template")
    indent = block.group(1)
    return (text[:block.start()] + f"\n{indent}{{{{- if .Values.parentPort }}}}" + block.group(0).rstrip("\n")
            + f"\n{indent}{{{{- end }}}}\n" + text[block.end():])
