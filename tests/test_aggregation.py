"""Update guard and robust aggregation on hand-made updates (fedbrain.aggregation), the attack
filter (fedbrain_testing.attack), and the job wiring: what FLARE's FedAvg gets as aggregator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants

from fedbrain.aggregation.aggregator import GuardedAggregator
from fedbrain.aggregation.robust import (MAD_FLOOR, Update, combine, krum_select, screen, trim_count,
                                         trimmed_mean)
from fedbrain.contracts import NUM_STEPS_META
from fedbrain_testing.attack import poison
from fedbrain.updates import update_norm

SHAPES = {"enc.weight": (4, 3), "enc.bias": (4,), "head.weight": (2, 4)}


def honest(seed: int, scale: float = 1.0, names=SHAPES) -> dict:
    """A plausible update: a shared direction plus a little site noise (sites agree, not exactly)."""
    base = np.random.default_rng(100)
    own = np.random.default_rng(seed)
    return {k: (scale * (base.standard_normal(s) + 0.3 * own.standard_normal(s))).astype(np.float32)
            for k, s in ((k, SHAPES[k]) for k in names)}


def three_sites(bad: dict | None = None, steps=(10, 20, 30)) -> list[Update]:
    ups = [Update(f"s{i}", honest(i), steps[i]) for i in range(3)]
    if bad is not None:
        ups[1] = Update("s1", bad, steps[1])
    return ups


# ---------------------------------------------------------------------------------- the guard
def test_clean_round_refuses_nobody():
    d = screen(three_sites(), SHAPES, guard_z=3.5)
    assert d.refused == {} and [u.site for u in d.accepted] == ["s0", "s1", "s2"]


def test_nan_and_inf_are_refused_with_the_reason():
    bad = honest(1)
    bad["enc.bias"][2] = np.nan
    d = screen(three_sites(bad), SHAPES, guard_z=3.5)
    assert "non-finite" in d.refused["s1"] and "enc.bias" in d.refused["s1"]
    bad["enc.bias"][2] = np.inf
    assert "non-finite" in screen(three_sites(bad), SHAPES, 3.5).refused["s1"]


def test_wrong_shape_and_unknown_name_are_refused():
    bad = honest(1)
    bad["enc.weight"] = np.zeros((3, 4), np.float32)
    assert "(3, 4) instead of (4, 3)" in screen(three_sites(bad), SHAPES, 3.5).refused["s1"]
    bad = {**honest(1), "image.patch": np.zeros((64, 64), np.float32)}
    assert "image.patch" in screen(three_sites(bad), SHAPES, 3.5).refused["s1"]


def test_a_missing_personal_head_is_not_wrong_names():
    ups = [Update(f"s{i}", honest(i, names=("enc.weight", "enc.bias")), 10) for i in range(3)]
    d = screen(ups, SHAPES, 3.5)
    assert d.refused == {}
    out, _ = combine(d.accepted, "median")
    assert set(out) == {"enc.weight", "enc.bias"}  # the head is simply not in the aggregate


@pytest.mark.parametrize("kind", ["scale", "sign_flip", "random"])
def test_norm_rule_with_three_sites(kind):
    """x100 is refused at the demo's size (3 sites); sign flip and matching-norm noise are not
    norm outliers (they are the robust methods' job)."""
    bad = poison(honest(1), kind)
    d = screen(three_sites(bad), SHAPES, guard_z=3.5)
    if kind == "scale":
        assert "100x the round's median" in d.refused["s1"] or "x the round's median" in d.refused["s1"]
        assert d.z["s1"] > 3.5
    else:
        assert "s1" not in d.refused


def test_three_sites_whose_norms_agree_closely_do_not_refuse_a_third_within_10x():
    """MAD of 3 log norms can be ~0; the floor keeps an honest site 5x larger accepted, 12x refused."""
    for ratio, refused in ((5.0, False), (12.0, True)):
        ups = [Update("a", honest(0)), Update("b", {k: v * 1.0001 for k, v in honest(0).items()}),
               Update("c", {k: v * ratio for k, v in honest(0).items()})]
        d = screen(ups, SHAPES, 3.5)
        assert ("c" in d.refused) is refused, (ratio, d.z)
    assert math.isclose(math.exp(3.5 * MAD_FLOOR / 0.6745), 10.0)


def test_two_sites_cannot_name_an_outlier():
    ups = [Update("a", honest(0)), Update("b", {k: v * 100 for k, v in honest(1).items()})]
    assert screen(ups, SHAPES, 3.5).refused == {}


def test_zero_step_and_empty_updates_are_idle_not_refused():
    ups = three_sites() + [Update("withheld", {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, 0),
                           Update("site_error", {}, 0)]
    d = screen(ups, SHAPES, 3.5)
    assert d.idle == ["withheld", "site_error"] and d.refused == {}
    out, _ = combine(d.accepted, "fedavg")
    ref, _ = combine(three_sites(), "fedavg")
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k])


def test_guard_off_refuses_nothing():
    bad = honest(1)
    bad["enc.bias"][0] = np.nan
    assert screen(three_sites(bad), SHAPES, 3.5, enabled=False).refused == {}


# ---------------------------------------------------------------------------------- combining
def test_fedavg_equals_flare_builtin_weighted_average():
    ups = three_sites()
    ours, _ = combine(ups, "fedavg")
    helper = WeightedAggregationHelper()
    for u in ups:
        helper.add(data={k: torch.from_numpy(v.copy()) for k, v in u.params.items()}, weight=u.steps,
                   contributor_name=u.site, contribution_round=0)
    flare = helper.get_result()
    for k in flare:
        np.testing.assert_allclose(ours[k], flare[k].numpy(), rtol=1e-6, atol=1e-7)


def test_median_and_trimmed_mean_ignore_one_poisoned_site():
    clean = [u.params for u in three_sites()]
    for kind in ("scale", "sign_flip", "random"):
        ups = three_sites(poison(honest(1), kind))
        for method in ("median", "trimmed_mean"):
            out, _ = combine(ups, method, trim_fraction=0.2)
            for k in SHAPES:
                lo = np.minimum.reduce([clean[0][k], clean[2][k]])
                hi = np.maximum.reduce([clean[0][k], clean[2][k]])
                assert np.all(out[k] >= lo - 1e-6) and np.all(out[k] <= hi + 1e-6), (kind, method, k)


def test_trim_count_rule():
    assert trim_count(3, 0.2) == 1 and trim_count(10, 0.2) == 2 and trim_count(12, 0.2) == 3
    assert trim_count(2, 0.4) == 0 and trim_count(5, 0.0) == 0
    ups = [Update(str(i), {"x": np.array([float(v)])}) for i, v in enumerate([1, 2, 3, 4, 1000])]
    assert trimmed_mean(ups, 0.2)["x"][0] == pytest.approx(3.0)


@pytest.mark.parametrize("kind", ["scale", "sign_flip", "random"])
def test_krum_drops_the_poisoned_site(kind):
    ups = three_sites(poison(honest(1), kind))
    keep, scores = krum_select(ups, byzantine=1)
    assert sorted(u.site for u in keep) == ["s0", "s2"], scores
    out, details = combine(ups, "krum", krum_byzantine=1)
    ref, _ = combine([ups[0], ups[2]], "fedavg")
    assert details["krum_selected"] == ["s0", "s2"]
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k])


def test_robust_methods_work_per_name_over_the_sites_that_sent_it():
    ups = three_sites()
    ups[0] = Update("s0", {k: v for k, v in ups[0].params.items() if k != "head.weight"}, 10)
    for method in ("fedavg", "median", "trimmed_mean", "krum"):
        out, _ = combine(ups, method)
        assert set(out) == set(SHAPES), method
    out, _ = combine(ups, "median")
    np.testing.assert_allclose(out["head.weight"], np.median(np.stack([ups[1].params["head.weight"],
                                                                        ups[2].params["head.weight"]]), axis=0))


def test_poison_kinds():
    u = honest(3)
    assert update_norm(poison(u, "scale")) == pytest.approx(100 * update_norm(u), rel=1e-5)
    flipped = poison(u, "sign_flip")
    np.testing.assert_allclose(flipped["enc.weight"], -u["enc.weight"])
    noise = poison(u, "random")
    assert update_norm(noise) == pytest.approx(update_norm(u), rel=1e-5)
    assert abs(float(np.dot(noise["enc.weight"].ravel(), u["enc.weight"].ravel()))) < update_norm(u) ** 2 / 2
    with pytest.raises(ValueError, match="attack kind"):
        poison(u, "nan")


# ---------------------------------------------------------------------------------- the FLARE component
def _fl(site: str, params: dict, steps, torch_params=True) -> FLModel:
    conv = (lambda v: torch.from_numpy(v.copy())) if torch_params else (lambda v: v)
    return FLModel(params={k: conv(v) for k, v in params.items()}, params_type=ParamsType.DIFF,
                   metrics={"val_dice": 0.5 if site != "s1" else 0.2},
                   meta={NUM_STEPS_META: steps, "client_name": site})


def test_aggregator_equals_flare_fedavg_when_clean_and_returns_torch():
    agg = GuardedAggregator()
    ups = three_sites()
    agg.reset_stats()
    for u in ups:
        agg.accept_model(_fl(u.site, u.params, u.steps))
    result = agg.aggregate_model()
    assert result.params_type == ParamsType.DIFF
    helper = WeightedAggregationHelper()
    for u in ups:
        helper.add(data={k: torch.from_numpy(v.copy()) for k, v in u.params.items()}, weight=u.steps,
                   contributor_name=u.site, contribution_round=0)
    for k, v in helper.get_result().items():
        assert isinstance(result.params[k], torch.Tensor)
        torch.testing.assert_close(result.params[k], v)
    assert result.metrics["val_dice"] == pytest.approx((0.5 * 10 + 0.2 * 20 + 0.5 * 30) / 60)
    # FLARE's metrics writer then records each site's metrics in round_metrics.jsonl, as with its own FedAvg.
    assert result.meta[AppConstants.METRICS_AGGREGATION_INFO]["use_contribution_sites"] is True


def test_aggregator_refuses_and_flags_after_k_rounds():
    agg = GuardedAggregator(aggregation="median", guard_flag_after=2)
    records = []
    for r in range(4):
        for u in three_sites(poison(honest(1), "scale") if r < 3 else None):
            agg.accept_model(_fl(u.site, u.params, u.steps, torch_params=False))
        out = agg.aggregate_model()
        assert isinstance(out.params["enc.weight"], np.ndarray)
        records.append(agg.last_record)
    assert [sorted(r["refused"]) for r in records] == [["s1"], ["s1"], ["s1"], []]
    assert [r["flagged"] for r in records] == [[], ["s1"], ["s1"], []]
    assert records[2]["streak"]["s1"] == 3 and records[3]["streak"]["s1"] == 0  # accepted again: the streak ends
    assert "x the round's median" in records[0]["refused"]["s1"]


def test_all_idle_round_leaves_the_model_unchanged():
    agg = GuardedAggregator()
    agg.accept_model(_fl("a", {}, 0))
    agg.accept_model(_fl("b", {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, 0))
    assert agg.aggregate_model().params == {}


# ---------------------------------------------------------------------------------- jobs and config
def _server_config(job) -> dict:
    return json.loads(next(job.glob("app*/config/config_fed_server.json")).read_text())


def _components(cfg: dict) -> list[dict]:
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "path" in x:
                found.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(cfg)
    return found


def test_every_plaintext_fedavg_job_is_guarded_and_reads_the_config(tmp_path):
    from fedbrain.jobs.classification import export
    from fedbrain.tasks.classification import ClassificationConfig

    job = export(ClassificationConfig(aggregation="trimmed_mean", trim_fraction=0.3, guard_z=5.0), tmp_path)
    agg = next(c for c in _components(_server_config(job)) if c["path"].endswith("GuardedAggregator"))
    assert agg["args"] == {"aggregation": "trimmed_mean", "trim_fraction": 0.3, "guard_z": 5.0}
    default = export(ClassificationConfig(), tmp_path / "d")
    assert any(c["path"].endswith("GuardedAggregator") for c in _components(_server_config(default)))


def test_attack_filter_in_a_single_app_job_acts_at_the_named_site_only(tmp_path):
    from fedbrain.tasks.segmentation import SegmentationConfig
    from fedbrain_testing.attack import export_with_attack

    job = export_with_attack(SegmentationConfig(), tmp_path, {"site": "hospital-b", "kind": "scale"})
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    (poison_filter,) = [f for g in client["task_result_filters"] for f in g["filters"]
                        if f["path"] == "fedbrain_testing.attack.PoisonUpdate"]
    assert poison_filter["args"]["site"] == "hospital-b"
    # configuration only: a custom/ folder would make it BYOC, which every fedbrain kit refuses
    assert not [p for p in job.rglob("*") if "custom" in p.parts], sorted(job.rglob("*"))


def test_attack_filter_only_in_the_named_sites_app(tmp_path):
    from fedbrain.tasks.classification import ClassificationConfig
    from fedbrain_testing.attack import export_with_attack as export

    job = export(ClassificationConfig(), tmp_path, {"site": "hospital-b", "kind": "sign_flip"})
    assert not [p for p in job.rglob("*") if "custom" in p.parts]
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        text = (job / f"app_{site}" / "config" / "config_fed_client.json").read_text()
        assert ("fedbrain_testing.attack.PoisonUpdate" in text) is (site == "hospital-b")
    with pytest.raises(ValueError, match="not one of the job's sites"):
        export(ClassificationConfig(), tmp_path / "x", {"site": "hospital-z", "kind": "scale"})
    with pytest.raises(ValueError, match="attack must be"):
        export(ClassificationConfig(), tmp_path / "y", {"site": "hospital-b", "kind": "nan"})


def test_config_refuses_robust_aggregation_with_he_or_scaffold():
    from fedbrain.tasks.classification import ClassificationConfig

    with pytest.raises(ValueError, match="ciphertext"):
        ClassificationConfig(he=True, aggregation="median")
    with pytest.raises(ValueError, match="SCAFFOLD"):
        ClassificationConfig(algorithm="scaffold", aggregation="krum")
    # The guard's default resolves per path: on for plaintext FedAvg, off where the server cannot screen;
    # asking for it there is refused with the reason instead of being dropped silently.
    assert ClassificationConfig().update_guard and not ClassificationConfig(he=True).update_guard
    assert not ClassificationConfig(algorithm="scaffold").update_guard
    with pytest.raises(ValueError, match="guard: .*ciphertext"):
        ClassificationConfig(he=True, guard=True)
    with pytest.raises(ValueError, match="guard: .*SCAFFOLD"):
        ClassificationConfig(algorithm="scaffold", guard=True)


def test_report_reads_the_guard_file(tmp_path):
    from fedbrain.contracts import GUARD_FILE
    from fedbrain.report.job_report import _guard, _guard_markdown

    agg = GuardedAggregator(guard_flag_after=2)
    lines = []
    for r in range(3):
        for u in three_sites(poison(honest(1), "scale")):
            agg.accept_model(_fl(u.site, u.params, u.steps))
        agg.aggregate_model()
        lines.append(json.dumps({**agg.last_record, "round": r}))
    (tmp_path / GUARD_FILE).write_text("\n".join(lines) + "\n")
    guard = _guard(tmp_path)
    assert [(r["round"], r["site"]) for r in guard["refusals"]] == [(0, "s1"), (1, "s1"), (2, "s1")]
    assert guard["flagged"] == {"s1": 1} and guard["method"] == "fedavg"
    md = "\n".join(_guard_markdown(guard))
    assert "| 0 | s1 | update norm" in md and "s1 flagged** in round 1" in md
    assert _guard(tmp_path / "nowhere") == {}


def test_watch_shows_the_guards_refusals():
    from fedbrain.fl.progress import parse_log

    log = "\n".join([
        "2026-11-30 13:18:06 - GuardedAggregator - WARNING - [identity=x, run=y, wf=controller] - update guard: round 0: "
        "refused hospital-b: update norm 4075 is 91.7x the round's median 44.44 (robust z 6.9 > guard_z 3.5)",
        "2026-11-30 13:18:16 - GuardedAggregator - WARNING - [identity=x] - update guard: round 1: refused hospital-b: "
        "non-finite values (NaN/Inf) in 1 arrays, e.g. a.b",
        "2026-11-30 13:18:16 - GuardedAggregator - ERROR - [identity=x] - update guard: hospital-b flagged: refused in 2 "
        "consecutive rounds (guard_flag_after 2)",
        "2026-11-30 13:18:16 - GuardedAggregator - INFO - [identity=x] - update guard: round 1: fedavg over ['hospital-a']; "
        "refused ['hospital-b']",
    ])
    got = parse_log(log)["guard"]
    assert set(got) == {"hospital-b"}
    assert got["hospital-b"]["round"] == 1 and got["hospital-b"]["reason"].startswith("non-finite")
    assert "2 consecutive rounds" in got["hospital-b"]["flagged"]
