"""A startup kit's integrity and certificates, checked before FLARE is trusted with it.

FLARE signs a kit only when it carries HE or confidential-computing files, and a kit whose
certificate is corrupted hangs silently inside FLARE. fedbrain therefore writes its own
manifest at provisioning (every file of ``startup/`` and ``local/`` with its SHA-256, signed
with the consortium's root key; a kit assembled by its owner in distributed provisioning is signed
with the owner's own key instead, since the root key never reaches it) and checks it, with the
certificates, before a site starts
(``python -m fedbrain.ops.kit_guard``, called by the kit's ``sub_start.sh``) and in
``fedbrain site check``.

``startup/`` is the consortium's: any change there refuses the kit. ``local/`` is the
hospital's own folder (its policies, its data settings): a change there is reported, not
refused, because a hospital may tighten its own policy after provisioning.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import json
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "fedbrain_kit_manifest.json"
#: The folders of a kit the manifest covers, and those where a change refuses the kit.
COVERED = ("startup", "local")
REFUSE_CHANGES_IN = ("startup",)


class KitError(RuntimeError):
    """A kit cannot be trusted or used; the message names the file and the reason."""


# ---- manifest -------------------------------------------------------------------------------

def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kit_files(kit: Path) -> dict[str, str]:
    """``{"startup/x": sha256}`` for every file the manifest covers (the manifest itself excluded)."""
    kit = Path(kit)
    files = {}
    for folder in COVERED:
        base = kit / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(kit).as_posix()
            if path.is_file() and rel != f"startup/{MANIFEST_NAME}":
                files[rel] = _digest(path)
    return files


#: What local/ held when the site last started (written by the kit check; read at every job start).
START_STATE_NAME = ".fedbrain_local_at_start.json"
#: local/ files FLARE reads when the site starts: an edit takes effect only after a restart.
POLICY_FILES = ("local/privacy.json", "local/authorization.json", "local/resources.json")


def local_files(kit: Path) -> dict[str, str]:
    """``{"local/x": sha256}`` of every file in the kit's local/."""
    return {k: v for k, v in kit_files(kit).items() if k.startswith("local/")}


def record_start_state(kit: Path) -> Path:
    """Note what local/ holds as the site starts (owner-only file in the kit folder)."""
    path = Path(kit) / START_STATE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(local_files(kit), indent=1, sort_keys=True) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def local_changes_since_start(kit: Path) -> tuple[list[str], list[str]] | None:
    """(policy files, other files) of local/ changed, added or removed since the site started; None when the
    start was not recorded (a kit without fedbrain's start check)."""
    path = Path(kit) / START_STATE_NAME
    if not path.is_file():
        return None
    before, now = json.loads(path.read_text()), local_files(kit)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return [k for k in changed if k in POLICY_FILES], [k for k in changed if k not in POLICY_FILES]


def _canonical(files: dict[str, str], participant: str) -> bytes:
    return json.dumps({"participant": participant, "files": files}, sort_keys=True, separators=(",", ":")).encode()


def _pss():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256()


#: Who signed a manifest: the consortium's root key (one-step provisioning) or the participant's own key
#: (a kit its owner assembled from a signed certificate: distributed provisioning).
SIGNERS = ("root", "participant")


def write_manifest(kit: Path, participant: str, private_key, signer: str = "root") -> Path:
    """Sign the kit as it is now (called at provisioning) with the root key or, ``signer="participant"``, the
    kit's own private key."""
    if signer not in SIGNERS:
        raise ValueError(f"signer must be one of {SIGNERS}, not {signer!r}")
    files = kit_files(kit)
    pad, algo = _pss()
    signature = private_key.sign(_canonical(files, participant), pad, algo)
    path = Path(kit) / "startup" / MANIFEST_NAME
    path.write_text(json.dumps({"participant": participant, "files": files, "signer": signer,
                                "signature": base64.b64encode(signature).decode()}, indent=1, sort_keys=True) + "\n")
    return path


def own_private_key(kit: Path):
    """The kit's own private key (``startup/client.key`` or ``server.key``)."""
    from cryptography.hazmat.primitives import serialization

    _, _, key_name = kit_identity(kit)
    path = Path(kit) / "startup" / key_name
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KitError(f"{path}: missing") from None
    except (ValueError, TypeError) as e:
        raise KitError(f"{path}: corrupted, not a valid private key ({e})") from None


@dataclass
class KitState:
    """What differs between a kit on disk and its signed manifest."""

    participant: str = ""
    signer: str = "root"
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)

    def _differences(self) -> list[tuple[str, str]]:
        return [(f, why) for why, names in (("edited", self.changed), ("missing", self.missing),
                                            ("added", self.added)) for f in names]

    def refused(self) -> list[tuple[str, str]]:
        """(file, what happened) for differences that make the kit unusable: anything in startup/."""
        return [(f, why) for f, why in self._differences() if f.split("/", 1)[0] in REFUSE_CHANGES_IN]

    def local_changes(self) -> list[tuple[str, str]]:
        """(file, what happened) in local/: the hospital's own folder, reported only."""
        return [(f, why) for f, why in self._differences() if f.split("/", 1)[0] not in REFUSE_CHANGES_IN]


def _certificate(path: Path, missing: str = "missing"):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise KitError(f"{path}: {missing}") from None
    except ValueError as e:
        raise KitError(f"{path}: not a valid PEM certificate ({e})") from None


def read_root_cert(kit: Path):
    return _certificate(Path(kit) / "startup" / "rootCA.pem", "missing; this folder is not a startup kit")


def root_fingerprint(kit: Path) -> str:
    """SHA-256 fingerprint of the kit's root CA: the consortium publishes it out of band, so a kit whose
    rootCA.pem and manifest were both replaced (it verifies against itself) can still be told apart."""
    from cryptography.hazmat.primitives import hashes

    return read_root_cert(kit).fingerprint(hashes.SHA256()).hex(":").upper()


def verify_manifest(kit: Path) -> KitState:
    """Check the manifest's signature against the kit's root CA (or, for a kit its owner assembled, against the
    kit's own certificate, whose chain to the root :func:`check_certificate` checks), then every file against it.

    Raises KitError when the manifest is missing, unsigned or signed by another key (the kit
    then cannot be vouched for at all); returns the differences otherwise.
    """
    from cryptography.exceptions import InvalidSignature

    kit = Path(kit)
    path = kit / "startup" / MANIFEST_NAME
    if not path.is_file():
        raise KitError(f"{path}: missing; this kit was not provisioned by `fedbrain provision` "
                       f"(or the file was removed)")
    try:
        manifest = json.loads(path.read_text())
        files, participant = manifest["files"], manifest["participant"]
        signer = manifest.get("signer", "root")
        signature = base64.b64decode(manifest["signature"])
    except (ValueError, KeyError, TypeError) as e:
        raise KitError(f"{path}: unreadable ({e!r})") from None
    if signer not in SIGNERS:
        raise KitError(f"{path}: signed by '{signer}', which is neither the root nor the participant")
    pad, algo = _pss()
    if signer == "root":
        key, against = read_root_cert(kit).public_key(), "startup/rootCA.pem"
    else:
        key, against = _own_certificate(kit).public_key(), f"the kit's own certificate ({kit_identity(kit)[1]})"
    try:
        key.verify(signature, _canonical(files, participant), pad, algo)
    except InvalidSignature:
        raise KitError(f"{path}: its signature does not match {against}: the manifest or the certificate was "
                       f"edited, or they come from different kits") from None
    actual = kit_files(kit)
    return KitState(
        participant=participant, signer=signer,
        changed=sorted(f for f in files if f in actual and actual[f] != files[f]),
        missing=sorted(f for f in files if f not in actual),
        added=sorted(f for f in actual if f not in files),
    )


# ---- certificates ---------------------------------------------------------------------------

def _own_certificate(kit: Path):
    return _certificate(Path(kit) / "startup" / kit_identity(kit)[1])


@dataclass
class CertInfo:
    path: Path
    common_name: str
    not_after: datetime.datetime

    def days_left(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return (self.not_after - now).total_seconds() / 86400


def kit_identity(kit: Path) -> tuple[str, str, str]:
    """(role, certificate file, key file) of a kit: client, server or admin."""
    startup = Path(kit) / "startup"
    for role, cert, key in (("client", "client.crt", "client.key"), ("server", "server.crt", "server.key")):
        if (startup / cert).exists() or (startup / key).exists():
            if role == "client" and (startup / "fed_admin.json").exists():
                role = "admin"
            return role, cert, key
    raise KitError(f"{startup}: holds neither client.crt nor server.crt; this folder is not a startup kit")


def check_certificate(kit: Path, expected_name: str | None = None,
                      now: datetime.datetime | None = None) -> CertInfo:
    """The kit's own certificate: parses, is signed by the kit's root CA, is in date, matches its
    private key and names the expected participant. Raises KitError naming the file otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.x509.oid import NameOID

    kit = Path(kit)
    _, cert_name, key_name = kit_identity(kit)
    cert_path, key_path = kit / "startup" / cert_name, kit / "startup" / key_name
    root = read_root_cert(kit)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise KitError(f"{cert_path}: missing") from None
    except ValueError as e:
        raise KitError(f"{cert_path}: corrupted, not a valid PEM certificate ({e}); FLARE would wait forever "
                       f"for a connection with it. Restore the file from the kit you were sent.") from None
    try:
        root.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                                 cert.signature_hash_algorithm)
    except Exception:  # noqa: BLE001 - any failure means: not issued by this root, or damaged since
        if _names_this_root(cert, root):
            raise KitError(f"{cert_path}: damaged: it names this kit's root CA as its issuer, but its signature no "
                           f"longer verifies (a changed byte). Restore the file from the kit you were sent") from None
        raise KitError(f"{cert_path}: not issued by this kit's root CA (startup/rootCA.pem, "
                       f"'{root.subject.rfc4514_string()}'): the kit mixes files of two consortia") from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise KitError(f"{cert_path}: expired on {cert.not_valid_after_utc:%Y-%m-%d}; ask the consortium for a new kit")
    if now < cert.not_valid_before_utc:
        raise KitError(f"{cert_path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                       f"is this machine's clock right?")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KitError(f"{key_path}: missing") from None
    except (ValueError, TypeError) as e:
        raise KitError(f"{key_path}: corrupted, not a valid private key ({e})") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise KitError(f"{key_path}: does not belong to {cert_path} (the key and certificate come from different kits)")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if expected_name and common_name != expected_name:
        raise KitError(f"{cert_path}: issued to '{common_name}', but this kit is '{expected_name}'")
    return CertInfo(cert_path, common_name, cert.not_valid_after_utc)


def _names_this_root(cert, root) -> bool:
    """Whether ``cert`` says this root issued it: its authority key identifier is the root's key (two consortia
    provisioned from one template share the root's name, never its key)."""
    from cryptography import x509

    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except (x509.ExtensionNotFound, ValueError):
        return False
    return aki == x509.SubjectKeyIdentifier.from_public_key(root.public_key()).digest


def server_address(kit: Path) -> tuple[str, int]:
    """The server a client or admin kit connects to (host, port)."""
    startup = Path(kit) / "startup"
    try:
        if (startup / "fed_client.json").exists():
            target = json.loads((startup / "fed_client.json").read_text())["servers"][0]["service"]["target"]
        else:
            admin = json.loads((startup / "fed_admin.json").read_text())["admin"]
            target = f"{admin['host']}:{admin['port']}"
        host, port = target.rsplit(":", 1)
        return host, int(port)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise KitError(f"{startup}: cannot read the server address from fed_client.json/fed_admin.json ({e!r})") from None


def tls_handshake(kit: Path, timeout: float = 5.0) -> str:
    """Open an mTLS connection to the kit's server with the kit's own certificate.

    Returns "ok" or "unreachable: ..." (the server may simply be down: not the kit's fault);
    raises KitError when the handshake fails on certificates (a foreign or corrupted kit).
    """
    kit = Path(kit)
    _, cert_name, key_name = kit_identity(kit)
    host, port = server_address(kit)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(kit / "startup" / "rootCA.pem"))
    ctx.check_hostname = False  # FLARE checks the server identity itself; here the chain is what matters
    try:
        ctx.load_cert_chain(str(kit / "startup" / cert_name), str(kit / "startup" / key_name))
    except (ssl.SSLError, OSError) as e:
        raise KitError(f"{kit / 'startup' / cert_name}: cannot be used for TLS ({e})") from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                # With TLS 1.3 the server judges our certificate after the handshake: a refusal
                # arrives as an alert on the first read; an accepted client just sees silence.
                tls.settimeout(min(timeout, 2.0))
                try:
                    tls.recv(1)
                except (TimeoutError, socket.timeout):
                    pass
        return "ok"
    except ssl.SSLCertVerificationError as e:
        raise KitError(f"the server {host}:{port} presents a certificate this kit's rootCA.pem did not issue "
                       f"({e.verify_message}): the kit belongs to another consortium, or the server was "
                       f"re-provisioned; ask the consortium for the current kit") from None
    except ssl.SSLEOFError:
        # Closed without a TLS alert: nothing judged the certificate. A relay or proxy in front of a server that is
        # not up yet does this (a refusal of the certificate comes as an alert).
        return (f"unreachable: {host}:{port} (the connection closed during the TLS handshake, without a refusal: "
                f"the server is not up yet, or a proxy in between cannot reach it)")
    except ssl.SSLError as e:
        raise KitError(f"the server {host}:{port} refused this kit's certificate ({e.reason or e}); the kit "
                       f"does not belong to this consortium") from None
    except OSError as e:
        return f"unreachable: {host}:{port} ({e.strerror or e})"


# ---- secrets on disk ----------------------------------------------------------------------------
#: Files that hold a secret: private keys, the consortium's provisioning state (the root CA key and
#: every participant's private key), and a site's HE context (it carries the CKKS secret key).
SECRET_PATTERNS = ("*.key", "cert.json", "client_context.tenseal")


def secret_files(root: Path) -> list[Path]:
    root = Path(root)
    return sorted({p for pattern in SECRET_PATTERNS for p in root.rglob(pattern) if p.is_file()})


def protect_secrets(root: Path) -> list[Path]:
    """Make every secret under ``root`` readable by its owner only (files 0600, the folders holding them
    0700): FLARE's provisioning leaves most of them 0644 under a usual umask. Returns the files."""
    found = secret_files(root)
    for path in found:
        path.chmod(0o600)
        path.parent.chmod(0o700)
    return found


def exposed_secrets(root: Path) -> list[Path]:
    """Secret files that someone other than their owner may read (group or world bits set)."""
    return [p for p in secret_files(root) if p.stat().st_mode & 0o077]
