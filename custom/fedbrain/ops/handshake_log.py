"""One line in the server's log for every failed TLS handshake: who tried, and what failed.

FLARE's server (its aiohttp driver on Python's asyncio) drops a connection whose certificate it
refuses without a word: asyncio logs a failed handshake only in debug mode. A hospital whose kit
belongs to another consortium, or whose certificate is damaged, then sees its site hang while the
server's log stays silent. :class:`RefusedHandshakeLog`, declared in the server kit's
``local/resources.json`` (fedbrain's provisioning adds it), makes the server process log each refused
handshake, at most once per source address and reason a minute.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time

from nvflare.apis.fl_component import FLComponent

log = logging.getLogger("fedbrain.handshakes")

#: At most one line per (source address, reason) in this many seconds.
REPEAT_AFTER_S = 60.0
_lock = threading.Lock()
_last: dict[tuple[str, str], float] = {}
_installed = False


def describe(exc: BaseException) -> str:
    """What failed, in a hospital's words, from the handshake's exception."""
    text = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return f"its certificate was not issued by this consortium's root CA ({text}): a kit of another consortium, or a damaged one"
    if "ALERT_UNKNOWN_CA" in str(exc) or "ALERT_BAD_CERTIFICATE" in str(exc):
        return (f"it does not trust this server's certificate ({text}): a kit of another consortium, or this server "
                f"was re-provisioned with a new root CA")
    if "NO_CERTIFICATE" in str(exc) or "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(exc):
        return f"it presented no client certificate ({text})"
    return f"TLS handshake failed ({text})"


def report(peer, exc: BaseException, now: float | None = None) -> str | None:
    """Log one refused handshake from ``peer`` (host, port); returns the line, or None when it was
    logged for this source and reason less than :data:`REPEAT_AFTER_S` ago."""
    host = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "unknown address"
    why = describe(exc)
    now = time.monotonic() if now is None else now
    with _lock:
        key = (host, why)
        if now - _last.get(key, -REPEAT_AFTER_S) < REPEAT_AFTER_S:
            return None
        _last[key] = now
    line = f"TLS handshake from {host} failed: {why}"
    log.warning(line)
    return line


def install() -> None:
    """Wrap asyncio's server-side TLS handshake completion (once per process) so a failure is reported."""
    global _installed
    from asyncio import sslproto

    with _lock:
        if _installed:
            return
        original = sslproto.SSLProtocol._on_handshake_complete

        def _on_handshake_complete(self, handshake_exc):
            if handshake_exc is not None and getattr(self, "_server_side", False):
                try:
                    transport = getattr(self, "_transport", None)
                    report(transport.get_extra_info("peername") if transport else None, handshake_exc)
                except Exception:  # noqa: BLE001 - never let the log line break the server's connection handling
                    pass
            return original(self, handshake_exc)

        sslproto.SSLProtocol._on_handshake_complete = _on_handshake_complete
        _installed = True


class RefusedHandshakeLog(FLComponent):
    """Declared in the server's resources.json: built once in the server process at start, it installs
    the handshake report."""

    def __init__(self):
        super().__init__()
        install()
