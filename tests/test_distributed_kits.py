"""Distributed provisioning (`fedbrain provision --distributed`, `fedbrain kit request|approve|package`): each
hospital participant makes its own key, the consortium only signs, and what crosses between the two machines
holds no private key. The real-FLARE half (a hospital that joins with such a kit) is in test_poc_deployment."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from fedbrain.cli import main
from fedbrain.ops import distributed
from fedbrain.ops.builder import offered_scopes
from fedbrain.ops.kit import KitError, exposed_secrets, root_fingerprint, verify_manifest, write_manifest
from fedbrain.ops.kit_guard import guard
from fedbrain.ops.site_check import OK, check_kit_integrity
from fedbrain.ops.provision import CONSORTIUM_TEMPLATE, trial_project


def _project(root: Path) -> dict:
    project = trial_project(yaml.safe_load(CONSORTIUM_TEMPLATE.read_text()), root)
    for p in project["participants"]:
        if p.get("default_scope") == "encrypted":
            p["default_scope"] = "secagg"  # HE needs a key every site shares: not in this mode
    return project


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """Two machines as folders: the consortium's and hospital-b's; only the zips are copied between them."""
    root = tmp_path_factory.mktemp("distributed")
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(root / "home"))  # FLARE's tools must not reach the user's ~/.nvflare
    consortium, hospital = root / "consortium-machine", root / "hospital-b-machine"
    consortium.mkdir()
    hospital.mkdir()
    (consortium / "project.yml").write_text(yaml.safe_dump(_project(consortium)))
    try:
        assert main(["provision", str(consortium / "project.yml"), "--out", str(consortium / "out"),
                     "--distributed"]) == 0
        project_dir = consortium / "out" / "fedbrain_consortium"
        (hospital / "hospital-b.yml").write_bytes((project_dir / "requests" / "hospital-b.yml").read_bytes())
        assert main(["kit", "request", str(hospital / "hospital-b.yml"), "--out", str(hospital / "req")]) == 0
        request = hospital / "req" / "hospital-b.request.zip"
        (consortium / request.name).write_bytes(request.read_bytes())
        assert main(["kit", "approve", str(consortium / request.name), "--consortium", str(project_dir)]) == 0
        signed = consortium / "hospital-b.signed.zip"
        (hospital / signed.name).write_bytes(signed.read_bytes())
        fingerprint = root_fingerprint(project_dir / "prod_00" / "localhost")
        assert main(["kit", "package", str(hospital / signed.name), "--request-dir", str(hospital / "req"),
                     "--out", str(hospital / "kits"), "--fingerprint", fingerprint]) == 0
        yield {"root": root, "consortium": consortium, "hospital": hospital, "project_dir": project_dir,
               "kit": hospital / "kits" / "fedbrain_consortium" / "prod_00" / "hospital-b",
               "crossed": [request, signed], "fingerprint": fingerprint}
    finally:
        mp.undo()


def test_the_consortium_makes_keys_for_its_own_participants_only(flow):
    project_dir = flow["project_dir"]
    assert sorted(p.name for p in (project_dir / "prod_00").iterdir()) == ["admin@example-consortium.org", "localhost"]
    state = json.loads((project_dir / "state" / "cert.json").read_text())
    holders = json.dumps(state)
    for name in ("hospital-a", "hospital-b", "hospital-c", "it@hospital-a.org"):
        assert name not in holders
    requests = sorted(p.stem for p in (project_dir / "requests").glob("*.yml"))
    assert requests == ["hospital-a", "hospital-b", "hospital-c", "it@hospital-a.org", "lead@hospital-b.org",
                        "member@hospital-c.org"]
    builders = [b["path"] for b in yaml.safe_load((project_dir / "requests" / "hospital-b.yml").read_text())["builders"]]
    assert "fedbrain.ops.builder.SitePolicyBuilder" in builders and builders[-1].endswith("KitManifestBuilder")
    assert not [b for b in builders if b.endswith(("HEBuilder", "SignatureBuilder"))]
    ca = project_dir / "ca"
    assert (ca.stat().st_mode & 0o777) == 0o700 and ((ca / "rootCA.key").stat().st_mode & 0o777) == 0o600
    assert exposed_secrets(flow["consortium"]) == []


def test_the_hospital_key_never_leaves_the_hospital(flow):
    key = (flow["hospital"] / "req" / "hospital-b.key").read_bytes()
    kit = flow["kit"]
    assert (kit / "startup" / "client.key").read_bytes() == key
    assert not [name for name, content in _files(flow["consortium"]).items() if key.strip() in content]
    for zip_path in flow["crossed"]:
        with zipfile.ZipFile(io.BytesIO(zip_path.read_bytes())) as zf:
            assert not [m for m in zf.namelist() if b"PRIVATE KEY" in zf.read(m)], zip_path.name
    # nor the root key: the hospital's machine holds none
    root_key = (flow["project_dir"] / "ca" / "rootCA.key").read_bytes()
    assert not [name for name, content in _files(flow["hospital"]).items() if root_key.strip() in content]
    assert exposed_secrets(flow["hospital"]) == []
    # FLARE's audit records go beside the request and the CA, never into a ~/.nvflare
    assert list((flow["hospital"] / "req" / "audit").rglob("audit.json"))
    assert list((flow["project_dir"] / "audit").rglob("*.json"))
    assert not list((flow["root"] / "home").rglob("cert_*"))


def test_the_hospital_kit_is_a_fedbrain_kit_that_checks(flow):
    kit = flow["kit"]
    assert guard(kit, probe_server=False) == []
    state = verify_manifest(kit)
    assert state.signer == "participant" and state.participant == "hospital-b"
    row, _ = check_kit_integrity(kit)  # what `fedbrain site check` shows
    assert row.status == OK and "site's own key" in row.detail, row
    policy = json.loads((kit / "local" / "privacy.json").read_text())
    assert policy["default_scope"] == "standard" and policy["components"]
    # no HE key in this kit: a job cannot pick a scope that needs it
    assert [s["name"] for s in policy["scopes"]] == offered_scopes("standard", he=False) == ["standard", "dp", "secagg",
                                                                                            "dp_secagg"]
    resources = json.loads((kit / "local" / "resources.json").read_text())
    assert resources["class_list_enforcement_mode"] == "enforce"
    assert not (kit / "startup" / "client_context.tenseal").exists()
    # where and how it connects: exactly what the consortium's server kit listens on (address, port, scheme)
    service = json.loads((kit / "startup" / "fed_client.json").read_text())["servers"][0]["service"]
    listens = json.loads((flow["project_dir"] / "prod_00" / "localhost" / "startup" / "fed_server.json").read_text())
    assert service["scheme"] == listens["servers"][0]["service"]["scheme"]
    assert service["target"].split(":")[1] == listens["servers"][0]["service"]["target"].split(":")[1]
    assert service["target"].split(":")[0] == "localhost"


def test_an_edit_to_the_owner_signed_kit_is_refused(flow, tmp_path):
    kit = Path(shutil.copytree(flow["kit"], tmp_path / "kit"))
    cfg = kit / "startup" / "fed_client.json"
    cfg.write_text(cfg.read_text().replace('"mtls"', '"tls"'))
    assert ("startup/fed_client.json", "edited") in verify_manifest(kit).refused()
    # a manifest re-signed by another key does not verify against the kit's own certificate
    other = Path(shutil.copytree(flow["kit"], tmp_path / "other"))
    write_manifest(other, "hospital-b", rsa.generate_private_key(public_exponent=65537, key_size=2048),
                   signer="participant")
    with pytest.raises(KitError, match="does not match the kit's own certificate"):
        verify_manifest(other)


def test_requests_the_project_does_not_name_are_refused(flow, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    project = yaml.safe_load((flow["consortium"] / "project.yml").read_text())
    stranger = {"name": "hospital-x", "type": "client", "org": "hospital_x"}
    other_org = {"name": "hospital-a", "type": "client", "org": "somewhere_else"}
    for who, why in ((stranger, "is not a participant"), (other_org, "asks to be org 'somewhere_else'")):
        f = tmp_path / f"{who['name']}.yml"
        f.write_text(yaml.safe_dump({**project, "participants": [who]}))
        request, _ = distributed.request_kit(f, tmp_path / who["name"])
        with pytest.raises(KitError, match=why):
            distributed.approve_request(request, flow["project_dir"])


def test_an_he_scope_is_refused_before_a_key_is_made(flow, tmp_path):
    project = yaml.safe_load((flow["consortium"] / "project.yml").read_text())
    f = tmp_path / "p.yml"
    f.write_text(yaml.safe_dump({**project, "participants": [
        {"name": "hospital-c", "type": "client", "org": "hospital_c", "default_scope": "encrypted"}]}))
    with pytest.raises(KitError, match="HE key every site shares.*secagg"):
        distributed.request_kit(f, tmp_path / "req")
    assert not list(tmp_path.rglob("*.key"))


def test_a_wrong_fingerprint_refuses_the_kit(flow, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    wrong = ":".join(["AB"] * 32)
    with pytest.raises(KitError, match="(?i)fingerprint"):
        distributed.package_kit(flow["hospital"] / "hospital-b.signed.zip", flow["hospital"] / "req",
                                tmp_path / "kits", wrong)
    assert not list(tmp_path.rglob("client.key"))


def test_a_trial_of_distributed_provisioning_on_one_machine(tmp_path, monkeypatch):
    """`--trial --distributed`: the consortium's own kits with the server on localhost and free ports, as for a
    one-step trial; every other participant gets its file to request a key with."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["provision", str(CONSORTIUM_TEMPLATE), "--out", str(tmp_path / "out"), "--trial",
                 "--distributed"]) == 1  # the template's hospital-c defaults to `encrypted`: refused, nothing made
    assert not (tmp_path / "out" / "fedbrain_consortium").exists()
    project = yaml.safe_load(CONSORTIUM_TEMPLATE.read_text())
    for p in project["participants"]:
        p.pop("default_scope", None)
    (tmp_path / "p.yml").write_text(yaml.safe_dump(project))
    assert main(["provision", str(tmp_path / "p.yml"), "--out", str(tmp_path / "out"), "--trial", "--distributed"]) == 0
    made = tmp_path / "out" / "fedbrain_consortium"
    assert sorted(k.name for k in (made / "prod_00").iterdir()) == ["admin@example-consortium.org", "localhost"]
    assert (made / "requests" / "hospital-c.yml").is_file()
