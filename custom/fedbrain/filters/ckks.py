"""CKKS helpers that import nothing heavy (TenSEAL and numpy only): what the encryption worker
processes load, and the guard that keeps TenSEAL's C++ stdout warning out of a site's console."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile

import numpy as np

TENSEAL_WARNING = ("WARNING: The input does not fit in a single ciphertext", "The following operations are disabled",
                   "If you need to use those operations")


def _flush_native_stdout() -> None:
    """Flush C stdio and C++ std::cout (which keeps its own buffer once a library in the process
    turned off stdio sync): what TenSEAL wrote must land before file descriptor 1 is switched."""
    ctypes.CDLL(None).fflush(None)
    try:
        cxx = ctypes.CDLL("libstdc++.so.6")
        cxx._ZNSo5flushEv(ctypes.byref(ctypes.c_char.in_dll(cxx, "_ZSt4cout")))
    except (OSError, AttributeError, ValueError):  # another C++ runtime: stdio flushing is all we can do
        pass


@contextlib.contextmanager
def tenseal_quiet():
    """Hold back TenSEAL's per-vector stdout warning; anything else printed meanwhile is passed on.

    The warning is written by C++ straight to file descriptor 1, so Python cannot filter it:
    fd 1 points at a temporary file for the duration, then the kept lines are written back.
    """
    sys.stdout.flush()
    _flush_native_stdout()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            _flush_native_stdout()
            os.dup2(saved, 1)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(TENSEAL_WARNING)]
            if kept:
                os.write(1, "".join(kept).encode())


_worker_context = None


def init_worker(context: bytes) -> None:
    global _worker_context
    import tenseal as ts

    _worker_context = ts.context_from(context)


def encrypt_serialized(values: np.ndarray) -> bytes:
    import tenseal as ts

    with tenseal_quiet():
        return ts.ckks_vector(_worker_context, values).serialize()
