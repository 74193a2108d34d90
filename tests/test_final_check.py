"""The site's final check of what leaves it (fedbrain.filters.final_check), on real FLARE Shareables,
real CKKS ciphertexts and the real client-level DP filter. The same checks against real POC sites and
hostile jobs are in test_poc_hostile.py."""

import json

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AlgorithmConstants

from fedbrain.contracts import NUM_STEPS_META, REFUSED_HEADER
from fedbrain.filters.final_check import FinalPayloadCheck, payload_problems, refuse
from fedbrain.ops.builder import PERSONAL_PARTS, SCOPE_PARTS, privacy_policy
from fedbrain.privacy.client_dp import ClientLevelDP
from fedbrain.privacy.releases import job_refused, take_release

STANDARD, DP, ENCRYPTED = SCOPE_PARTS["standard"], SCOPE_PARTS["dp"], SCOPE_PARTS["encrypted"]


def update(meta=None, **arrays):
    data = arrays or {"enc.weight": np.ones((4, 3), np.float32), "enc.bias": np.zeros(4, np.float32)}
    return DXO(DataKind.WEIGHT_DIFF, data=data, meta={NUM_STEPS_META: 5, **(meta or {})}).to_shareable()


@pytest.fixture(scope="module")
def ckks():
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40])
    ctx.global_scale = 2 ** 40
    return lambda values: ts.ckks_vector(ctx, np.ravel(values).tolist())


def test_a_plain_update_keeps_the_standard_promise():
    assert payload_problems(update(), STANDARD, PERSONAL_PARTS, steps_sent=5) == []


def test_a_personal_head_in_data_or_in_scaffold_meta_is_refused_under_every_scope():
    head = update(**{"enc.weight": np.ones(3), "head.weight": np.ones(3)})
    assert "personal parameters" in " ".join(payload_problems(head, STANDARD, PERSONAL_PARTS))
    ctrl = {AlgorithmConstants.SCAFFOLD_CTRL_DIFF: {"enc.weight": np.ones(3), "head.bias": np.ones(3)}}
    assert "head.bias" in " ".join(payload_problems(update(meta=ctrl), STANDARD, PERSONAL_PARTS))
    shared_only = {AlgorithmConstants.SCAFFOLD_CTRL_DIFF: {"enc.weight": np.ones(3)}}
    assert payload_problems(update(meta=shared_only), STANDARD, PERSONAL_PARTS) == []
    in_header = update()
    in_header.set_header("copy", {"head.weight": np.ones(3)})  # a personal tensor smuggled in a header
    assert "header.copy.head.weight" in " ".join(payload_problems(in_header, STANDARD, PERSONAL_PARTS))


def test_a_weight_changed_after_the_site_loop_is_refused():
    inflated = update(meta={NUM_STEPS_META: 5000})
    problems = payload_problems(inflated, STANDARD, PERSONAL_PARTS, steps_sent=5)
    assert len(problems) == 1 and "5000" in problems[0] and "not the 5 steps" in problems[0]


def test_encrypted_scope_needs_every_model_value_as_ciphertext_and_no_plain_array_anywhere(ckks):
    whole = update(**{"a": ckks([1.0, 2.0]), "b": ckks([3.0])})
    assert payload_problems(whole, ENCRYPTED, PERSONAL_PARTS) == []
    subset = update(**{"a": ckks([1.0, 2.0]), "b": np.arange(6.0)})  # encrypt_layers on a subset
    assert "1 of 2 model values would leave unencrypted (e.g. b)" in payload_problems(subset, ENCRYPTED, PERSONAL_PARTS)
    decrypted = update(**{"a": np.arange(2.0), "b": np.arange(3.0)})  # a decryptor after the encryptor
    assert "2 of 2" in " ".join(payload_problems(decrypted, ENCRYPTED, PERSONAL_PARTS))
    side = update(meta={"extra": np.arange(100.0)}, a=ckks([1.0]))
    assert "meta.extra" in " ".join(payload_problems(side, ENCRYPTED, PERSONAL_PARTS))
    listed = update(meta={"extra": list(range(1000))}, a=ckks([1.0]))  # numbers in bulk as a plain list
    assert payload_problems(listed, ENCRYPTED, PERSONAL_PARTS)
    assert payload_problems(listed, STANDARD, PERSONAL_PARTS) == []


def _dp_release(shareable, task_id="t1"):
    ctx = FLContext()
    ctx.set_prop(FLContextKey.TASK_ID, task_id, private=True, sticky=False)
    out = ClientLevelDP(clip_norm=1.0, noise_multiplier=1.0).process(shareable, ctx)
    return out, take_release(task_id)


def test_dp_scope_accepts_exactly_what_client_level_dp_released():
    noised, released = _dp_release(update())
    assert released and payload_problems(noised, DP, PERSONAL_PARTS, steps_sent=5, released=released) == []
    # a job filter after the site's DP that rewrites one array
    dxo = from_shareable(noised)
    dxo.data["enc.bias"] = dxo.data["enc.bias"] + 1
    rewritten = dxo.update_shareable(noised)
    assert "enc.bias" in " ".join(payload_problems(rewritten, DP, PERSONAL_PARTS, released=released))
    # nothing released: the DP filter never saw this result
    assert "released nothing" in " ".join(payload_problems(update(), DP, PERSONAL_PARTS, released=None))


def test_dp_scope_refuses_scaffold_controls_riding_past_the_noise():
    ctrl = {AlgorithmConstants.SCAFFOLD_CTRL_DIFF: {"enc.weight": np.ones((4, 3), np.float32)}}
    noised, released = _dp_release(update(meta=ctrl), task_id="t2")
    problems = payload_problems(noised, DP, PERSONAL_PARTS, released=released)
    assert problems == [f"plaintext arrays would travel outside the model values "
                        f"(meta.{AlgorithmConstants.SCAFFOLD_CTRL_DIFF}.enc.weight)"]


def test_metrics_results_pass_and_arrays_in_headers_do_not():
    metrics = DXO(DataKind.METRICS, data={"val_dice": 0.8}).to_shareable()
    assert payload_problems(metrics, ENCRYPTED, PERSONAL_PARTS) == []
    metrics.set_header("smuggled", np.arange(50.0))
    assert "header.smuggled" in " ".join(payload_problems(metrics, DP, PERSONAL_PARTS))


def test_a_refused_result_carries_nothing_but_routing_and_the_reason():
    result = update(meta={"extra": np.arange(100.0)})
    result.set_header("current_round", 2)
    refuse(result, "site x refused job y: because")
    assert set(result) == {"__headers__", "DXO"} and result.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert result.get_header(REFUSED_HEADER) == "site x refused job y: because" and result.get_header("current_round") == 2
    empty = from_shareable(result)  # an empty metrics DXO: FLARE's server widgets read every reply as one
    assert empty.data_kind == DataKind.METRICS and empty.data == {} and not empty.meta


def _event(check, event, ctx, result=None):
    if result is not None:
        ctx.set_prop(FLContextKey.TASK_RESULT, result, private=True, sticky=False)
    check.handle_event(event, ctx)


def _site_ctx(scope, job="job-1"):
    ctx = FLContext()
    ctx.set_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME, scope, private=True, sticky=False)
    ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
    ctx.set_prop(FLContextKey.TASK_ID, "task-1", private=True, sticky=False)
    ctx.set_prop(FLContextKey.CURRENT_RUN, job, private=False, sticky=False)
    return ctx


def site_check() -> FinalPayloadCheck:
    """The component exactly as a site's privacy.json declares it."""
    spec = privacy_policy("standard")["components"][0]
    return FinalPayloadCheck(**spec["args"])


def test_the_component_checks_after_the_jobs_filters_and_again_before_sending():
    check, ctx = site_check(), _site_ctx("standard")
    sent = update()
    _event(check, EventType.BEFORE_TASK_RESULT_FILTER, ctx, sent)  # the site loop's result: 5 steps
    final = update()
    _event(check, EventType.AFTER_TASK_RESULT_FILTER, ctx, final)
    assert final.get_return_code() == ReturnCode.OK and not job_refused("job-1")
    # something changes the same object between the check and the send
    dxo = from_shareable(final)
    dxo.data["head.weight"] = np.ones(3)
    dxo.update_shareable(final)
    _event(check, EventType.BEFORE_SEND_TASK_RESULT, ctx)
    assert final.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "personal parameters would leave (data.head.weight)" in final.get_header(REFUSED_HEADER)


def test_a_scope_the_check_does_not_know_is_refused():
    check, ctx = site_check(), _site_ctx("made_up_scope", job="job-2")
    result = update()
    _event(check, EventType.BEFORE_TASK_RESULT_FILTER, ctx, update())
    _event(check, EventType.AFTER_TASK_RESULT_FILTER, ctx, result)
    assert "privacy scope 'made_up_scope' is not one this site's final check knows" in result.get_header(REFUSED_HEADER)


def test_every_offered_scope_has_its_promise_in_the_sites_policy():
    for default in SCOPE_PARTS:
        policy = privacy_policy(default)
        parts = policy["components"][0]["args"]["scope_parts"]
        assert parts == {s["name"]: list(SCOPE_PARTS[s["name"]]) for s in policy["scopes"]}
    with pytest.raises(ValueError, match="unknown scope parts"):
        FinalPayloadCheck(scope_parts={"x": ["nonsense"]}, personal_parts=PERSONAL_PARTS)


def test_a_site_requiring_encryption_refuses_a_plaintext_result_softly_and_then_leaves():
    """RequireEncryption (the `encrypted` scope's filter, before the job's own) empties a plaintext result into
    an error reply with its reason; the job's later filters pass it untouched; the final check sends it and
    marks the site to leave the job (no UNSAFE_JOB, which would end every site's job)."""
    from nvflare.app_common.filters.exclude_vars import ExcludeVars

    from fedbrain.filters.require_encryption import RequireEncryption

    ctx = _site_ctx("encrypted", job="job-3")
    result = RequireEncryption().process(update(), ctx)
    result = ExcludeVars(exclude_vars="enc").process(result, ctx)  # a job filter after the scope's
    assert result.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR and from_shareable(result).data == {}
    assert "requires encrypted model updates" in result.get_header(REFUSED_HEADER)
    check = site_check()
    _event(check, EventType.BEFORE_TASK_RESULT_FILTER, ctx, update())
    _event(check, EventType.AFTER_TASK_RESULT_FILTER, ctx, result)
    assert job_refused("job-3")  # the site loop trains no more for this job


def test_a_site_policy_edited_since_the_site_started_refuses_the_job_until_a_restart(tmp_path):
    """FLARE reads privacy.json, authorization.json and resources.json when a site starts: an edit after that is
    not in force. A job starting then is refused at that site with one line; other local/ edits are noted only."""
    from fedbrain.ops.kit import local_changes_since_start, record_start_state

    kit = tmp_path / "hospital-a"
    (kit / "local").mkdir(parents=True)
    (kit / "local" / "privacy.json").write_text(json.dumps(privacy_policy("encrypted")))
    (kit / "local" / "fedbrain_site.json").write_text("{}")
    assert local_changes_since_start(kit) is None  # no start recorded: nothing to compare
    record_start_state(kit)
    assert (kit / ".fedbrain_local_at_start.json").stat().st_mode & 0o077 == 0
    (kit / "local" / "fedbrain_site.json").write_text('{"num_threads": 2}')
    assert local_changes_since_start(kit) == ([], ["local/fedbrain_site.json"])
    check, ctx = site_check(), _site_ctx("standard", job="job-4")
    ctx.set_prop(FLContextKey.WORKSPACE_ROOT, str(kit), private=True, sticky=False)
    check.handle_event(EventType.START_RUN, ctx)
    assert not job_refused("job-4")
    (kit / "local" / "privacy.json").write_text(json.dumps(privacy_policy("standard")))  # weakened on disk
    check.handle_event(EventType.START_RUN, ctx)
    assert job_refused("job-4")
    result = update()
    _event(check, EventType.BEFORE_TASK_RESULT_FILTER, ctx, update())
    _event(check, EventType.AFTER_TASK_RESULT_FILTER, ctx, result)
    assert "local/privacy.json changed since the site started" in result.get_header(REFUSED_HEADER)


def test_secagg_scope_lets_only_fedbrains_masked_vector_leave():
    """The `secagg` scope: one 32-bit vector of the layout's size, byte for byte what fedbrain's mask made for
    this result; a plaintext update, or a vector the job's own filter put in its place, is refused."""
    from fedbrain.contracts import SECAGG_LAYOUT_META, SECAGG_MASKED
    from fedbrain.privacy.releases import SECAGG, record_release

    secagg = SCOPE_PARTS["secagg"]
    layout = {SECAGG_LAYOUT_META: [["enc.weight", [4, 3]], ["enc.bias", [4]]]}
    vector = np.arange(16, dtype=np.uint32)
    record_release("t9", {SECAGG_MASKED: vector}, kind=SECAGG)
    released = take_release("t9")
    good = update(meta=layout, **{SECAGG_MASKED: vector})
    assert payload_problems(good, secagg, PERSONAL_PARTS, steps_sent=5, released=released) == []
    plain = payload_problems(update(), secagg, PERSONAL_PARTS, released=released)
    assert "2 model values would leave unmasked" in " ".join(plain)
    forged = update(meta=layout, **{SECAGG_MASKED: vector + 1})  # e.g. a job filter that unmasks or re-masks
    assert "not the one fedbrain's secure aggregation made" in " ".join(
        payload_problems(forged, secagg, PERSONAL_PARTS, released=released))
    short = update(meta=layout, **{SECAGG_MASKED: vector[:8]})
    record_release("t10", {SECAGG_MASKED: vector[:8]}, kind=SECAGG)
    assert "not one 32-bit vector of the layout's size" in " ".join(
        payload_problems(short, secagg, PERSONAL_PARTS, released=take_release("t10")))


def test_under_secure_aggregation_dp_adds_a_share_of_the_noise_that_may_leave_only_masked():
    """In a job whose secure-aggregation setup completed at this site (threshold t = 2 of 3), client-level DP adds
    noise of std 1/sqrt(2) of the target: the masked sum of at least 2 sites carries the whole noise. The same
    update without the mask (a job that dropped it) is refused by the final check under any scope."""
    from nvflare.apis.fl_constant import ReservedKey

    from fedbrain.secagg import site as secagg_site
    from fedbrain.secagg.protocol import ServerSecAgg, SiteSecAgg
    from fedbrain_testing import pki

    sites = {n: SiteSecAgg(i, "j-share", [0]) for n, i in pki.consortium(["a", "b", "c"]).items()}
    server = ServerSecAgg("j-share")
    ads = [s.advertise() for s in sites.values()]
    routed = server.route({n: s.share(ads, server.setup(ads)) for n, s in sites.items()})
    for n, s in sites.items():
        s.receive(routed[n], server.members)
    secagg_site._JOBS["j-share"] = sites["a"]
    try:
        ctx = FLContext()
        ctx.set_prop(FLContextKey.TASK_ID, "t-share", private=True, sticky=False)
        ctx.set_prop(ReservedKey.RUN_NUM, "j-share", private=False, sticky=False)
        zeros = update(w=np.zeros(200_000, np.float32))
        noised = ClientLevelDP(clip_norm=1.0, noise_multiplier=1.0).process(zeros, ctx)
        std = float(np.std(from_shareable(noised).data["w"]))
        assert abs(std - 2 ** -0.5) < 0.01, std
        problems = payload_problems(noised, DP, PERSONAL_PARTS, released=take_release("t-share"))
        assert "share of the noise (secure aggregation), and the update would leave unmasked" in " ".join(problems)
    finally:
        secagg_site._JOBS.pop("j-share", None)


def test_dp_secagg_accepts_a_masked_update_only_of_exactly_what_dp_noised():
    from fedbrain.contracts import SECAGG_LAYOUT_META, SECAGG_MASKED
    from fedbrain.privacy.releases import CLIENT_DP_SHARED, SECAGG, SECAGG_INPUT, fingerprint

    parts = SCOPE_PARTS["dp_secagg"]
    noised = {"enc.weight": np.ones((4, 3), np.float32), "enc.bias": np.zeros(4, np.float32)}
    vector = np.arange(16, dtype=np.uint32)
    payload = update(meta={SECAGG_LAYOUT_META: [["enc.bias", [4]], ["enc.weight", [4, 3]]]}, **{SECAGG_MASKED: vector})
    fps = {k: fingerprint(v) for k, v in noised.items()}
    released = {CLIENT_DP_SHARED: fps, SECAGG_INPUT: dict(fps), SECAGG: {SECAGG_MASKED: fingerprint(vector)}}
    assert payload_problems(payload, parts, PERSONAL_PARTS, released=released) == []
    other = {**released, SECAGG_INPUT: {**fps, "enc.bias": fingerprint(np.ones(4, np.float32))}}  # masked not DP's
    assert "not the ones client-level DP noised" in " ".join(payload_problems(payload, parts, PERSONAL_PARTS,
                                                                               released=other))
    fewer = {**released, SECAGG_INPUT: {"enc.weight": fps["enc.weight"]}}  # a noised value left out of the mask
    assert "not the ones client-level DP noised" in " ".join(payload_problems(payload, parts, PERSONAL_PARTS,
                                                                               released=fewer))


def test_a_job_naming_a_scope_weaker_than_the_sites_default_is_refused_at_its_start(monkeypatch):
    """A hospital that made `encrypted` its default but still defines `standard` (FLARE lets a job pick any
    defined scope): a job naming `standard` is refused before the site trains, and every result with it."""
    import fedbrain.filters.final_check as final_check

    monkeypatch.setattr(final_check, "site_default_scope", lambda: "encrypted")
    check, ctx = site_check(), _site_ctx("standard", job="job-weaker")
    check.handle_event(EventType.START_RUN, ctx)
    assert job_refused("job-weaker")  # the site loop never trains for it
    result = update()
    _event(check, EventType.BEFORE_TASK_RESULT_FILTER, ctx, update())
    _event(check, EventType.AFTER_TASK_RESULT_FILTER, ctx, result)
    reason = result.get_header(REFUSED_HEADER)
    assert result.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR and from_shareable(result).data == {}
    assert "privacy scope 'standard', weaker than this site's default 'encrypted' (it lacks require_encryption)" in reason
    # the same job under the default or a stronger scope is not refused for its scope
    for scope, job in (("encrypted", "job-same"), ("dp_encrypted", "job-stronger")):
        check, ctx = site_check(), _site_ctx(scope, job=job)
        check.handle_event(EventType.START_RUN, ctx)
        assert not job_refused(job), scope
    assert final_check.weaker_than_default("dp", "dp_secagg", SCOPE_PARTS) == (
        "the job names privacy scope 'dp', weaker than this site's default 'dp_secagg' (it lacks require_secagg)")
    assert final_check.weaker_than_default("standard", "", SCOPE_PARTS) == ""  # default unknown: no floor here


def test_a_hospital_that_sends_no_grade_head_refuses_a_mixed_jobs_shared_head():
    """A job submitter can ask for --algorithm mixed with configuration only, and its shared head is trained on the
    site's cases. A hospital provisioned with ``send_shared_head: false`` refuses it at the final check, with the
    reason, instead of sending it; by default the shared head goes and the personal correction stays."""
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.filters.exclude_vars import ExcludeVars

    from fedbrain.models.classifier import build_classifier

    model = build_classifier(shared_head=True, channels=(8, 16), embed_dim=16, head_hidden=8, init_seed=0)
    update = DXO(DataKind.WEIGHT_DIFF, data={k: v.numpy() for k, v in model.state_dict().items()},
                 meta={NUM_STEPS_META: 5}).to_shareable()
    for send, refused in ((True, False), (False, True)):
        policy = privacy_policy("standard", send_shared_head=send)
        scope = policy["scopes"][0]["task_result_filters"][0]["args"]  # the scope's own ExcludeVars
        sent = ExcludeVars(**scope).process(update, FLContext())
        parts = policy["components"][0]["args"]["personal_parts"]
        problems = payload_problems(sent, STANDARD, parts, steps_sent=5)
        assert bool(problems) == refused, (send, problems)
        if refused:
            assert "shared_head.0.weight" in problems[0]
        assert not any(k.startswith("head.") for k in from_shareable(sent).data)
