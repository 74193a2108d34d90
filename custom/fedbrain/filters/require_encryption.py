"""A site's "encryption required" policy: model updates leave only through the job's HE encryptor.

Placed in a site's privacy scope (``encrypted`` in privacy.json), it runs before the job's own
result filters, on plaintext, so it cannot look at the ciphertext; instead it looks at the
job's filter chain for this task: if no HE encryptor follows, the job is stopped at this
site: the result is emptied into an error reply carrying the reason (not FLARE's UNSAFE_JOB, which
would end every site's job), the site's final check (:mod:`fedbrain.filters.final_check`) sends it
and the site trains no more for that job; the other sites go on while the round's ``min_responses`` holds.
Metrics-only results (validation) pass.
"""

from __future__ import annotations

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedbrain.filters.final_check import refuse

#: Result kinds that carry model values (what must be encrypted).
MODEL_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)


def job_encrypts(fl_ctx: FLContext, task_name: str) -> bool:
    """Whether the running job's own result filters for ``task_name`` include an HE encryptor."""
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor

    runner = fl_ctx.get_prop(FLContextKey.RUNNER)
    table = getattr(runner, "task_result_filters", None) or {}
    chain = table.get(f"{task_name}{FilterKey.DELIMITER}{FilterKey.OUT}") or []
    return any(isinstance(f, HEModelEncryptor) for f in chain)


class RequireEncryption(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - an error reply carries no model
            return shareable
        if dxo.data_kind not in MODEL_KINDS or not dxo.data:
            return shareable
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME) or "?"
        if job_encrypts(fl_ctx, task):
            return shareable
        site = fl_ctx.get_identity_name()
        reason = (f"site {site} requires encrypted model updates (privacy scope with RequireEncryption) but job "
                  f"{fl_ctx.get_job_id()} would send its '{task}' result in plaintext: refused, nothing was sent; "
                  f"this site will not train for this job again. Submit the job with encryption (fedbrain job export-* --he).")
        self.log_error(fl_ctx, reason)
        refuse(shareable, reason)  # the job's filters pass an error reply untouched; the final check sends it
        return shareable
