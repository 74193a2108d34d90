"""`fedbrain provision` on the production template: what each kit's local/ holds, the signed
manifest, and the start-time kit check (fedbrain.ops.kit_guard) on edited or corrupted kits."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedbrain.ops.allowlist import class_allow_list
from fedbrain.ops.builder import EVERY_GRADE_HEAD, PERSONAL_PARTS, offered_scopes
from fedbrain.ops.kit import KitError, check_certificate, verify_manifest
from fedbrain.ops.kit_guard import guard
from fedbrain.ops.provision import CONSORTIUM_TEMPLATE, provision, with_fedbrain_builders

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    env = {**os.environ, "HOME": str(out / "home")}
    return provision(REPO / "provisioning" / "consortium" / "project.yml", out, env=env)


def _participants():
    return yaml.safe_load(CONSORTIUM_TEMPLATE.read_text())["participants"]


def test_repo_template_is_the_packaged_one():
    assert (REPO / "provisioning/consortium/project.yml").resolve() == CONSORTIUM_TEMPLATE
    roles = {p.get("role") for p in _participants() if p["type"] == "admin"}
    assert roles == {"project_admin", "org_admin", "lead", "member"}
    orgs = {p["org"] for p in _participants() if p["type"] == "client"}
    assert len(orgs) >= 3


def test_every_site_gets_policies_that_flare_can_load(kits):
    for p in _participants():
        if p["type"] != "client":
            continue
        local = kits / p["name"] / "local"
        privacy = json.loads((local / "privacy.json").read_text())
        default = p.get("default_scope", "standard")
        assert privacy["default_scope"] == default
        assert [s["name"] for s in privacy["scopes"]] == offered_scopes(default)
        for scope in privacy["scopes"]:
            paths = [f["path"] for f in scope["task_result_filters"]]
            assert paths[0].endswith("ExcludeVars") and scope["task_result_filters"][0]["args"]["exclude_vars"] == PERSONAL_PARTS
            for path in paths:  # each class must exist in the installed packages, or FLARE refuses the site
                module, name = path.rsplit(".", 1)
                assert hasattr(importlib.import_module(module), name), path
        check = privacy["components"][0]["args"]  # the final check: what must never leave this site
        assert check["personal_parts"] == (PERSONAL_PARTS if p.get("send_shared_head", True) else EVERY_GRADE_HEAD)
        assert not (local / "privacy.json.sample").exists()
        authz = json.loads((local / "authorization.json").read_text())
        assert {role: rights.get("byoc") for role, rights in authz["permissions"].items() if role != "member"} == {
            "project_admin": "none", "org_admin": "none", "lead": "none"}
        res = json.loads((local / "resources.json").read_text())
        assert res["allow_log_streaming"] is False
        assert res["class_list_enforcement_mode"] == "enforce"
        assert res["class_allow_list"] == class_allow_list("client")  # exact classes, no module prefix
        template = json.loads((local / "fedbrain_site.json.template").read_text())
        assert {"datalist", "dp_budget", "require_dp"} <= set(template)
        assert "fedbrain.ops.kit_guard" in (kits / p["name"] / "startup" / "sub_start.sh").read_text()


def test_no_kit_admits_fault_injection_or_the_attack_filter(kits):
    """The attack filter and fault harness are not in the installed fedbrain (fedbrain_testing), and no
    allow-list entry, read as FLARE reads it (a path prefix), admits their classes."""
    import fedbrain
    from fedbrain_testing.attack import PoisonUpdate

    assert importlib.util.find_spec("fedbrain.filters.attack") is None and importlib.util.find_spec("fedbrain.poc.faults") is None
    assert not (Path(fedbrain.__file__).parent / "poc" / "load.py").exists()
    attack = f"{PoisonUpdate.__module__}.{PoisonUpdate.__name__}"
    for p in _participants():
        if p["type"] == "client":
            allowed = json.loads((kits / p["name"] / "local" / "resources.json").read_text())["class_allow_list"]
            assert not [a for a in allowed if a == "*" or attack.startswith(a)], (p["name"], allowed)


def test_production_kits_start_every_job_process_clean(kits):
    """Warm job start (fedbrain.poc.warm) is for POC kits only: a hospital's job process imports
    everything itself, through fedbrain's signal-tolerant launcher (sites) and FLARE's (server)."""
    for p in _participants():
        if p["type"] in ("client", "server"):
            text = (kits / p["name"] / "local" / "resources.json").read_text()
            assert "fedbrain.poc.warm" not in text, p["name"]
            assert ("fedbrain.fl.launcher.SiteJobLauncher" if p["type"] == "client" else "ServerProcessJobLauncher") in text


def test_every_secret_is_readable_by_its_owner_only(kits):
    """Keys, the CA state (the root key and every participant's key) and the sites' HE contexts (CKKS
    secret key): 0600, in folders only their owner can list; FLARE alone leaves most of them 0644."""
    from fedbrain.ops.kit import exposed_secrets, secret_files

    root = kits.parent
    secrets = secret_files(root)
    names = {p.name for p in secrets}
    assert "cert.json" in names and "client.key" in names and "server.key" in names, names
    assert not exposed_secrets(root)
    assert all(p.stat().st_mode & 0o777 == 0o600 and p.parent.stat().st_mode & 0o077 == 0 for p in secrets)


def test_server_storage_is_not_tmp(kits):
    server = next(p for p in _participants() if p["type"] == "server")
    res = json.loads((kits / server["name"] / "local" / "resources.json").read_text())
    text = json.dumps(res)
    assert "/tmp/nvflare" not in text and f"{server['storage_root']}/jobs-storage" in text


def test_per_site_flags_in_the_project_file_are_honoured(tmp_path):
    """allow_log_streaming and send_shared_head, false written as YAML false or as "no"."""
    project = yaml.safe_load(CONSORTIUM_TEMPLATE.read_text())
    for p in project["participants"]:
        if p["name"] == "hospital-a":
            p["allow_log_streaming"] = True
        if p["name"] == "hospital-b":
            p["allow_log_streaming"] = False  # FLARE 2.9 alone reads this as "unset" -> true
            p["send_shared_head"] = False
        if p["name"] == "hospital-c":
            p["send_shared_head"] = "no"
    for b in project["builders"]:
        if b["path"].endswith("SitePolicyBuilder"):
            b["args"]["allow_log_streaming"] = True
    f = tmp_path / "p.yml"
    f.write_text(yaml.safe_dump(project))
    prod = provision(f, tmp_path / "out", env={**os.environ, "HOME": str(tmp_path)})
    streaming = {s: json.loads((prod / s / "local/resources.json").read_text())["allow_log_streaming"]
                 for s in ("hospital-a", "hospital-b", "hospital-c")}
    assert streaming == {"hospital-a": True, "hospital-b": False, "hospital-c": True}
    kept = {s: json.loads((prod / s / "local/privacy.json").read_text())["components"][0]["args"]["personal_parts"]
            for s in ("hospital-a", "hospital-b", "hospital-c")}
    assert kept == {"hospital-a": PERSONAL_PARTS, "hospital-b": EVERY_GRADE_HEAD, "hospital-c": EVERY_GRADE_HEAD}


def test_a_site_offers_no_scope_weaker_than_its_default():
    """A job may name any scope a site defines: an `encrypted` site must not define `standard`."""
    assert offered_scopes("standard") == ["standard", "dp", "encrypted", "dp_encrypted", "secagg", "dp_secagg"]
    assert offered_scopes("encrypted") == ["encrypted", "dp_encrypted"]
    assert offered_scopes("dp") == ["dp", "dp_encrypted", "dp_secagg"]
    assert offered_scopes("secagg") == ["secagg", "dp_secagg"]
    with pytest.raises(ValueError, match="not one of"):
        offered_scopes("none")


def test_the_project_admin_keeps_every_admin_command_but_byoc():
    from nvflare.security.security import FLAuthorizer

    from fedbrain.ops.builder import authorization_policy

    policy = authorization_policy()
    FLAuthorizer("hospital_a", policy)  # FLARE parses it
    admin = policy["permissions"]["project_admin"]
    assert admin["byoc"] == "none"
    assert {"get_job_log", "download_job_components", "submit_job", "abort_job", "shutdown"} <= {
        r for r, v in admin.items() if v == "any"}


def test_builders_are_inserted_in_order():
    project = {"name": "x", "participants": [], "builders": [
        {"path": "nvflare.lighter.impl.cert.CertBuilder"}, {"path": "nvflare.lighter.impl.signature.SignatureBuilder"}]}
    paths = [b["path"] for b in with_fedbrain_builders(project)["builders"]]
    assert paths == ["nvflare.lighter.impl.cert.CertBuilder", "fedbrain.ops.builder.SitePolicyBuilder",
                     "nvflare.lighter.impl.signature.SignatureBuilder", "fedbrain.ops.builder.KitManifestBuilder"]


def test_untouched_kits_verify(kits):
    for p in _participants():
        state = verify_manifest(kits / p["name"])
        assert state.participant == p["name"]
        assert not state.refused() and not state.local_changes()
        assert check_certificate(kits / p["name"], expected_name=p["name"]).days_left() > 300
    server = kits / "fl-server.example-consortium.org"
    assert guard(server) == []
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    root = x509.load_pem_x509_certificate((server / "startup" / "rootCA.pem").read_bytes())
    fingerprint = root.fingerprint(hashes.SHA256()).hex(":").upper()
    assert f"root CA SHA-256 {fingerprint}" in (server / "log.txt").read_text()


def _copy(kits: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(kits / name, tmp_path / name, symlinks=True))


def test_an_edited_startup_file_is_refused_and_named(kits, tmp_path):
    kit = _copy(kits, "hospital-a", tmp_path)
    cfg = kit / "startup" / "fed_client.json"
    cfg.write_bytes(cfg.read_bytes().replace(b"8002", b"8009", 1))  # a one-byte-class edit: another port
    problems = guard(kit, probe_server=False)
    assert len(problems) == 1 and "startup/fed_client.json: edited since provisioning" in problems[0]
    assert "startup/fed_client.json: edited" in (kit / "log.txt").read_text()


def test_a_local_change_is_reported_not_refused(kits, tmp_path):
    kit = _copy(kits, "hospital-b", tmp_path)
    privacy = kit / "local" / "privacy.json"
    policy = json.loads(privacy.read_text())
    policy["default_scope"] = "dp"  # the hospital tightens its own policy
    privacy.write_text(json.dumps(policy))
    (kit / "local" / "fedbrain_site.json").write_text("{}")
    assert guard(kit, probe_server=False) == []
    log = (kit / "log.txt").read_text()
    assert "local/privacy.json: edited since provisioning" in log and "local/fedbrain_site.json: added since provisioning" in log


def test_a_corrupted_certificate_gets_a_clear_error(kits, tmp_path):
    kit = _copy(kits, "hospital-c", tmp_path)
    crt = kit / "startup" / "client.crt"
    data = bytearray(crt.read_bytes())
    data[200] ^= 0x55  # one flipped byte inside the base64 body
    crt.write_bytes(bytes(data))
    with pytest.raises(KitError, match="client.crt"):
        check_certificate(kit)
    res = subprocess.run([sys.executable, "-m", "fedbrain.ops.kit_guard", str(kit)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert "REFUSED" in res.stderr and "startup/client.crt" in res.stderr and "Traceback" not in res.stderr


def test_a_kit_from_another_consortium_is_not_vouched_for(kits, tmp_path):
    other = provision(REPO / "provisioning" / "consortium" / "project.yml", tmp_path / "other",
                      env={**os.environ, "HOME": str(tmp_path)})
    kit = _copy(kits, "hospital-a", tmp_path)
    shutil.copy(other / "hospital-a" / "startup" / "rootCA.pem", kit / "startup" / "rootCA.pem")
    with pytest.raises(KitError, match="signature does not match startup/rootCA.pem"):
        verify_manifest(kit)
    shutil.copy(other / "hospital-a" / "startup" / "client.crt", kit / "startup" / "client.crt")
    shutil.copy(kits / "hospital-a" / "startup" / "rootCA.pem", kit / "startup" / "rootCA.pem")
    with pytest.raises(KitError, match="not issued by this kit's root CA"):
        check_certificate(kit)


def test_a_missing_or_added_startup_file_or_a_missing_manifest_is_refused_and_named(kits, tmp_path):
    kit = _copy(kits, "hospital-a", tmp_path)
    (kit / "startup" / "fed_client.json").unlink()
    (kit / "startup" / "extra.sh").write_text("#!/bin/sh\n")
    problems = guard(kit, probe_server=False)
    assert any("startup/fed_client.json: missing" in p for p in problems), problems
    assert any("startup/extra.sh: added" in p for p in problems), problems
    (kit / "startup" / "fedbrain_kit_manifest.json").unlink()
    with pytest.raises(KitError, match="fedbrain_kit_manifest.json: missing"):
        verify_manifest(kit)
    assert guard(kit, probe_server=False)  # refused, not waved through


def test_a_certificate_not_yet_valid_or_a_key_of_another_kit_is_refused(kits, tmp_path):
    import datetime

    kit = _copy(kits, "hospital-a", tmp_path)
    check_certificate(kit)  # as provisioned: fine
    long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    with pytest.raises(KitError, match="not valid before .* is this machine's clock right"):
        check_certificate(kit, now=long_ago)
    shutil.copy(kits / "hospital-b" / "startup" / "client.key", kit / "startup" / "client.key")
    with pytest.raises(KitError, match="client.key: does not belong to .*client.crt"):
        check_certificate(kit)


def test_only_the_project_admin_reads_streamed_logs(kits):
    """download_job_components (FLARE's command for stored ERRORLOG files), get_job_log and show_stats (a running
    job's progress record, each site's metrics in it, fedbrain.fl.progress): project admin only."""
    checked = 0
    for path in sorted(kits.glob("*/local/authorization.json")):
        for role, rights in json.loads(path.read_text())["permissions"].items():
            for command in ("download_job_components", "get_job_log", "show_stats"):
                granted = rights.get(command, "none") not in ("none", False, None)
                assert granted == (role == "project_admin"), (path, role, command, rights.get(command))
                checked += 1
    assert checked >= 4 * 4 * 3  # four roles in every site and server kit


def test_a_damaged_certificate_is_told_from_one_of_another_consortium(kits, tmp_path):
    """One changed byte in the signed part (the issuer's key identifier intact) is damage, not a foreign kit;
    a certificate of another consortium with the same root name is foreign."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    kit = _copy(kits, "hospital-c", tmp_path)
    crt = kit / "startup" / "client.crt"
    der = bytearray(x509.load_pem_x509_certificate(crt.read_bytes()).public_bytes(Encoding.DER))
    der[-10] ^= 0x01  # inside the signature value
    body = base64.encodebytes(bytes(der)).decode()
    crt.write_text(f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n")
    with pytest.raises(KitError) as damaged:
        check_certificate(kit)
    assert "damaged" in str(damaged.value) and "two consortia" not in str(damaged.value)
    for offset in (200, 400, 600):  # a flipped character anywhere in the PEM: never called foreign
        kit = _copy(kits, "hospital-c", tmp_path / str(offset))
        crt = kit / "startup" / "client.crt"
        data = bytearray(crt.read_bytes())
        data[offset] = ord("A") if data[offset] != ord("A") else ord("B")
        crt.write_bytes(bytes(data))
        with pytest.raises(KitError) as flipped:
            check_certificate(kit)
        assert "two consortia" not in str(flipped.value), (offset, str(flipped.value))


def test_a_trial_of_the_production_kits_prints_every_command_whole_even_into_a_pipe(tmp_path):
    """`fedbrain provision --trial --data`: the production kits with the server on localhost, free ports and its
    storage under --out; each site pointed at its synthetic data; every printed command, path and the root
    fingerprint on one line when stdout is a pipe (rich wraps at 80 columns there unless told not to)."""
    import re

    env = {**os.environ, "HOME": str(tmp_path / "home"), "COLUMNS": "80"}
    data = tmp_path / "data"
    fedbrain = str(Path(sys.executable).parent / "fedbrain")
    subprocess.run([fedbrain, "data", "synth", "--sites", "3", "--cases", "2", "--out", str(data)], env=env,
                   check=True, capture_output=True, timeout=300)
    out = tmp_path / "a-folder-name-long-enough-to-need-more-than-eighty-columns" / "for-the-trial-kits"
    res = subprocess.run([fedbrain, "provision", str(REPO / "provisioning" / "consortium" / "project.yml"),
                          "--out", str(out), "--trial", "--data", str(data)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    prod = out / "fedbrain_consortium" / "prod_00"
    starts = [line.strip() for line in lines if line.strip().startswith("bash ") and line.endswith("start.sh")]
    assert starts == [f"bash {prod / k / 'startup' / 'start.sh'}" for k in ("localhost", "hospital-a", "hospital-b",
                                                                            "hospital-c")], lines
    assert any(re.search(r"fingerprint .*: ([0-9A-F]{2}:){31}[0-9A-F]{2}$", line) for line in lines), lines
    server = json.loads((prod / "localhost" / "local" / "resources.json").read_text())
    assert str(out / "server-storage") in json.dumps(server)
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        settings = json.loads((prod / site / "local" / "fedbrain_site.json").read_text())
        assert settings["datalist"] == str(data / site / "datalist.json")
    assert guard(prod / "hospital-a", probe_server=False) == []  # a trial kit is a real, signed production kit


def test_provisioning_again_into_the_same_folder_keeps_the_root_ca(tmp_path):
    """Re-provisioning (a new hospital, a new admin) writes the next prod_NN with the same root CA, owner-only."""
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    template = REPO / "provisioning" / "consortium" / "project.yml"
    first = provision(template, tmp_path / "out", env=env)
    second = provision(template, tmp_path / "out", env=env)
    assert (first.name, second.name) == ("prod_00", "prod_01")
    assert (first / "hospital-a" / "startup" / "rootCA.pem").read_bytes() == \
        (second / "hospital-a" / "startup" / "rootCA.pem").read_bytes()
    assert (second / "hospital-a" / "startup" / "client.key").stat().st_mode & 0o077 == 0
    assert guard(second / "hospital-a", probe_server=False) == []


def test_a_fingerprint_prints_as_it_is_not_as_emoji():
    """Rich turns `:ab:` into an emoji by default: a root fingerprint holding `:AB:` printed wrong before."""
    import io

    from fedbrain.terminal import console

    buf = io.StringIO()
    console(file=buf).print("root CA SHA-256 fingerprint: 79:AB:AB:0B:CD:EF:FE:ED")
    assert buf.getvalue().strip() == "root CA SHA-256 fingerprint: 79:AB:AB:0B:CD:EF:FE:ED"


def test_the_policy_builder_runs_after_the_he_builder():
    """Sites are offered the HE scopes only when their kit holds the HE key, so the policy builder must see it."""
    from fedbrain.ops.provision import HE_BUILDER, POLICY_BUILDER, with_fedbrain_builders

    listed = {"builders": [{"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"}, {"path": POLICY_BUILDER},
                           {"path": HE_BUILDER}, {"path": "nvflare.lighter.impl.signature.SignatureBuilder"}]}
    paths = [b["path"] for b in with_fedbrain_builders(listed)["builders"]]
    assert paths.index(HE_BUILDER) + 1 == paths.index(POLICY_BUILDER) < paths.index(
        "nvflare.lighter.impl.signature.SignatureBuilder")


def test_flares_own_authorizer_keeps_a_running_jobs_progress_record_to_the_project_admin():
    """FLARE's policy parser applies a right named in a role over its category (show_stats is in "view",
    which every role has): the policy fedbrain writes, evaluated by FLARE's own authorizer."""
    from nvflare.fuel.sec.authz import AuthzContext, Authorizer, Person
    from nvflare.security.security import COMMAND_CATEGORIES

    from fedbrain.ops.builder import authorization_policy

    authorizer = Authorizer("server", COMMAND_CATEGORIES)
    assert authorizer.load_policy(authorization_policy()) == ""
    for role in ("project_admin", "org_admin", "lead", "member"):
        user = Person(f"{role}@hospital-a.org", "hospital-a", role)
        shown, _ = authorizer.authorize(AuthzContext("show_stats", user))
        listed, _ = authorizer.authorize(AuthzContext("list_jobs", user))
        assert shown == (role == "project_admin") and listed, role


def test_the_site_loop_reads_what_its_final_check_keeps(kits, tmp_path):
    """fedbrain.fl.site.kept_at_site: the pattern a FedAvg job's head is kept under (tests/test_poc_classify.py)."""
    from fedbrain.fl.site import kept_at_site

    assert kept_at_site(kits / "hospital-a") == PERSONAL_PARTS
    assert kept_at_site(None) == "" and kept_at_site(tmp_path) == ""
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "privacy.json").write_text("{not json")
    assert kept_at_site(tmp_path) == ""
