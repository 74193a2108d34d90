"""Server-side record of exactly what each site sent: parameter names, shapes, dtypes.

An auditor (or a test) can then prove from the job result alone that a personal head, or anything
shaped like an input image, never reached the server, and how large (L2 norm) each plaintext update was. Arrays riding in the update's meta (SCAFFOLD's
control differences) are recorded the same way under ``meta_arrays``. It records and passes the
update unchanged. A result a site's final check refused (:mod:`fedbrain.filters.final_check`)
arrives as an error reply: its reason is recorded (``refused``) and logged on the server.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedbrain.contracts import (AUDIT_FILE, DP_WITHHELD, DP_WITHHELD_REASONS, REFUSED_HEADER, SECAGG_MASKED,
                                SITE_METRICS_LOG_TAG, SITE_NOTES_META)


def _wire_bytes(value) -> int:
    """Bytes this value takes in transit: a CKKS vector's serialized size, an array's buffer."""
    if hasattr(value, "serialize") and type(value).__name__ == "CKKSVector":
        return len(value.serialize())
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    return int(getattr(value, "nbytes", 0))


def _plain_l2_norm(data: dict) -> float | None:
    """L2 norm of a plaintext update over all its arrays, as the sites' clip measures it (proves
    clipping on the wire); None if encrypted."""
    from fedbrain.updates import update_norm

    if any(type(v).__name__ == "CKKSVector" or isinstance(v, (bytes, bytearray)) for v in data.values()):
        return None
    return update_norm(data)


class ReceivedUpdateAudit(Filter):
    def __init__(self, file_name: str = AUDIT_FILE):
        """When no site may release updates any more (each withholds for privacy: budget spent, DP
        required), the job ends with that reason instead of running on with empty updates. While
        one may, it goes on: a withholding site still answers (with zero weight), so the round's
        ``min_responses`` (fedbrain.fl.resilient) counts it."""
        super().__init__()
        self.file_name = file_name
        self._withheld: dict[str, str] = {}  # site -> why; a site that withholds once does for the whole job
        self._told: set[tuple[str, str]] = set()  # (site, note) already in the server's log

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        refused = shareable.get_header(REFUSED_HEADER)
        if refused:  # a site's final check kept its result home: the reason goes to the job's record
            entry = {"site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?"),
                     "round": shareable.get_header("current_round"), "refused": str(refused)}
            self.log_error(fl_ctx, f"{entry['site']} sent no update: {refused}")
            self._append(entry, fl_ctx)
            return shareable
        try:
            dxo = from_shareable(shareable)
        except Exception:  # not a DXO (e.g. an error reply): nothing to record
            return shareable
        data = dxo.data or {}

        def shapes(d: dict) -> dict:
            return {k: {"shape": list(getattr(v, "shape", ())), "dtype": str(getattr(v, "dtype", type(v).__name__)),
                        "bytes": _wire_bytes(v)}
                    for k, v in d.items()}

        meta = dxo.meta or {}
        entry = {
            "site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?"),
            "round": shareable.get_header("current_round"),
            "data_kind": dxo.data_kind,
            "params": shapes(data) if isinstance(data, dict) else {},
            "bytes": 0,
            "metrics": sorted(meta.get("initial_metrics", {}) or {}),
            "timings": {k: v for k, v in meta.items() if k.endswith("_seconds") and isinstance(v, (int, float))},
            "meta_arrays": {k: shapes(v) for k, v in meta.items()
                            if isinstance(v, dict) and v and all(hasattr(x, "shape") for x in v.values())},
        }
        notes = meta.get(SITE_NOTES_META)
        if isinstance(notes, (list, tuple)) and notes:
            entry["notes"] = [str(n)[:500] for n in notes][:10]
            for note in entry["notes"]:  # once per site and job in the server's log (fedbrain watch, the admin)
                if (entry["site"], note) not in self._told:
                    self._told.add((entry["site"], note))
                    self.log_warning(fl_ctx, f"{entry['site']}: {note}")
        entry["bytes"] = sum(p["bytes"] for p in entry["params"].values())
        masked = isinstance(data, dict) and set(data) == {SECAGG_MASKED}  # a norm of masked values means nothing
        entry["l2_norm"] = _plain_l2_norm(data) if isinstance(data, dict) and not masked else None
        values = {k: float(v) for k, v in (meta.get("initial_metrics") or {}).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values.get(DP_WITHHELD):
            self._end_if_too_few_can_release(entry["site"], int(values[DP_WITHHELD]), fl_ctx)
        # Metrics the server already holds, as one log line: what `fedbrain watch` shows per site.
        self.log_info(fl_ctx, f"{SITE_METRICS_LOG_TAG} " + json.dumps(
            {"site": entry["site"], "round": entry["round"], "metrics": values}, sort_keys=True))
        self._append(entry, fl_ctx)
        return shareable

    def _append(self, entry: dict, fl_ctx: FLContext) -> None:
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_prop(FLContextKey.CURRENT_RUN))
        with open(Path(run_dir) / self.file_name, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _end_if_too_few_can_release(self, site: str, code: int, fl_ctx: FLContext) -> None:
        self._withheld[site] = DP_WITHHELD_REASONS.get(code, "withheld")
        sites = len(fl_ctx.get_engine().get_clients() or []) or len(self._withheld)
        if len(self._withheld) >= sites:
            why = "; ".join(f"{s}: {r}" for s, r in sorted(self._withheld.items()))
            self.system_panic(f"no site may release updates any more ({why}): the job ends here", fl_ctx)
