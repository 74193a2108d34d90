"""The site's last word on what leaves it: the scope's promise checked on the final payload.

FLARE runs a site's privacy-scope filters *before* the job's own result filters, so a scope filter
cannot see what the job's filters do after it: a decryptor placed after the encryptor, an encryptor
told to encrypt only some layers, SCAFFOLD's control difference riding in meta past the DP noise.
:class:`FinalPayloadCheck` is declared in the site's own ``local/privacy.json`` (``components``),
which FLARE adds to every job process after the job's components; it sees each task result after
every filter (FLARE's ``AFTER_TASK_RESULT_FILTER`` event) and again just before it is sent, and
checks the promise of the job's scope on exactly what would leave:

- every scope (``standard``): no personal parameter (the site's ``personal_parts`` pattern) in
  the data, the meta or the headers; the weight the update carries (``NUM_STEPS_CURRENT_ROUND``) is
  the step count the site loop reported, unchanged by any filter;
- ``client_dp``: every model array is exactly one the site's client-level DP filter released for
  this task (noised), and no other array travels (meta, headers);
- ``require_encryption``: every model value is a CKKS ciphertext, and no plaintext array travels.

The site's ``default_scope`` is also a floor: FLARE lets a job pick any scope the site defines, so a
site that made ``encrypted`` its default but still defines ``standard`` would release plaintext to a
job naming ``standard``. A job whose scope lacks a promise of the site's default is refused at job
start (the site loop never trains for it) and at every result.

A result that breaks the promise never leaves: its content is removed and the server receives an
error reply (``TASK_RESULT_FILTER_ERROR``, not FLARE's ``UNSAFE_JOB``, which would end every site's
job) whose ``fedbrain_refused`` header carries the one-line reason, recorded by the server's audit
(``received_updates.jsonl``). The site then trains no more for that job: it answers each later round
with an empty update, refused the same way. (It does not leave the job: FLARE would then end the whole
job once fewer than its ``min_clients`` sites are alive.)
"""

from __future__ import annotations

import re

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from fedbrain.contracts import NUM_STEPS_META, REFUSED_HEADER, SECAGG_LAYOUT_META, SECAGG_MASKED
from fedbrain.privacy.releases import (CLIENT_DP, CLIENT_DP_SHARED, SECAGG, SECAGG_INPUT, fingerprint, mark_refused,
                                       take_release)

#: The scope parts (fedbrain.ops.builder.SCOPE_PARTS) whose promise this check proves beyond `standard`'s.
PROMISES = ("client_dp", "require_encryption", "require_secagg")
MODEL_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)
#: A plain sequence of more numbers than this is treated as an array (it could carry an update).
MAX_PLAIN_NUMBERS = 64
#: Shareable keys FLARE itself uses for routing; everything else is content.
ROUTING_KEYS = (ReservedHeaderKey.HEADERS, ReservedHeaderKey.COOKIE_JAR, ReservedHeaderKey.PEER_PROPS)

def _is_ciphertext(value) -> bool:
    return type(value).__name__ in ("CKKSVector", "BFVVector", "CKKSTensor")


def _is_array(value) -> bool:
    """Numbers in bulk: a numpy array or torch tensor of more than one value, or a long plain sequence."""
    if isinstance(value, np.ndarray) or hasattr(value, "detach"):
        return int(np.prod(getattr(value, "shape", ()) or (1,))) > 1
    if isinstance(value, (list, tuple)) and len(value) > MAX_PLAIN_NUMBERS:
        return all(isinstance(v, (int, float, np.number)) for v in value)
    return isinstance(value, (bytes, bytearray)) and len(value) > 4096


def _leaves(node, path: str):
    """(path, value) of every leaf under ``node``; dict keys become path parts."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)) and not _is_array(node):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, node


def payload_problems(result: Shareable, parts, personal_parts: str, *, steps_sent=None,
                     released: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Why ``result`` breaks the promise of a scope made of ``parts`` (empty: it keeps it).

    ``steps_sent``: the NUM_STEPS the site loop put on the result (None: not a training result);
    ``released``: what fedbrain's filters released for this task, by kind (name -> fingerprint): the values
    client-level DP noised, the vector secure aggregation sent and the values it masked."""
    released = released or {}
    parts, personal = set(parts), re.compile(personal_parts)
    problems: list[str] = []
    try:
        dxo = from_shareable(result)
    except Exception:  # noqa: BLE001 - no DXO: only routing may remain
        dxo = None
    content = {k: v for k, v in result.items() if k not in ROUTING_KEYS}
    headers = result.get(ReservedHeaderKey.HEADERS) or {}
    model = dxo is not None and dxo.data_kind in MODEL_KINDS and isinstance(dxo.data, dict)
    data = dxo.data if model else {}
    if dxo is not None:  # the DXO is checked by its parts below; everything else as "other"
        content = {k: v for k, v in content.items() if k != "DXO"}  # nvflare.apis.dxo stores it there
        others = list(_leaves(dxo.meta or {}, "meta")) + list(_leaves(content, "shareable"))
        if not model:
            others += list(_leaves(dxo.data, "data"))
    else:
        others = list(_leaves(content, "shareable"))
    others += list(_leaves(headers, "header"))

    named = [p for p, _ in others] + [f"data.{k}" for k in data]
    leaked = [p for p in named if personal.search(p.split(".", 1)[1] if "." in p else p)]
    if leaked:
        problems.append(f"personal parameters would leave ({', '.join(leaked[:3])})")
    if model and steps_sent is not None:
        final_steps = (dxo.meta or {}).get(NUM_STEPS_META)
        if final_steps != steps_sent:
            problems.append(f"the update's weight {NUM_STEPS_META} is {final_steps}, "
                            f"not the {steps_sent} steps this site trained")
    if parts & set(PROMISES):
        loose = [p for p, v in others if _is_array(v) and not _is_ciphertext(v)]
        if loose:
            problems.append(f"plaintext arrays would travel outside the model values ({', '.join(loose[:3])})")
    if "require_encryption" in parts and model:
        plain = [k for k, v in data.items() if not _is_ciphertext(v)]
        if plain:
            problems.append(f"{len(plain)} of {len(data)} model values would leave unencrypted "
                            f"(e.g. {', '.join(plain[:3])})")
    masked = model and set(data) == {SECAGG_MASKED}
    if masked and fingerprint(data[SECAGG_MASKED]) != released.get(SECAGG, {}).get(SECAGG_MASKED):
        problems.append("the masked update is not the one fedbrain's secure aggregation made for this result")
    if "require_secagg" in parts and model:
        if not masked:
            problems.append(f"{len(data)} model values would leave unmasked (e.g. {', '.join(list(data)[:3])})")
        else:
            layout = (dxo.meta or {}).get(SECAGG_LAYOUT_META) or []
            size = sum(int(np.prod(shape)) if shape else 1 for _, shape in layout)
            if size != int(np.size(data[SECAGG_MASKED])) or np.asarray(data[SECAGG_MASKED]).dtype != np.uint32:
                problems.append("the masked update is not one 32-bit vector of the layout's size")
    if CLIENT_DP_SHARED in released and model and not masked:
        problems.append("client-level DP added only this site's share of the noise (secure aggregation), and the "
                        "update would leave unmasked")
    if "client_dp" in parts and model:
        noised = released.get(CLIENT_DP, released.get(CLIENT_DP_SHARED))
        # what would leave: the values the mask took (masked), else the plaintext arrays (ciphertext: by name only)
        values = released.get(SECAGG_INPUT, {}) if masked else {k: fingerprint(v) for k, v in data.items()
                                                                 if not _is_ciphertext(v)}
        if noised is None:
            problems.append("the site's client-level DP filter released nothing for this result")
        else:
            names = set(values) | set(noised) if masked else set(data)  # masked: exactly what DP noised, all of it
            unknown = [k for k in sorted(names) if k not in noised or (k in values and values[k] != noised[k])
                       or (masked and k not in values)]
            if unknown:
                problems.append(f"{len(unknown)} model values are not the ones client-level DP noised "
                                f"(e.g. {', '.join(unknown[:3])})")
    return problems


def site_default_scope() -> str:
    """The name of the ``default_scope`` FLARE read from this site's privacy.json ("" when unknown)."""
    from nvflare.private.fed.utils.fed_utils import get_scope_info

    name = get_scope_info()[1]
    return "" if name == "processing_error" else name


def weaker_than_default(scope: str, default: str, scope_parts: dict) -> str:
    """Why a job under ``scope`` may not run at a site whose default is ``default`` ("" if it may)."""
    if not default or default not in scope_parts or scope not in scope_parts:
        return ""
    missing = sorted(set(scope_parts[default]) - set(scope_parts[scope]))
    if not missing:
        return ""
    return (f"the job names privacy scope '{scope}', weaker than this site's default '{default}' "
            f"(it lacks {', '.join(missing)})")


def refuse(result: Shareable, reason: str) -> None:
    """Empty ``result`` in place (so nothing of it can leave), keeping only FLARE's routing, as an
    error reply whose ``fedbrain_refused`` header says why. It holds an empty metrics DXO: FLARE's
    server widgets read every reply as one, and log a traceback for a reply without."""
    for key in [k for k in result if k not in ROUTING_KEYS]:
        del result[key]
    headers = result.get(ReservedHeaderKey.HEADERS) or {}
    keep = {k: headers[k] for k in (ReservedHeaderKey.TASK_NAME, ReservedHeaderKey.TASK_ID, ReservedHeaderKey.WORKFLOW,
                                    ReservedHeaderKey.AUDIT_EVENT_ID, ReservedHeaderKey.MSG_ROOT_ID,
                                    ReservedHeaderKey.MSG_ROOT_TTL, "current_round") if k in headers}
    result[ReservedHeaderKey.HEADERS] = keep
    DXO(DataKind.METRICS, data={}).update_shareable(result)
    result.set_return_code(ReturnCode.TASK_RESULT_FILTER_ERROR)
    result.set_header(REFUSED_HEADER, reason)


class FinalPayloadCheck(FLComponent):
    def __init__(self, scope_parts: dict[str, list[str]], personal_parts: str):
        """``scope_parts``: each scope this site defines -> its parts (``client_dp``,
        ``require_encryption``); a job under a scope not listed is refused. ``personal_parts``: a
        regex on parameter names that must never leave (the classifier's personal head)."""
        super().__init__()
        unknown = {p for parts in scope_parts.values() for p in parts} - set(PROMISES)
        if unknown:
            raise ValueError(f"unknown scope parts {sorted(unknown)}; known: {sorted(PROMISES)}")
        self.scope_parts = {k: tuple(v) for k, v in scope_parts.items()}
        self.personal_parts = str(personal_parts)
        re.compile(self.personal_parts)
        self._steps_sent = None
        self._checked: Shareable | None = None
        self._released_now: dict[str, str] | None = None
        self._start_problem = ""  # set at job start when local/'s policies changed since the site started

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._start_problem = self._local_since_start(fl_ctx) or self._weaker_scope(fl_ctx)
        elif event_type == EventType.BEFORE_TASK_RESULT_FILTER:
            sent = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
            self._steps_sent, self._checked = self._steps_of(sent), None
        elif event_type == EventType.AFTER_TASK_RESULT_FILTER:
            self._checked = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
            self._released_now = take_release(fl_ctx.get_prop(FLContextKey.TASK_ID))  # kept for the re-check
            self._check(self._checked, fl_ctx)
        elif event_type == EventType.BEFORE_SEND_TASK_RESULT and self._checked is not None:
            self._check(self._checked, fl_ctx)  # changed since? (the same object is sent)

    def _local_since_start(self, fl_ctx: FLContext) -> str:
        """One line when local/'s policy files changed since the site started (FLARE still applies what it read
        then): this job is refused at this site. Other local/ changes (the site's data settings, read per job)
        are noted."""
        from fedbrain.ops.kit import local_changes_since_start

        kit = fl_ctx.get_prop(FLContextKey.WORKSPACE_ROOT)
        try:
            changes = local_changes_since_start(kit) if kit else None
        except (OSError, ValueError) as e:
            return f"cannot compare local/ with its state at site start ({e})"
        if not changes:
            return ""
        policies, others = changes
        if others:
            self.log_info(fl_ctx, f"local/ changed since this site started: {', '.join(others)} (read per job: applies)")
        if not policies:
            return ""
        return self._refuse_job(fl_ctx, f"{', '.join(policies)} changed since the site started, and FLARE still "
                                        f"applies what it read then; restart the site to apply the edit. This site will "
                                        f"not train for this job.")

    def _weaker_scope(self, fl_ctx: FLContext) -> str:
        """One line when the job's scope promises less than the site's default scope: refused at this site."""
        weaker = weaker_than_default(fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME) or "",
                                     site_default_scope(), self.scope_parts)
        if not weaker:
            return ""
        return self._refuse_job(fl_ctx, f"{weaker}. Nothing will be sent; this site will not train for this job.")

    def _refuse_job(self, fl_ctx: FLContext, why: str) -> str:
        """Refuse the whole job at this site at its start: one log line, and the site loop never trains for it."""
        reason = f"site {fl_ctx.get_identity_name()} refused job {fl_ctx.get_job_id()}: {why}"
        self.log_error(fl_ctx, reason)
        mark_refused(fl_ctx.get_job_id())
        return reason

    @staticmethod
    def _steps_of(result) -> object:
        try:
            dxo = from_shareable(result)
        except Exception:  # noqa: BLE001
            return None
        return (dxo.meta or {}).get(NUM_STEPS_META) if dxo.data_kind in MODEL_KINDS else None

    def _check(self, result, fl_ctx: FLContext) -> None:
        if not isinstance(result, Shareable):
            return
        if result.get_header(REFUSED_HEADER):  # refused earlier (a scope filter): no more training for this job
            mark_refused(fl_ctx.get_job_id())
            return
        if self._start_problem:
            refuse(result, self._start_problem)
            return
        scope = fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME) or ""
        site, job, task = fl_ctx.get_identity_name(), fl_ctx.get_job_id(), fl_ctx.get_prop(FLContextKey.TASK_NAME)
        weaker = weaker_than_default(scope, site_default_scope(), self.scope_parts)
        if scope not in self.scope_parts:
            problems = [f"its privacy scope '{scope}' is not one this site's final check knows"]
        elif weaker:
            problems = [weaker]
        else:
            problems = payload_problems(result, self.scope_parts[scope], self.personal_parts,
                                        steps_sent=self._steps_sent, released=self._released_now)
        if not problems:
            return
        reason = (f"site {site} refused job {job}: its '{task}' result under privacy scope '{scope}' breaks the "
                  f"scope's promise after the job's filters: {'; '.join(problems)}. Nothing was sent; this site "
                  f"will not train for this job again.")
        refuse(result, reason)
        mark_refused(job)
        self.log_error(fl_ctx, reason)
