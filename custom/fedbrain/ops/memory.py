"""Give freed heap memory back to the operating system, so the server's parent process does not grow for weeks.

The server's parent process runs no job code, yet its resident memory doubled over a 500-round job
(bench/soak.py): it serves every admin command (``fedbrain watch`` downloads the server's job log on each
poll) through FLARE's streaming, which allocates 0.5-1 MB buffers per reply, and glibc keeps freed chunks
inside its heap instead of returning them. ``malloc_trim(0)`` hands every whole free page back (glibc 2.8+
releases free pages inside the heap too, not only at its top); it costs milliseconds.

:class:`TrimFreeHeap` (a server kit component, added by fedbrain's provisioning) trims every few seconds
from a daemon thread. Measured once each over 500 rounds: the parent's growth from round 50 was +106%
without it and +74% with it. Trimming the job processes as well changed nothing measurable (their growth is
not free heap; docs/maintainers.md), so they do not. Where the C library has no ``malloc_trim`` (macOS,
musl) nothing happens.
"""

from __future__ import annotations

import ctypes
import threading

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent

#: Seconds between two trims (a trim of a 1 GB heap takes a few milliseconds).
TRIM_EVERY_S = 10.0
_libc = None
_started = False
_lock = threading.Lock()


def release_free_heap() -> bool:
    """Return the C heap's free pages to the operating system; False where the C library cannot."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc(0)
    return True


def keep_heap_trimmed(every_s: float = TRIM_EVERY_S) -> bool:
    """Trim this process's heap every ``every_s`` seconds from a daemon thread (once per process);
    False where trimming is not available."""
    global _started
    with _lock:
        if _started:
            return True
        if not release_free_heap():
            return False
        _started = True

    def loop():
        stop = threading.Event()
        while not stop.wait(every_s):
            release_free_heap()

    threading.Thread(target=loop, name="fedbrain-trim-free-heap", daemon=True).start()
    return True


class TrimFreeHeap(FLComponent):
    """Server kit component: the server's parent process trims its heap for as long as it runs."""

    def __init__(self, every_s: float = TRIM_EVERY_S):
        super().__init__()
        self.every_s = float(every_s)

    def handle_event(self, event_type: str, fl_ctx) -> None:
        if event_type == EventType.SYSTEM_START:
            if not keep_heap_trimmed(self.every_s):
                self.log_info(fl_ctx, "this C library cannot return freed memory (no malloc_trim); not trimming")
