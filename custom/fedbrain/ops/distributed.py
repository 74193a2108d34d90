"""Distributed provisioning: every hospital makes its own private key; the consortium only signs.

FLARE 2.9's flow (``nvflare cert request|approve``, ``nvflare package``) with fedbrain's kit in it:

1. The consortium (``fedbrain provision PROJECT --out DIR --distributed``) provisions its own participants
   only: the server and the project admin, whose keys it makes on its own machine. It writes the root CA
   for approving (``ca/``, the key 0600) and one participant file per hospital participant
   (``requests/<name>.yml``: its entry of the project and the kit's builders, fedbrain's included).
2. Each hospital (``fedbrain kit request FILE --out DIR``) makes a key and a certificate request. Its key
   stays in DIR; it sends only ``<name>.request.zip`` (the request and its participant entry, no key).
3. The consortium (``fedbrain kit approve ZIP --consortium DIR/<project>``) signs requests from participants its project
   names (anything else is refused) and returns ``<name>.signed.zip`` (certificate, root certificate, the
   server's address, all signed by the root).
4. The hospital (``fedbrain kit package SIGNED --request-dir DIR --out KITS --fingerprint FP``) checks the
   root against the fingerprint the consortium published out of band, and assembles its kit with its own
   key: FLARE's files, fedbrain's site policies and a manifest signed with its own key.

A consortium provisioned in one step adds a hospital the same way: the hospital runs ``fedbrain kit request
PROJECT --name NAME`` on the project file with its entry added, and the consortium approves with
``--consortium DIR/<project> --project PROJECT`` (the CA folder is made from ``state/`` then).

No HE context is made in this mode: CKKS as FLARE does it needs one secret key shared by every site, which
is exactly what this mode does not hand out. Secure aggregation by pairwise masking (``secagg``) needs
no shared key. A site whose default scope is ``encrypted`` is refused at step 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from fedbrain.ops.kit import KitError, protect_secrets
from fedbrain.ops.provision import HE_BUILDER, SIGNATURE_BUILDER, with_fedbrain_builders

#: Participants the consortium provisions itself: FLARE's distributed requests cover sites, the server and
#: org_admin/lead/member users, never the project admin, who holds the root key anyway.
CONSORTIUM_KINDS = ("server",)
CONSORTIUM_ROLES = ("project_admin",)
#: Builders a kit assembled by its owner leaves out: HE needs a key shared by every site; FLARE's
#: SignatureBuilder needs the root key (``nvflare package`` drops it too).
NOT_IN_OWNER_KITS = (HE_BUILDER, SIGNATURE_BUILDER)
#: Scopes that need the shared HE key.
HE_SCOPES = ("encrypted", "dp_encrypted")
CA_FOLDER, REQUESTS_FOLDER = "ca", "requests"
#: FLARE's builder that writes fed_client.json / fed_server.json, and its default scheme (FLARE 2.9: http).
STATIC_FILE_BUILDER, STATIC_FILE_DEFAULT_SCHEME = "nvflare.lighter.impl.static_file.StaticFileBuilder", "http"
PROFILE_NAME, PROJECT_COPY = "profile.yml", "project.yml"


def _nvflare(*args: str, audit: Path, env: dict | None = None) -> dict:
    """Run ``nvflare ARGS --output json``; the command's data, or KitError with FLARE's message and hint.

    FLARE keeps an audit record of every request and approval under ``~/.nvflare``; fedbrain points HOME at
    ``audit`` (a folder beside the request or the CA) so the records stay with what they describe and the
    user's own ~/.nvflare is never touched."""
    nvflare = Path(sys.executable).parent / "nvflare"
    env = dict(env or os.environ)
    Path(audit).mkdir(parents=True, exist_ok=True)
    Path(audit).chmod(0o700)
    env["HOME"] = str(Path(audit).resolve())
    res = subprocess.run([str(nvflare), *args, "--output", "json"], capture_output=True, text=True,
                         env=env, stdin=subprocess.DEVNULL)
    reply = None
    for line in reversed(res.stdout.strip().splitlines()):
        try:
            reply = json.loads(line)
            break
        except ValueError:
            continue
    if res.returncode == 0 and isinstance(reply, dict) and reply.get("status") == "ok":
        return reply.get("data") or {}
    lines = (res.stderr + "\n" + res.stdout).strip().splitlines()
    cause = next((ln.strip() for ln in reversed(lines) if "Error:" in ln or "ERROR" in ln), None)
    if isinstance(reply, dict) and reply.get("message"):
        hint = f" ({reply['hint']})" if reply.get("hint") and not cause else ""
        raise KitError(f"nvflare {' '.join(args[:2])}: {reply['message']}{hint}" + (f": {cause}" if cause else ""))
    raise KitError(f"nvflare {' '.join(args[:2])} failed: {cause or (lines or [f'exit {res.returncode}'])[-1]}")


def _load_project(project_file: Path) -> dict:
    try:
        project = yaml.safe_load(Path(project_file).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise KitError(f"{project_file}: cannot read the project file ({e})") from None
    if not isinstance(project, dict) or "participants" not in project or "name" not in project:
        raise KitError(f"{project_file}: not a FLARE project file (needs name, participants, builders)")
    return project


def kept_by_consortium(participant: dict) -> bool:
    return participant.get("type") in CONSORTIUM_KINDS or participant.get("role") in CONSORTIUM_ROLES


def owner_kit_builders(project: dict) -> list[dict]:
    """The builders a participant's own kit is assembled with: the project's, fedbrain's in place, minus those
    that need a key the owner does not hold."""
    return [b for b in with_fedbrain_builders(project)["builders"] if b.get("path") not in NOT_IN_OWNER_KITS]


def participant_file(project: dict, participant: dict) -> dict:
    """What a hospital participant runs ``fedbrain kit request`` on: its own entry and the kit's builders."""
    scope = participant.get("default_scope")
    if scope in HE_SCOPES:
        raise KitError(f"participant '{participant.get('name')}': default_scope '{scope}' needs the HE key every "
                       f"site shares, which distributed provisioning does not hand out; use 'secagg' (pairwise "
                       f"masking, no shared key) or provision in one step")
    return {"name": project["name"], "description": project.get("description", ""),
            "participants": [participant], "builders": owner_kit_builders(project)}


def server_profile(project: dict) -> dict:
    """FLARE's project profile for approving: the scheme, mTLS and the server's address (in every signed zip)."""
    server = next((p for p in project["participants"] if p.get("type") == "server"), None)
    if server is None:
        raise KitError("the project file has no server participant")
    static = next((b for b in project.get("builders") or [] if b.get("path") == STATIC_FILE_BUILDER), {})
    scheme = (static.get("args") or {}).get("scheme", STATIC_FILE_DEFAULT_SCHEME)  # the server listens with it
    return {"name": project["name"], "scheme": scheme,
            "connection_security": server.get("connection_security", "mtls"),
            "server": {"host": server["name"], "fed_learn_port": int(server.get("fed_learn_port", 8002)),
                       "admin_port": int(server.get("admin_port", 8003))}}


def write_ca_folder(state_dir: Path, ca_dir: Path, project: dict) -> Path:
    """The root CA of a one-step provisioning (``state/cert.json``) as FLARE's ``nvflare cert approve`` reads
    it: rootCA.pem, rootCA.key (0600), ca.json; with the project and its profile beside them."""
    from cryptography import x509
    from nvflare.tool.cert.fingerprint import cert_fingerprint_sha256

    state = json.loads((Path(state_dir) / "cert.json").read_text())
    ca_dir = Path(ca_dir)
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_dir.chmod(0o700)
    key = ca_dir / "rootCA.key"
    key.touch(mode=0o600, exist_ok=True)
    key.chmod(0o600)
    key.write_text(state["root_pri_key"])
    (ca_dir / "rootCA.pem").write_text(state["root_cert"])
    root = x509.load_pem_x509_certificate(state["root_cert"].encode())
    (ca_dir / PROFILE_NAME).write_text(yaml.safe_dump(server_profile(project), sort_keys=False))
    (ca_dir / PROJECT_COPY).write_text(yaml.safe_dump(project, sort_keys=False))
    (ca_dir / "ca.json").write_text(json.dumps({
        "project": project["name"], "provision_version": "00", "rootCA_fingerprint": cert_fingerprint_sha256(root),
        "project_profile": str((ca_dir / PROFILE_NAME).resolve())}, indent=2) + "\n")
    (ca_dir / "ca.json").chmod(0o600)
    return ca_dir


def provision_distributed(project_file: Path, out_dir: Path, env: dict | None = None) -> tuple[Path, Path, list[Path]]:
    """The consortium's side: its own kits (server, project admin), the CA folder for approving, one
    participant file per hospital participant. Returns (kits folder, CA folder, participant files)."""
    from fedbrain.ops.provision import provision

    project = _load_project(project_file)
    out_dir = Path(out_dir).resolve()
    own = [p for p in project["participants"] if kept_by_consortium(p)]
    others = [p for p in project["participants"] if not kept_by_consortium(p)]
    if not any(p.get("type") == "server" for p in own):
        raise KitError(f"{project_file}: the project file has no server participant")
    files = {p["name"]: participant_file(project, p) for p in others}  # refuses HE scopes before anything is made
    consortium = {**project, "participants": own,
                  "builders": [b for b in project.get("builders") or [] if b.get("path") != HE_BUILDER]}
    out_dir.mkdir(parents=True, exist_ok=True)
    own_file = out_dir / f"{project['name']}.consortium.yml"
    own_file.write_text(yaml.safe_dump(consortium, sort_keys=False))
    prod = provision(own_file, out_dir, env=env)
    ca_dir = write_ca_folder(out_dir / project["name"] / "state", out_dir / project["name"] / CA_FOLDER, project)
    requests = out_dir / project["name"] / REQUESTS_FOLDER
    requests.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in files.items():
        path = requests / f"{name}.yml"
        path.write_text(yaml.safe_dump(content, sort_keys=False))
        written.append(path)
    return prod, ca_dir, written


def request_kit(source: Path, out_dir: Path, name: str | None = None, env: dict | None = None) -> tuple[Path, Path]:
    """The hospital's side, first step: a private key (0600, stays in ``out_dir``) and a request zip to send.

    ``source``: the participant file the consortium sent, or the consortium's project file with ``name`` (a
    project file holds no secret). Returns (request zip, key)."""
    content = _load_project(source)
    people = content.get("participants") or []
    if name:
        people = [p for p in people if p.get("name") == name]
        if not people:
            raise KitError(f"{source}: names no participant '{name}'")
    if len(people) != 1:
        raise KitError(f"{source}: names {len(people)} participants; say which one is yours (--name)")
    if kept_by_consortium(people[0]):
        raise KitError(f"{source}: '{people[0]['name']}' is provisioned by the consortium itself, not by request")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    own = out_dir / f"{people[0]['name']}.participant.yml"  # refuses an HE scope before a key is made
    own.write_text(yaml.safe_dump(participant_file(content, people[0]), sort_keys=False))
    data = _nvflare("cert", "request", "-p", str(own), "--out", str(out_dir), "--force", audit=out_dir / "audit",
                    env=env)
    who = people[0]["name"]
    zip_path, key = Path(data.get("request_zip") or out_dir / f"{who}.request.zip"), out_dir / f"{who}.key"
    protect_secrets(out_dir)
    with zipfile.ZipFile(zip_path) as zf:  # what leaves: never a key
        for member in zf.namelist():
            if b"PRIVATE KEY" in zf.read(member):
                raise KitError(f"{zip_path}: {member} holds a private key; do not send it")
    return zip_path, key


def _request_identity(request_zip: Path) -> dict:
    try:
        with zipfile.ZipFile(request_zip) as zf:
            meta = json.loads(zf.read("request.json"))
            site = yaml.safe_load(zf.read("site.yaml"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, yaml.YAMLError) as e:
        raise KitError(f"{request_zip}: not a request from `fedbrain kit request` ({e})") from None
    people = (site or {}).get("participants") or [{}]
    return {**people[0], "name": meta.get("name"), "project": meta.get("project"),
            "cert_type": meta.get("cert_type")}


def consortium_ca(consortium: Path, project_file: Path | None = None) -> Path:
    """The CA folder ``nvflare cert approve`` reads, inside the consortium's provisioning folder (``DIR/<project>``:
    written by ``provision --distributed``, or made here from a one-step consortium's ``state/``). A project file
    given replaces the copy the CA folder holds (a hospital added to the consortium)."""
    consortium = Path(consortium).resolve()
    ca_dir = consortium / CA_FOLDER
    if project_file is not None:
        project = _load_project(project_file)
        if project["name"] != consortium.name:
            raise KitError(f"{project_file}: project '{project['name']}', but {consortium} provisioned "
                           f"'{consortium.name}'")
        if not (consortium / "state" / "cert.json").is_file():
            raise KitError(f"{consortium}: no state/cert.json; give the folder `fedbrain provision` wrote for "
                           f"{project['name']} (DIR/{project['name']})")
        write_ca_folder(consortium / "state", ca_dir, project)
    if not (ca_dir / PROJECT_COPY).is_file():
        raise KitError(f"{consortium}: no CA folder for approving yet; give the project file (--project) once")
    return ca_dir


def approve_request(request_zip: Path, consortium: Path, project_file: Path | None = None, out: Path | None = None,
                    env: dict | None = None) -> Path:
    """The consortium's side: sign a request from a participant the project names, as the project names it
    (type, organisation, role); anything else is refused in one line. Returns the signed zip."""
    request_zip = Path(request_zip).resolve()
    ca_dir = consortium_ca(consortium, project_file)
    project = _load_project(ca_dir / PROJECT_COPY)
    who = _request_identity(request_zip)
    listed = next((p for p in project["participants"] if p.get("name") == who["name"]), None)
    if listed is None:
        raise KitError(f"{request_zip}: '{who['name']}' is not a participant of {project['name']}; add it to the "
                       f"project file first and give it with --project (docs/runbook.md, adding a hospital)")
    if kept_by_consortium(listed):
        raise KitError(f"{request_zip}: '{who['name']}' is provisioned by the consortium itself, not by request")
    for prop in ("type", "org", "role"):
        if listed.get(prop) != who.get(prop):
            raise KitError(f"{request_zip}: '{who['name']}' asks to be {prop} '{who.get(prop)}', the project says "
                           f"'{listed.get(prop)}'")
    out = Path(out).resolve() if out else request_zip.with_name(f"{who['name']}.signed.zip")
    _nvflare("cert", "approve", str(request_zip), "--ca-dir", str(ca_dir), "--profile", str(ca_dir / PROFILE_NAME),
             "--out", str(out), "--force", audit=ca_dir.parent / "audit", env=env)
    return out


def package_kit(signed_zip: Path, request_dir: Path, out_dir: Path, fingerprint: str,
                env: dict | None = None) -> Path:
    """The hospital's side, last step: its kit, from the signed zip and its own key, after checking the root CA
    against the fingerprint published out of band. Returns the kit folder."""
    from nvflare.tool.cert.fingerprint import normalize_sha256_fingerprint

    normal = normalize_sha256_fingerprint(fingerprint)
    if not normal:
        raise KitError(f"'{fingerprint}' is not a SHA-256 fingerprint (AA:BB:... as `fedbrain provision` printed)")
    signed_zip, request_dir, out_dir = Path(signed_zip).resolve(), Path(request_dir).resolve(), Path(out_dir).resolve()
    data = _nvflare("package", str(signed_zip), "-w", str(out_dir), "--request-dir", str(request_dir),
                    "--fingerprint", normal, "--force", audit=request_dir / "audit", env=env)
    kit = Path(data.get("output_dir") or "")
    if not (kit / "startup").is_dir():
        found = sorted(out_dir.glob("*/prod_*/*/startup"))
        if not found:
            raise KitError(f"nvflare package wrote no kit under {out_dir}")
        kit = found[-1].parent
    protect_secrets(kit)
    return kit
