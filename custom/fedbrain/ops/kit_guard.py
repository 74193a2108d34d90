"""Refuse to start FLARE from a kit that cannot be trusted: ``python -m fedbrain.ops.kit_guard KIT``.

Called by the kit's ``sub_start.sh`` (placed there by :class:`fedbrain.ops.builder.SitePolicyBuilder`)
before FLARE starts. It stops what FLARE lets through: an edited startup file (FLARE signs
only some kits), a corrupted or foreign certificate (FLARE then waits forever without a log
line), a server that presents another consortium's certificate. A server that is merely
down is not the kit's fault: FLARE keeps retrying, so that is only a warning.
Every line also goes to the kit's log.txt, where FLARE's own log is.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from fedbrain.ops.kit import (
    KitError,
    check_certificate,
    kit_identity,
    record_start_state,
    root_fingerprint,
    tls_handshake,
    verify_manifest,
)


def guard(kit: Path, probe_server: bool = True) -> list[str]:
    """Problems that refuse the kit (empty: start), after logging what was checked."""
    kit = Path(kit).resolve()
    problems = []
    try:
        state = verify_manifest(kit)
        problems += [f"{kit / name}: {why} since provisioning (startup/ is the consortium's; restore the "
                     f"kit you were sent)" for name, why in state.refused()]
        for name, why in state.local_changes():
            _say(kit, f"note: {kit / name}: {why} since provisioning (local/ is the site's own; its settings apply)")
        role, _, _ = kit_identity(kit)
        info = check_certificate(kit, expected_name=state.participant)
        if info.days_left() < 30:
            _say(kit, f"warning: {info.path} expires in {info.days_left():.0f} days ({info.not_after:%Y-%m-%d})")
        if probe_server and role == "client" and not problems:
            reach = tls_handshake(kit)
            if reach != "ok":
                _say(kit, f"warning: server {reach}; FLARE will keep trying to connect")
    except KitError as e:
        problems.append(str(e))
    for p in problems:
        _say(kit, f"REFUSED: {p}")
    if not problems:
        _say(kit, f"kit verified (signed manifest, certificate chain, key, expiry); root CA SHA-256 "
                  f"{root_fingerprint(kit)}: compare it with the one the consortium published")
        try:  # every job start compares local/ with this (fedbrain.filters.final_check)
            record_start_state(kit)
        except OSError as e:
            _say(kit, f"warning: could not record local/ at start ({e}); jobs will not compare it")
    return problems


def _say(kit: Path, line: str) -> None:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    text = f"{stamp} - fedbrain.kit_guard - {line}"
    print(text, file=sys.stderr, flush=True)
    try:
        with open(kit / "log.txt", "a") as log:
            log.write(text + "\n")
    except OSError:
        pass


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedbrain.ops.kit_guard KIT_FOLDER", file=sys.stderr)
        return 2
    return 1 if guard(Path(args[0])) else 0


if __name__ == "__main__":
    sys.exit(main())
