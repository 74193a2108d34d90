"""Kubernetes: `fedbrain kit k8s` on real production kits. FLARE's `nvflare deploy prepare` makes the chart;
Helm's own Go SDK (helm-python-sdk) lints and renders it; every rendered object and the kit's Secret validate
against Kubernetes' published schemas (kubernetes-validate, strict: an unknown field fails). No cluster here:
what a cluster would do with these objects is not run (docs/hospital-it.md says so)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from pathlib import Path

import helm_python as helm  # requirements-dev.txt (make test installs it): Helm's Go SDK, no helm binary
import kubernetes_validate
import pytest
import yaml

from fedbrain.ops.k8s import prepare_chart
from fedbrain.ops.kit import MANIFEST_NAME, kit_files, verify_manifest
from fedbrain.ops.provision import provision

REPO = Path(__file__).resolve().parents[1]
SERVER = "fl-server.example-consortium.org"
#: The oldest Kubernetes minor still supported upstream when this was written, and the newest the schemas know.
K8S_VERSIONS = ("1.32", kubernetes_validate.latest_version())


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    return provision(REPO / "provisioning" / "consortium" / "project.yml", out, env={**os.environ, "HOME": str(out)})


@pytest.fixture(scope="module")
def charts(kits, tmp_path_factory):
    """name -> (Chart, rendered objects): the server, and a site with a data claim and a GPU."""
    out, made = tmp_path_factory.mktemp("k8s"), {}
    for name, extra in ((SERVER, {}), ("hospital-a", {"data_claim": "hospital-a-data", "gpus": 1}),
                        ("hospital-b", {"server_cidr": "203.0.113.7/32"})):
        chart = prepare_chart(kits / name, out / name, image="registry.example.org/fedbrain/x:0.1.0", **extra)
        with helm.Chart.load(str(chart.chart)) as loaded:
            rendered = loaded.render({}, name=chart.release, namespace=chart.namespace)
        made[name] = (chart, [d for text in rendered.values() for d in yaml.safe_load_all(text) if d])
    return made


def _kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def _pod(objects) -> dict:
    (deployment,) = _kind(objects, "Deployment")
    return deployment["spec"]["template"]["spec"]


def test_charts_lint_render_and_validate_against_kubernetes_schemas(charts):
    for name, (chart, objects) in charts.items():
        lint = helm.lint(str(chart.chart))
        assert lint["errors"] == [] and all(m["severity"] <= 1 for m in lint["messages"]), (name, lint)
        secret = yaml.safe_load(chart.secret.read_text())
        assert {o["kind"] for o in objects} >= {"Deployment", "ServiceAccount", "PersistentVolumeClaim"}
        for obj in [*objects, secret]:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)  # raises on any schema error


def test_the_secret_is_the_kit_exactly_and_only_it_holds_the_key(kits, charts):
    for name, (chart, objects) in charts.items():
        kit = kits / name
        assert stat.S_IMODE(chart.secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(chart.secret.parent.stat().st_mode) == 0o700
        secret = yaml.safe_load(chart.secret.read_text())
        items = {i["key"]: i["path"] for i in _pod(objects)["volumes"][0]["secret"]["items"]}
        files = {items[key]: base64.b64decode(value) for key, value in secret["data"].items()}
        expected = {*kit_files(kit), f"startup/{MANIFEST_NAME}"}
        assert set(files) == expected and all(files[rel] == (kit / rel).read_bytes() for rel in expected)
        key = (kit / "startup" / ("server.key" if name == SERVER else "client.key")).read_bytes()
        for path in chart.chart.rglob("*"):  # the chart may go into git or a registry: no key, in any form
            if path.is_file():
                text = path.read_bytes()
                assert b"PRIVATE KEY" not in text and base64.b64encode(key)[:64] not in text, path


def test_pods_get_no_cluster_api_access_and_mount_the_kit_and_data_read_only(charts):
    for name, (_, objects) in charts.items():
        assert not _kind(objects, "Role") and not _kind(objects, "RoleBinding")  # FLARE's lets pods create pods
        (account,) = _kind(objects, "ServiceAccount")
        pod = _pod(objects)
        assert account["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        (container,) = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["args"] == ["start"] and "command" not in container  # the image's entry point: site check
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert mounts["/kit-secret"]["readOnly"] is True and env["FEDBRAIN_KIT_FROM"] == "/kit-secret"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["kit"]["emptyDir"]["medium"] == "Memory"  # the owner-only copy never reaches a disk
        assert volumes["kit-secret"]["secret"]["defaultMode"] == 0o400
        (claim,) = _kind(objects, "PersistentVolumeClaim")
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # the ledger outlives a release
        assert mounts["/workspace"]["name"] == "workspace" and env["NVFL_WORKSPACE"] == "/workspace"
    site = _pod(charts["hospital-a"][1])
    (container,) = site["containers"]
    assert {m["mountPath"]: m.get("readOnly") for m in container["volumeMounts"]}["/data"] is True
    assert {v["name"]: v for v in site["volumes"]}["data"]["persistentVolumeClaim"] == {
        "claimName": "hospital-a-data", "readOnly": True}
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert not _kind(charts["hospital-a"][1], "Service")  # a site takes no inbound connection


def test_network_policies_let_a_site_dial_only_the_server_port_and_the_server_take_only_its_ports(kits, charts):
    from fedbrain.ops.kit import server_address

    dns = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    for name, (_, objects) in charts.items():
        (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
        labels = _kind(objects, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector and selector.items() <= labels.items(), (selector, labels)  # it applies to the pod
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        if name == SERVER:
            fed = json.loads((kits / SERVER / "startup" / "fed_server.json").read_text())["servers"][0]
            ports = {int(fed["service"]["target"].rsplit(":", 1)[1]), int(fed["admin_port"])}
            (ingress,) = policy["spec"]["ingress"]
            assert {p["port"] for p in ingress["ports"]} == ports and "from" not in ingress
            assert policy["spec"]["egress"] == [dns]  # the server dials nobody
        else:
            port = server_address(kits / name)[1]
            assert policy["spec"]["ingress"] == []  # a site takes no connection
            dial, resolve = policy["spec"]["egress"]
            assert dial["ports"] == [{"port": port, "protocol": "TCP"}] and resolve == dns
            if name == "hospital-b":  # --server-cidr: the server's port at the server's address only
                assert dial["to"] == [{"ipBlock": {"cidr": "203.0.113.7/32"}}]
            else:
                assert "to" not in dial


def test_the_server_chart_serves_the_kits_ports_and_keeps_its_job_store(kits, charts):
    _, objects = charts[SERVER]
    fed = json.loads((kits / SERVER / "startup" / "fed_server.json").read_text())["servers"][0]
    (service,) = _kind(objects, "Service")
    ports = sorted(p["port"] for p in service["spec"]["ports"])
    fl_port = int(fed["service"]["target"].rsplit(":", 1)[1])
    assert fl_port in ports and int(fed["admin_port"]) in ports and len(ports) == 2  # no job-pod port
    assert service["spec"]["type"] == "LoadBalancer"
    (container,) = _pod(objects)["containers"]
    resources = json.loads((kits / SERVER / "local" / "resources.json").read_text())
    uri = next(c["args"]["uri_root"] for c in resources["components"] if c["id"] == "job_manager")
    store = [m for m in container["volumeMounts"] if m["mountPath"] == str(Path(uri).parent)]
    assert store and store[0]["name"] == "workspace"  # a restarted pod finds the interrupted job (autoresume)


def secret_volume(secret: dict, items: list[dict], into: Path, group: int | None = None) -> Path:
    """A Secret volume as the kubelet lays it out: a hidden timestamped folder, ``..data`` linking to it, a link per
    top-level path; files group-readable (defaultMode 0400 under an fsGroup: ``group`` owns them when given).
    docker/test_images.py mounts the same layout into a pod run by `podman kube play`."""
    data = into / "..2026_12_07_09_00_00.123456789"
    paths = {i["key"]: i["path"] for i in items}
    for key, value in secret["data"].items():
        target = data / paths[key]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(value))
        if group is not None:
            os.chown(target, 0, group)
        target.chmod(0o440)
    (into / "..data").symlink_to(data.name)
    for top in {p.split("/")[0] for p in paths.values()}:
        (into / top).symlink_to(f"..data/{top}")
    return into


def test_the_entrypoint_copies_a_secret_mounted_kit_owner_only_and_it_verifies(charts, tmp_path):
    chart, objects = charts["hospital-a"]  # the Secret fedbrain kit k8s wrote, mounted as the Deployment says
    items = next(v for v in _pod(objects)["volumes"] if v["name"] == "kit-secret")["secret"]["items"]
    source = secret_volume(yaml.safe_load(chart.secret.read_text()), items, tmp_path / "kit-secret")
    kit = tmp_path / "kit"
    kit.mkdir()
    env = {"PATH": "/usr/bin:/bin", "FEDBRAIN_KIT_FROM": str(source), "FEDBRAIN_KIT": str(kit)}
    res = subprocess.run([str(REPO / "docker" / "entrypoint.sh"), "true"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in kit.iterdir()) == ["local", "startup"]  # no ..data, no timestamped folder
    for path in kit.rglob("*"):
        assert not path.is_symlink(), path
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = 0o700 if path.is_dir() or path.suffix == ".sh" else 0o600
        assert mode == expected, (path, oct(mode))
    state = verify_manifest(kit)
    assert state.refused() == [] and state.local_changes() == []
    missing = subprocess.run([str(REPO / "docker" / "entrypoint.sh")], capture_output=True, text=True, timeout=30,
                             env={**env, "FEDBRAIN_KIT_FROM": str(tmp_path / "none")})
    assert missing.returncode == 2 and "kit-secret.yaml" in missing.stderr


def test_an_admin_kit_gets_no_chart(kits, tmp_path):
    from fedbrain.cli import main

    assert main(["kit", "k8s", str(kits / "admin@example-consortium.org"), "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x" / "chart").exists()


def test_the_printed_commands_are_whole_and_the_last_deletes_the_secret_file(kits, tmp_path):
    import sys

    out = tmp_path / "k8s-out"
    res = subprocess.run([str(Path(sys.executable).parent / "fedbrain"), "kit", "k8s", str(kits / "hospital-b"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path), "COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = [ln.strip() for ln in res.stdout.splitlines()]
    steps = [ln for ln in lines if ln.startswith(("kubectl ", "helm ", "shred "))]
    assert steps == ["kubectl create namespace fedbrain",
                     f"kubectl apply --namespace fedbrain -f {out / 'kit-secret.yaml'}",
                     f"helm upgrade --install hospital-b {out / 'chart'} --namespace fedbrain",
                     f"shred -u {out / 'kit-secret.yaml'}"], res.stdout  # copied as printed, also into a pipe
