"""The site's FLARE components of secure aggregation: an executor for the setup and unmasking tasks, and the
result filter that masks the update, the last thing that touches it before the site's final check.

Both live in the site's job process and share that job's :class:`~fedbrain.secagg.protocol.SiteSecAgg` (its key
pairs, the shares it holds) through this module, keyed by job id; nothing of it is written to disk.
"""

from __future__ import annotations

import json

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedbrain.contracts import (NUM_STEPS_META, REFUSED_HEADER, SECAGG_LAYOUT_META, SECAGG_MASKED,
                                SECAGG_MESSAGE_META, SECAGG_WEIGHT_META)
from fedbrain.privacy.releases import SECAGG, SECAGG_INPUT, mark_refused, record_release
from fedbrain.secagg.masking import encode, flatten
from fedbrain.secagg.protocol import Identity, SecAggError, SiteSecAgg

_JOBS: dict[str, SiteSecAgg] = {}


def noise_share(job_id: str | None) -> int:
    """Among how many sites client-level DP may split its noise in this job: the threshold t of a completed
    secure-aggregation setup at this site (the server unmasks only sums of at least t), else 1."""
    state = _JOBS.get(job_id) if job_id else None
    return int(state.threshold) if state is not None and state.members else 1


def message(shareable: Shareable) -> dict:
    """The JSON message a secure-aggregation task or reply carries."""
    return json.loads(from_shareable(shareable).meta[SECAGG_MESSAGE_META])


def reply(payload: dict) -> Shareable:
    return DXO(DataKind.METRICS, data={}, meta={SECAGG_MESSAGE_META: json.dumps(payload)}).to_shareable()


class SecAggSiteExecutor(Executor):
    """Answers the server's secure-aggregation tasks (advertise, share, deliver, unmask) for this site.
    A refusal is an answer with one line (``error``) naming the site and why; the server logs it and the round
    or job fails with it when too few sites remain."""

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site, job = fl_ctx.get_identity_name(), fl_ctx.get_job_id()
        try:
            msg = message(shareable)
            if task_name == "secagg_advertise":
                kit = fl_ctx.get_prop(FLContextKey.WORKSPACE_ROOT)
                _JOBS[job] = SiteSecAgg(Identity.from_kit(kit, site), job, msg["rounds"])
                return reply({"advertisement": _JOBS[job].advertise()})
            state = _JOBS.get(job)
            if state is None:
                raise SecAggError("this site has no keys for the job (it did not take part in the setup)")
            if task_name == "secagg_share":
                return reply({"shares": state.share(msg["advertisements"], int(msg["threshold"]))})
            if task_name == "secagg_deliver":
                state.receive(msg["shares"].get(site, {}), msg["members"])
                self.log_info(fl_ctx, f"secure aggregation: masking group {state.members}, threshold {state.threshold}")
                return reply({"ok": True})
            if task_name == "secagg_unmask":
                return reply({"shares": state.unmask_shares(int(msg["round"]), msg["senders"], msg["non_senders"])})
            raise SecAggError(f"unknown task {task_name}")
        except (SecAggError, OSError, ValueError, KeyError, TypeError) as e:
            reason = f"site {site}: secure aggregation refused in job {job} ({task_name}): {e}"
            self.log_error(fl_ctx, reason)
            return reply({"error": reason})


class SecAggMask(Filter):
    """The last result filter of a ``train`` result: the (privacy-filtered) weight difference becomes one
    masked ring vector of the same number of values. Without a completed setup nothing leaves: the result
    is refused with the reason."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        from fedbrain.filters.final_check import refuse

        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK or shareable.get_header(REFUSED_HEADER):
            return shareable
        site, job = fl_ctx.get_identity_name(), fl_ctx.get_job_id()
        state = _JOBS.get(job)
        try:
            dxo = from_shareable(shareable)
            if state is None or not state.members:
                raise SecAggError("the job's secure-aggregation setup did not complete at this site")
            if dxo.data_kind != DataKind.WEIGHT_DIFF:
                raise SecAggError(f"a {dxo.data_kind} result, not a weight difference, cannot be masked")
            round_no = int(shareable.get_header(AppConstants.CURRENT_ROUND))
            arrays = {k: _numpy(v) for k, v in (dxo.data or {}).items()}
            vector, layout = flatten(arrays)
            steps = (dxo.meta or {}).get(NUM_STEPS_META) or 0
            ring, weight, clipped = encode(vector, steps, len(state.members))
            masked = state.mask(ring, round_no)
        except (SecAggError, ValueError, TypeError) as e:
            reason = (f"site {site} refused job {job}: its update cannot be masked ({e}); nothing was sent, and this "
                      f"site will not train for this job again")
            refuse(shareable, reason)
            mark_refused(job)
            self.log_error(fl_ctx, reason)
            return shareable
        if clipped:
            self.log_warning(fl_ctx, f"secure aggregation: {clipped} values of the update were beyond the clip and cut")
        meta = {k: v for k, v in (dxo.meta or {}).items()}
        meta.update({SECAGG_LAYOUT_META: layout, SECAGG_WEIGHT_META: weight})
        out = DXO(DataKind.WEIGHT_DIFF, data={SECAGG_MASKED: masked}, meta=meta)
        task_id = fl_ctx.get_prop(FLContextKey.TASK_ID)  # what the final check lets through, and what it masked
        record_release(task_id, arrays, kind=SECAGG_INPUT)
        record_release(task_id, out.data, kind=SECAGG)
        return out.update_shareable(shareable)


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
