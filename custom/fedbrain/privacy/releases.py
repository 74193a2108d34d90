"""What a site's client-level DP filter released, per task, so the site's final check can prove that
every model array leaving the site is one of them (:mod:`fedbrain.filters.final_check`); and the jobs
whose results the final check refused, so the site loop trains no more for them.

Held in the site's job process only; fingerprints (hashes of the values), never the values."""

from __future__ import annotations

import hashlib
import threading

import numpy as np

_released: dict[str, dict[str, dict[str, str]]] = {}  # task id -> {kind: {name: fingerprint}}
#: Kinds of release: what client-level DP noised; what secure aggregation masked (and the mask of it).
CLIENT_DP, SECAGG, SECAGG_INPUT = "client_dp", "secagg", "secagg_input"
#: What client-level DP noised with only its share of the noise (secure aggregation): it may leave only masked.
CLIENT_DP_SHARED = "client_dp_shared"
_lock = threading.Lock()


def fingerprint(value) -> str:
    """A hash of an array's values, dtype and shape (numpy or torch), to recognise it byte for byte."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.ascontiguousarray(value)
    return hashlib.sha256(str(arr.dtype).encode() + str(arr.shape).encode() + arr.tobytes()).hexdigest()


def record_release(task_id: str | None, data: dict, kind: str = CLIENT_DP) -> None:
    """Called by the filter that just released ``data`` for ``task_id``: the client-level DP filter (what it
    noised), the secure-aggregation mask (``SECAGG``: what it sent; ``SECAGG_INPUT``: what it masked)."""
    if task_id:
        with _lock:
            _released.setdefault(task_id, {})[kind] = {k: fingerprint(v) for k, v in data.items()}


_refused_jobs: set[str] = set()


def mark_refused(job_id: str | None) -> None:
    """The site's final check refused a result of this job: the site loop trains no more for it."""
    if job_id:
        with _lock:
            _refused_jobs.add(job_id)


def job_refused(job_id: str | None) -> bool:
    with _lock:
        return bool(job_id) and job_id in _refused_jobs


def take_release(task_id: str | None) -> dict[str, dict[str, str]] | None:
    """What was released for ``task_id``, by kind (and forget it); None if nothing was."""
    with _lock:
        return _released.pop(task_id, None) if task_id else None
