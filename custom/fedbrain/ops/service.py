"""``fedbrain site install-service``: a systemd unit that runs a site's kit as a service.

A site started from a remote shell dies with the shell, and a rebooted machine leaves the
consortium without it; the unit restarts it on failure and at boot, under a dedicated
account, with the kit read-only and FLARE's job workspaces in a separate writable folder.
The template ships as package data (``fedbrain-site.service``) so a wheel install has it.
Writing the unit never calls systemctl: the printed next steps are for the administrator.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from fedbrain.ops.kit import KitError, kit_identity

TEMPLATE = Path(__file__).resolve().parent / "fedbrain-site.service"
UNIT_DIR = Path("/etc/systemd/system")
WORKSPACE_ROOT = Path("/var/lib/fedbrain")
#: systemd splits unquoted settings on whitespace and expands % and $: keep paths plain.
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


class ServiceError(RuntimeError):
    """The unit cannot be written; the message says why."""


def _plain(value: str, what: str) -> str:
    if not _SAFE_PATH.match(value) or "%" in value:
        raise ServiceError(f"{what} '{value}' has characters a systemd unit would misread (spaces, %, $, quotes): "
                           f"move it to a plain path")
    return value


def render_unit(kit: Path, user: str, workspace: Path | None = None, datalist: str | None = None,
                bin_dir: Path | None = None) -> str:
    """The unit text for ``kit`` (a client or server kit), run as ``user``."""
    kit = Path(kit).resolve()
    try:
        role, _, _ = kit_identity(kit)
    except KitError as e:
        raise ServiceError(str(e)) from None
    if role == "admin":
        raise ServiceError(f"{kit} is an admin kit: admins connect with `fedbrain status` or the admin console; "
                           f"only a site or server kit runs as a service")
    if not re.match(r"^[a-z_][a-z0-9_-]*$", user):
        raise ServiceError(f"user '{user}' is not a plain account name")
    site = kit.name
    workspace = Path(workspace) if workspace else WORKSPACE_ROOT / site
    bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
    data_env = f"Environment=FEDBRAIN_DATALIST={_plain(str(datalist), 'datalist')}" if datalist else \
        "# data: the datalist named in the kit's local/fedbrain_site.json"
    values = {"@SITE@": site, "@KIT@": _plain(str(kit), "kit path"), "@USER@": user,
              "@WORKSPACE@": _plain(str(workspace), "workspace"), "@BIN@": _plain(str(bin_dir), "python folder"),
              "@DATA_ENV@": data_env}
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def install_service(kit: Path, user: str, output: Path | None = None, workspace: Path | None = None,
                    datalist: str | None = None) -> tuple[Path, list[str]]:
    """Write the unit; returns its path and the commands an administrator runs next."""
    from fedbrain.ops.kit import secret_files

    text = render_unit(kit, user, workspace, datalist)
    site = Path(kit).resolve().name
    ws = Path(workspace) if workspace else WORKSPACE_ROOT / site
    output = Path(output) if output else UNIT_DIR / f"fedbrain-{site}.service"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    except OSError as e:
        raise ServiceError(f"cannot write {output} ({e.strerror or e}); run as root or pass --output FILE") from None
    unit = output.name
    # The group read above would open the keys and HE context to the group: site check refuses that.
    secrets = " ".join(str(f) for f in secret_files(Path(kit).resolve()))
    steps = [
        f"useradd --system --home-dir {ws} --shell /usr/sbin/nologin {user}   # once",
        f"install -d -o {user} -g {user} -m 700 {ws}",
        f"chown -R root:{user} {Path(kit).resolve()} && chmod -R g+rX,o-rwx {Path(kit).resolve()}   # kit read-only",
        *([f"chown {user} {secrets} && chmod 400 {secrets}   # keys: the service account's alone, read-only"]
          if secrets else []),
        *([] if output.parent == UNIT_DIR else [f"cp {output} {UNIT_DIR / unit}"]),
        "systemctl daemon-reload",
        f"systemctl enable --now {unit}",
        f"journalctl -u {unit} -f   # the site check, then FLARE's output",
    ]
    return output, steps
