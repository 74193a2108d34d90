"""Differential privacy: DP-SGD in the one loop, the site's ledger and budget, client-level DP."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from fedbrain.contracts import DP_DELTA, DP_EPSILON_SPENT, DP_WITHHELD
from fedbrain.fl.site import SiteSettings, resolve_site_settings, write_site_config
from fedbrain.privacy.budget import BUDGET_EXHAUSTED, DP_REQUIRED, LEDGER_BROKEN, SiteBudget, SitePrivacy
from fedbrain.privacy.ledger import PrivacyLedger
from fedbrain.privacy.dpsgd import (DPSGD, PER_SAMPLE_MODES, Stateless, default_per_sample_mode, per_sample_gradients,
                                    validate_model)
from fedbrain.tasks.classification import ClassificationConfig
from fedbrain.tasks.loop import in_layout, set_layout
from fedbrain.tasks.segmentation import SegmentationConfig, SegmentationTrainer

try:
    from .fixtures_seg import make_cases
except ImportError:  # tests/ is not a package
    from fixtures_seg import make_cases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# 3 cases at batch 2: 2 batches per epoch, Poisson rate q = 1/2, 2 steps per round.
SMALL = dict(spacing=(6.0, 6.0, 6.0), roi_size=(32, 32, 32), seed=0, num_threads=1, epochs_per_round=1, rounds=3)
NOISE = 1.3


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    return make_cases(root, 3, prefix="DP", seed=100)


def _site(tmp_path, budget=SiteBudget()):
    return SiteSettings(site="hospital-x", datalist=tmp_path / "data" / "datalist.json", budget=budget,
                        workspace=tmp_path / "site")


def _offline_epsilon(steps, q, delta, noise=NOISE):
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=q)
    return acc.get_epsilon(delta)


def _rounds(privacy, trainer, model, rounds, job="job-1", first=1):
    out = []
    for r in range(first, first + rounds):
        withheld = privacy.withhold()
        stats = trainer.train(model) if not withheld else {"steps": 0}
        out.append({**privacy.after_round(job, r, withheld), "steps": stats["steps"]})
    return out


# ---------------------------------------------------------------- accounting and the site's ledger
def test_epsilon_after_k_rounds_equals_opacus_offline(cases, tmp_path):
    config = SegmentationConfig(**SMALL, dp_noise_multiplier=NOISE)
    trainer = SegmentationTrainer(cases, [], config)
    privacy = SitePrivacy(trainer, _site(tmp_path), "hospital-x")
    model = trainer.build_model()
    per_round = trainer.round_steps()
    assert per_round == 2 and privacy.dp.sample_rate == 0.5
    delta = 1e-5  # the default: min(1e-5, 1 / n^1.1) with n = 3
    for k, m in enumerate(_rounds(privacy, trainer, model, 3), start=1):
        assert m["steps"] == per_round
        assert m[DP_DELTA] == pytest.approx(delta)
        assert m[DP_EPSILON_SPENT] == pytest.approx(_offline_epsilon(k * per_round, 0.5, delta), rel=1e-9)


def test_a_restarted_site_continues_its_epsilon(cases, tmp_path):
    config = SegmentationConfig(**SMALL, dp_noise_multiplier=NOISE)
    budget = SiteBudget(epsilon=1e6, delta=1e-5)
    trainer = SegmentationTrainer(cases, [], config)
    first = _rounds(SitePrivacy(trainer, _site(tmp_path, budget), "hospital-x"), trainer, trainer.build_model(), 2)
    # the site process restarts (same job), then a later job trains on the same data
    for job in ("job-1", "job-2"):
        trainer = SegmentationTrainer(cases, [], config)
        privacy = SitePrivacy(trainer, _site(tmp_path, budget), "hospital-x")
        assert privacy.spent() >= first[-1][DP_EPSILON_SPENT]
        _rounds(privacy, trainer, trainer.build_model(), 1, job=job, first=3)
    assert privacy.spent() == pytest.approx(_offline_epsilon(4 * 2, 0.5, 1e-5), rel=1e-9)
    ledger = PrivacyLedger(tmp_path / "site")
    assert ledger.path.is_relative_to(tmp_path / "site" / "privacy")
    assert ledger.history_for(privacy.patients) == [(NOISE, 0.5, 8)] and set(ledger.jobs()) == {"job-1", "job-2"}
    assert ledger.history_for(ledger.patients(["someone-else"])) == []  # keyed by the patients


def test_budget_exhaustion_stops_releasing(cases, tmp_path, caplog):
    config = SegmentationConfig(**SMALL, dp_noise_multiplier=NOISE)
    delta = 1e-5
    budget = SiteBudget(epsilon=(_offline_epsilon(4, 0.5, delta) + _offline_epsilon(6, 0.5, delta)) / 2, delta=delta)
    trainer = SegmentationTrainer(cases, [], config)
    privacy = SitePrivacy(trainer, _site(tmp_path, budget), "hospital-x")
    model = trainer.build_model()
    with caplog.at_level(logging.ERROR, logger="fedbrain"):
        rounds = _rounds(privacy, trainer, model, 4)
    assert [r["steps"] for r in rounds] == [2, 2, 0, 0]
    assert [r.get(DP_WITHHELD, 0) for r in rounds] == [0, 0, BUDGET_EXHAUSTED, BUDGET_EXHAUSTED]
    assert rounds[-1][DP_EPSILON_SPENT] == rounds[1][DP_EPSILON_SPENT] <= budget.epsilon
    told = [r.message for r in caplog.records if "budget exhausted" in r.message]
    assert len(told) == 1 and "hospital-x" in told[0]


def test_require_dp_refuses_a_job_without_dp(cases, tmp_path):
    trainer = SegmentationTrainer(cases, [], SegmentationConfig(**SMALL))
    privacy = SitePrivacy(trainer, _site(tmp_path, SiteBudget(require_dp=True)), "hospital-x")
    assert privacy.withhold() == DP_REQUIRED
    assert privacy.after_round("job", 1, DP_REQUIRED) == {DP_WITHHELD: DP_REQUIRED}


def test_target_epsilon_is_met_over_the_planned_rounds_and_capped(cases, tmp_path):
    config = SegmentationConfig(**SMALL, dp_epsilon=8.0, dp_delta=1e-5)
    trainer = SegmentationTrainer(cases, [], config)
    privacy = SitePrivacy(trainer, _site(tmp_path), "hospital-x")
    rounds = _rounds(privacy, trainer, trainer.build_model(), config.rounds + 1)
    spent = rounds[config.rounds - 1][DP_EPSILON_SPENT]
    assert 7.9 < spent <= 8.0
    assert rounds[-1][DP_WITHHELD] == BUDGET_EXHAUSTED  # one round more than planned: the job's own cap


def test_site_json_privacy_keys(tmp_path):
    ws = tmp_path / "hospital-a"
    (ws / "startup").mkdir(parents=True)
    write_site_config(ws, tmp_path / "dl.json", dp_budget={"epsilon": 3.0, "delta": 1e-6}, require_dp=True)
    s = resolve_site_settings("hospital-a", cwd=ws)
    assert s.budget == SiteBudget(3.0, 1e-6, True) and s.workspace == ws.resolve()
    write_site_config(ws, tmp_path / "dl.json", dp_budget={"epsilon": -1})
    with pytest.raises(Exception, match="epsilon"):
        resolve_site_settings("hospital-a", cwd=ws)


# ---------------------------------------------------------------- DP-SGD in the loop
def test_dp_off_training_is_the_plain_loop_bit_for_bit(cases):
    """DP off: Trainer.train is exactly zero_grad -> loss -> backward -> step (as before DP existed)."""
    config = SegmentationConfig(**SMALL, algorithm="fedavg")
    trainer = SegmentationTrainer(cases, [], config)
    model = trainer.build_model()
    trainer.train(model, steps=3)

    ref_trainer = SegmentationTrainer(cases, [], config)
    ref = ref_trainer.build_model()
    opt = ref_trainer._optimizer_for(ref)
    layout = ref_trainer.training_layout()
    set_layout(ref, layout)
    ref.train()
    taken = 0
    while taken < 3:
        for batch in ref_trainer.train_loader:
            if taken == 3:
                break
            opt.zero_grad(set_to_none=True)
            sum(ref_trainer.loss_terms(ref, in_layout(batch, layout)).values()).backward()
            opt.step()
            taken += 1
    set_layout(ref, torch.contiguous_format)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


def test_without_noise_or_clipping_dp_sgd_is_plain_sgd_fedprox_included(cases):
    """Scaling, the FedProx term added back after the noise, and q = 1 all checked at once."""
    config = SegmentationConfig(**SMALL, algorithm="fedprox", fedprox_mu=0.5, lr=1e-2)
    twice = [cases[0], cases[0]]  # one batch of two random crops of one case, whichever order a loader uses
    dp_config = config.replace(dp_noise_multiplier=1.0, dp_max_grad_norm=1e6)
    results = []
    for dp in (False, True):
        trainer = SegmentationTrainer(twice, [], dp_config if dp else config)
        if dp:
            DPSGD.attach(trainer).noise_multiplier = 0.0  # the config refuses no noise: a test may
            assert trainer.privacy.sample_rate == 1.0  # every case in every batch
        model = dp_config.build_model()  # DP's activation in both runs
        start = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():  # away from the global model, so the proximal term pulls
                p.add_(0.01)
        trainer.train(model, steps=1, global_params=start)
        results.append(model.state_dict())
    for name, a in results[0].items():
        assert torch.allclose(a, results[1][name], atol=1e-4), name


def test_an_empty_poisson_batch_is_a_noise_only_step(cases):
    config = SegmentationConfig(**SMALL, dp_noise_multiplier=NOISE)
    trainer = SegmentationTrainer(cases, [], config)
    dp = DPSGD.attach(trainer)
    dp._loader.batch_sampler.sample_rate = 0.0  # Poisson sampling draws nobody (the accountant still says q)
    model = trainer.build_model()
    before = [p.detach().clone() for p in model.parameters()]
    out = trainer.train(model, steps=2)
    assert out["steps"] == 2 and math.isnan(out["train_loss"])
    assert dp.history == [(NOISE, 0.5, 2)]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # noise was released
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus detached
    assert list(model.state_dict()) == list(trainer.build_model().state_dict())


def test_dp_config_without_hook_is_refused(cases):
    trainer = SegmentationTrainer(cases, [], SegmentationConfig(**SMALL, dp_epsilon=3.0))
    with pytest.raises(RuntimeError, match="DP-SGD"):
        trainer.train(trainer.build_model(), steps=1)


# ---------------------------------------------------------------- models pass Opacus with DP on
#: Every network DP-SGD may train, small.
DP_NETWORKS = [
    SegmentationConfig(dp_epsilon=8.0, roi_size=(32, 32, 32)),
    SegmentationConfig(dp_epsilon=8.0, roi_size=(32, 32, 32), arch="segresnet"),
    *(ClassificationConfig(dp_epsilon=8.0, fusion=f, spatial_size=(16, 16, 16), channels=(8, 16))
      for f in ("late", "masked_mean", "attention")),
]
DP_NETWORK_IDS = ["unet", "segresnet", "late", "masked_mean", "attention"]


@pytest.mark.parametrize("config", DP_NETWORKS, ids=DP_NETWORK_IDS)
def test_models_pass_opacus_validation_with_dp(config):
    model = config.build_model()
    validate_model(model)
    gsm = GradSampleModule(model)
    if isinstance(config, SegmentationConfig):
        out = gsm(torch.randn(2, 4, *config.roi_size))
    else:
        size = config.spatial_size
        out = gsm(torch.randn(2, 4, *size), torch.randn(2, 2, *size), torch.ones(2), torch.tensor([1.0, 0.0]))
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (2, *p.shape), name
    gsm._close()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("config", DP_NETWORKS, ids=DP_NETWORK_IDS)
def test_per_sample_gradients_by_vmap_are_opacus_own(config):
    """The default way (torch.func) gives each case's gradient as Opacus' hooks do: DP-SGD clips the same thing.
    A case's loss here is the mean of its outputs squared, so the batch's loss is the mean of the cases'."""
    torch.manual_seed(0)
    model = config.build_model()
    for m in model.modules():  # random masks would differ between the two ways
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if hasattr(model, "modality_dropout"):
        model.modality_dropout = 0.0
    if isinstance(config, SegmentationConfig):
        batch = {"x": torch.randn(3, 4, *config.roi_size), "ids": ["a", "b", "c"]}
        forward = lambda net, b: net(b["x"])  # noqa: E731
    else:
        size = config.spatial_size
        batch = {"mri": torch.randn(3, 4, *size), "ct": torch.randn(3, 2, *size),
                 "has_ct": torch.tensor([1.0, 0.0, 1.0]), "ids": ["a", "b", "c"]}
        each = config.fusion != "late"  # each stream graded alone too, as the trainer's loss does
        forward = lambda net, b: net(b["mri"], b["ct"], torch.ones_like(b["has_ct"]), b["has_ct"],  # noqa: E731
                                     each_stream=each)
    stateless = Stateless(model)
    grads, parts = per_sample_gradients(lambda b: {"loss": forward(stateless, b).float().pow(2).mean()},
                                        stateless, batch)
    gsm = GradSampleModule(model, loss_reduction="mean")
    loss = forward(gsm, batch).float().pow(2).mean()
    loss.backward()
    assert torch.allclose(parts["loss"], loss.detach(), rtol=1e-4)
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, p in model.named_parameters():
        assert grads[name].shape == (3, *p.shape), name
        assert torch.allclose(grads[name], p.grad_sample, rtol=1e-2, atol=1e-3 * scale), name
    gsm._close()


def test_per_sample_gradients_are_vectorised_when_a_convolution_trains():
    """Opacus' hooks unfold every input patch of a trained convolution; for a linear head they are cheaper."""
    from fedbrain.tasks.loop import apply_trainable_part

    for config, part, mode in ((SegmentationConfig(roi_size=(32, 32, 32)), "all", "vmap"),
                               (SegmentationConfig(roi_size=(32, 32, 32)), "decoder", "vmap"),
                               (ClassificationConfig(spatial_size=(16, 16, 16), channels=(8, 16)), "head", "hooks"),
                               (ClassificationConfig(spatial_size=(16, 16, 16), channels=(8, 16)), "all", "vmap")):
        model = config.build_model()
        apply_trainable_part(model, config.replace(dp_noise_multiplier=1.0, dp_part=part))
        assert default_per_sample_mode(model) == mode, (type(config).__name__, part)


def test_a_case_gradient_by_vmap_never_depends_on_another_case_even_when_the_loss_mixes_the_batch():
    """DP-SGD clips each patient's gradient; a loss that mixed the batch (here: each output minus the batch's
    mean) would let one patient's data into another's clipped gradient. By vmap each case's loss sees that case
    alone, so changing case 1 leaves case 0's gradient as it was."""
    torch.manual_seed(0)
    config = SegmentationConfig(dp_epsilon=8.0, roi_size=(32, 32, 32))
    stateless = Stateless(config.build_model())

    def mixing_loss(b):
        out = stateless(b["x"])
        return {"loss": (out - out.mean(0, keepdim=True)).pow(2).mean() + out.mean()}

    x = torch.randn(2, 4, *config.roi_size)
    changed = x.clone()
    changed[1] = torch.randn(4, *config.roi_size) * 3
    first, _ = per_sample_gradients(mixing_loss, stateless, {"x": x})
    second, _ = per_sample_gradients(mixing_loss, stateless, {"x": changed})
    assert any(not torch.allclose(first[n][1], second[n][1]) for n in first)  # case 1's own gradient moved
    scale = max(float(g[0].abs().max()) for g in first.values())
    for name in first:  # equal up to float rounding of the batched kernels
        assert torch.allclose(first[name][0], second[name][0], rtol=1e-5, atol=1e-6 * scale), name


def test_both_ways_of_per_sample_gradients_take_the_same_clipped_step(cases):
    """One DP-SGD step (noise off, a clip that bites) from the same start: the same weights either way."""
    config = SegmentationConfig(**SMALL, lr=1e-2, dp_noise_multiplier=1.0, dp_max_grad_norm=1e-3)
    twice = [cases[0], cases[0]]
    results = []
    for mode in PER_SAMPLE_MODES:
        trainer = SegmentationTrainer(twice, [], config)
        DPSGD.attach(trainer, per_sample=mode).noise_multiplier = 0.0
        model = trainer.build_model()
        out = trainer.train(model, steps=1)
        assert out["steps"] == 1 and math.isfinite(out["train_loss"])
        assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
        results.append((out["train_loss"], model.state_dict()))
    (loss_a, a), (loss_b, b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    start = SegmentationConfig(**SMALL, dp_noise_multiplier=1.0).build_model().state_dict()
    moved = [k for k in a if not torch.equal(a[k], start[k])]
    assert moved  # the step did something
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_dp_changes_the_segmentation_activation_only_when_on():
    plain, dp = SegmentationConfig().model_spec(), SegmentationConfig(dp_noise_multiplier=1.0).model_spec()
    assert "act" not in plain["args"] and dp["args"]["act"][0] == "LEAKYRELU"
    assert {k: v for k, v in dp["args"].items() if k != "act"} == plain["args"]
    assert not any(isinstance(m, torch.nn.PReLU) for m in SegmentationConfig(dp_epsilon=1.0).build_model().modules())


# ---------------------------------------------------------------- client-level DP filters
def _dxo(data, kind="WEIGHT_DIFF"):
    from nvflare.apis.dxo import DXO

    return DXO(data_kind=kind, data=data, meta={"NUM_STEPS_CURRENT_ROUND": 4})


def _filtered(flt, dxo):
    from nvflare.apis.dxo import from_shareable
    from nvflare.apis.fl_context import FLContext

    return from_shareable(flt.process(dxo.to_shareable(), FLContext()))


def _update(scale=10.0, torch_tensors=False):
    rng = np.random.default_rng(0)
    data = {"a": rng.normal(size=(50, 40)).astype(np.float32) * scale, "b": rng.normal(size=300) * scale,
            "steps": np.array([7], dtype=np.int64)}
    return {k: torch.as_tensor(v) for k, v in data.items()} if torch_tensors else data


@pytest.mark.parametrize("torch_tensors", [False, True])
def test_update_norm_clip_bounds_the_norm_and_keeps_small_updates(torch_tensors):
    from fedbrain.privacy.client_dp import UpdateNormClip, update_norm

    big, small = _update(10.0, torch_tensors), _update(1e-3, torch_tensors)
    out = _filtered(UpdateNormClip(max_norm=5.0), _dxo(big))
    assert update_norm(out.data) == pytest.approx(5.0, rel=1e-5)
    assert out.get_meta_prop("NUM_STEPS_CURRENT_ROUND") == 4
    assert out.data["steps"][0] == 7 and out.data["a"].dtype == big["a"].dtype  # ints untouched, dtypes kept
    same = _filtered(UpdateNormClip(max_norm=5.0), _dxo(small))
    for k in small:
        assert np.array_equal(np.asarray(same.data[k]), np.asarray(small[k]))


def test_client_level_dp_norm_bounded_by_clip_plus_noise_and_epsilon_matches_opacus():
    from fedbrain.contracts import CLIENT_DP_EPSILON_META
    from fedbrain.privacy.client_dp import ClientLevelDP, update_norm

    clip, sigma = 2.0, 0.8
    flt = ClientLevelDP(clip_norm=clip, noise_multiplier=sigma, delta=1e-5)
    update = _update(10.0)
    d = sum(v.size for k, v in update.items() if k != "steps")
    for release in range(1, 4):
        out = _filtered(flt, _dxo(update))
        noise_std = sigma * clip
        # ||clipped + noise|| <= clip + ||noise||, and ||noise|| ~ std * sqrt(d) (chi, tight for d = 2300)
        assert update_norm(out.data) <= clip + noise_std * (math.sqrt(d) + 4)
        residual = np.concatenate([(out.data[k] - update[k] * clip / update_norm(update)).ravel()
                                   for k in ("a", "b")])
        assert residual.std() == pytest.approx(noise_std, rel=0.06)  # the configured scale, not more, not less
        acc = RDPAccountant()
        for _ in range(release):
            acc.step(noise_multiplier=sigma, sample_rate=1.0)
        assert out.get_meta_prop(CLIENT_DP_EPSILON_META) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        assert out.data["steps"][0] == 7


def test_client_dp_filters_follow_the_config():
    from fedbrain.privacy.client_dp import ClientLevelDP, UpdateNormClip, client_dp_filters

    assert client_dp_filters(SegmentationConfig()) == []
    (clip,) = client_dp_filters(SegmentationConfig(client_dp_clip=3.0))
    assert type(clip) is UpdateNormClip and clip.max_norm == 3.0
    (dp,) = client_dp_filters(ClassificationConfig(client_dp_clip=3.0, client_dp_noise=1.1))
    assert isinstance(dp, ClientLevelDP) and dp.std == pytest.approx(3.3)
    with pytest.raises(ValueError, match="client_dp_noise"):
        SegmentationConfig(client_dp_noise=1.0)


@pytest.mark.parametrize("torch_tensors", [False, True])
def test_client_level_dp_on_a_part_clips_and_noises_the_part_and_sends_the_rest_as_zero(torch_tensors):
    """From a public start only the declared part trains: the filter bounds and noises that part, and sends
    exactly 0 for every other entry, even one a job changed (a NaN included), so nothing leaves unnoised."""
    from fedbrain.privacy.client_dp import ClientLevelDP, UpdateNormClip, client_dp_filters, update_norm

    update = _update(10.0, torch_tensors)
    update["b"][0] = float("nan")  # outside the part: must not survive as NaN (NaN * 0 is NaN)
    clip, sigma = 2.0, 0.8
    out = _filtered(ClientLevelDP(clip_norm=clip, noise_multiplier=sigma, part=["^a$"]), _dxo(update))
    assert not np.asarray(out.data["b"]).any()
    assert out.data["steps"][0] == 7
    a = np.asarray(update["a"])
    residual = np.asarray(out.data["a"]) - a * clip / np.linalg.norm(a)  # clipped over the part alone
    assert residual.std() == pytest.approx(sigma * clip, rel=0.06)
    clipped = _filtered(UpdateNormClip(max_norm=clip, part=["^a$"]), _dxo(update))
    assert update_norm(clipped.data) == pytest.approx(clip, rel=1e-5) and not np.asarray(clipped.data["b"]).any()
    with pytest.raises(ValueError, match="names no entry"):
        _filtered(ClientLevelDP(clip_norm=clip, noise_multiplier=sigma, part=["^nothing$"]), _dxo(update))

    # the config's trained part reaches the filter only from a start (random weights: everything trains)
    (whole,) = client_dp_filters(ClassificationConfig(client_dp_clip=1.0, client_dp_noise=1.0))
    assert whole.part is None
    started = ClassificationConfig(client_dp_clip=1.0, client_dp_noise=1.0, start_model="sha256:" + "0" * 64)
    (part,) = client_dp_filters(started)
    assert part.part == list(ClassificationConfig.PARTS[ClassificationConfig.DP_PART_DEFAULT])
    names = ["stream_mri.conv.weight", "head.weight", "head.bias"]
    assert started.trainable_names(names) == names[1:] and started.replace(dp_part="all").trainable_names(names) == names


# ---------------------------------------------------------------- the report
def test_report_shows_epsilon_per_site_per_round_and_withheld_rounds(tmp_path):
    import json

    from fedbrain.report.job_report import build_report, render_markdown

    ws = tmp_path / "job" / "workspace"
    (ws / "metrics").mkdir(parents=True)
    eps = {"hospital-a": [0.5, 1.0, 1.4], "hospital-b": [0.7, 0.7, 0.7]}
    with open(ws / "metrics" / "round_metrics.jsonl", "w") as f:
        for r in range(3):
            sites = []
            for name, curve in eps.items():
                m = {"val_dice_wt": 0.5, DP_EPSILON_SPENT: curve[r], DP_DELTA: 1e-5}
                if name == "hospital-b" and r > 0:
                    m[DP_WITHHELD] = BUDGET_EXHAUSTED
                sites.append({"name": name, "metrics": [{"name": k, "value": v} for k, v in m.items()]})
            f.write(json.dumps({"round": r, "aggregated_metrics": [], "sites": sites}) + "\n")
    report = build_report(tmp_path / "job")
    assert report["privacy"]["hospital-a"]["epsilon"] == {0: 0.5, 1: 1.0, 2: 1.4}
    assert report["privacy"]["hospital-b"]["withheld"] == [{"round": 1, "reason": "privacy budget exhausted"},
                                                           {"round": 2, "reason": "privacy budget exhausted"}]
    text = render_markdown(report, [])
    assert "## Differential privacy" in text and "| 2 | 1.400 | 0.700 |" in text
    assert "hospital-b withheld its update in round 1: privacy budget exhausted" in text


def test_a_budget_turns_require_dp_on_unless_the_hospital_turns_it_off():
    """A budget with require_dp off let every job without DP through, uncounted (issue 25)."""
    assert SiteBudget.from_site_json({"dp_budget": {"epsilon": 8.0}}).require_dp
    assert not SiteBudget.from_site_json({"dp_budget": {"epsilon": 8.0}, "require_dp": False}).require_dp
    assert not SiteBudget.from_site_json({}).require_dp


def _budgeted(tmp_path, cases, **site):
    config = SegmentationConfig(**SMALL, dp_noise_multiplier=NOISE)
    trainer = SegmentationTrainer(cases, [], config)
    settings = SiteSettings(site="hospital-x", datalist=site.pop("datalist", tmp_path / "data" / "datalist.json"),
                            budget=SiteBudget(epsilon=1e6, delta=1e-5), workspace=tmp_path / "site")
    return trainer, SitePrivacy(trainer, settings, "hospital-x")


def test_moving_the_datalist_does_not_restart_the_same_patients(cases, tmp_path):
    trainer, privacy = _budgeted(tmp_path, cases)
    _rounds(privacy, trainer, trainer.build_model(), 1)
    trainer, moved = _budgeted(tmp_path, cases, datalist=tmp_path / "rebuilt" / "elsewhere.json")
    assert moved.spent() == pytest.approx(_offline_epsilon(2, 0.5, 1e-5), rel=1e-9)
    # keyed by salted hashes: no case ID is in the ledger, and the salt is readable by the site's account only
    ledger_text = (tmp_path / "site" / "privacy" / "ledger.jsonl").read_text()
    ids = [c["case_id"] for c in cases if c.get("case_id")]
    assert ids and not [i for i in ids if i in ledger_text]
    assert (tmp_path / "site" / "privacy" / "ledger.salt").stat().st_mode & 0o077 == 0
    other = make_cases(tmp_path / "others", 3, prefix="OTHER", seed=101)  # other patients start fresh
    assert _budgeted(tmp_path, other)[1].spent() == 0.0


def _container_workspace(root: Path) -> Path:
    """A workspace as FLARE's sub_start.sh lays it out under NVFL_WORKSPACE (fedbrain's Docker and Kubernetes
    images): the kit copied afresh into kit/ at every start, startup/ and local/ links into it."""
    import shutil

    ws = root / "site"
    shutil.rmtree(ws / "kit", ignore_errors=True)
    for part in ("startup", "local"):
        (ws / "kit" / part).mkdir(parents=True)
        (ws / "kit" / part / "from_the_kit.txt").write_text("as signed\n")
        if not (ws / part).is_symlink():
            (ws / part).symlink_to(ws / "kit" / part)
    return ws


def test_a_container_restart_keeps_the_ledger_usable(cases, tmp_path):
    ws = _container_workspace(tmp_path)
    trainer, privacy = _budgeted(tmp_path, cases)
    assert privacy.ledger.workspace == ws
    _rounds(privacy, trainer, trainer.build_model(), 2)
    ledger = PrivacyLedger(ws)
    assert ledger.head_path == ws / "privacy_ledger_head.json" and ledger.head_path.is_file()
    _container_workspace(tmp_path)  # the container restarts: kit/ (local/ with it) is copied in again
    trainer, privacy = _budgeted(tmp_path, cases)
    rounds = _rounds(privacy, trainer, trainer.build_model(), 1, job="job-2", first=3)
    assert rounds[0].get(DP_WITHHELD) is None and rounds[0]["steps"] > 0
    assert privacy.spent() == pytest.approx(_offline_epsilon(3 * 2, 0.5, 1e-5), rel=1e-9)


@pytest.mark.parametrize("tamper", ["edit", "truncate", "delete", "delete_head"])
def test_a_tampered_ledger_refuses_the_next_dp_job_in_one_line(cases, tmp_path, tamper, caplog):
    trainer, privacy = _budgeted(tmp_path, cases)
    _rounds(privacy, trainer, trainer.build_model(), 2)
    ledger = PrivacyLedger(tmp_path / "site")
    lines = ledger.path.read_text().splitlines()
    assert len(lines) == 3  # the cohort, then one release per round
    if tamper == "edit":
        ledger.path.write_text("\n".join([lines[0], lines[1].replace('"steps": [[1.3, 0.5, 2]]', '"steps": []'),
                                          lines[2]]) + "\n")
    elif tamper == "truncate":
        ledger.path.write_text("\n".join(lines[:2]) + "\n")
    elif tamper == "delete":
        ledger.path.unlink()
    else:
        ledger.head_path.unlink()
    trainer, privacy = _budgeted(tmp_path, cases)
    with caplog.at_level(logging.ERROR, logger="fedbrain"):
        rounds = _rounds(privacy, trainer, trainer.build_model(), 2)
    assert [r.get(DP_WITHHELD) for r in rounds] == [LEDGER_BROKEN, LEDGER_BROKEN]
    assert [r["steps"] for r in rounds] == [0, 0]
    (line,) = [r.message for r in caplog.records if "privacy ledger" in r.message]
    expected = {"edit": "does not follow the one before", "truncate": "(truncated?)", "delete": "is missing",
                "delete_head": "head record"}[tamper]
    assert expected in line and "hospital-x" in line and "\n" not in line


def test_a_release_without_dp_makes_epsilon_infinite_for_those_patients(cases, tmp_path):
    config = SegmentationConfig(**SMALL)
    trainer = SegmentationTrainer(cases, [], config)
    settings = SiteSettings(site="hospital-x", datalist=tmp_path / "dl.json", workspace=tmp_path / "site",
                            budget=SiteBudget(epsilon=8.0, delta=1e-5, require_dp=False))
    (r,) = _rounds(SitePrivacy(trainer, settings, "hospital-x"), trainer, trainer.build_model(), 1)
    assert r["steps"] > 0 and r[DP_EPSILON_SPENT] == math.inf
    # FLARE's metrics writer drops non-finite numbers: what leaves says "unbounded" as a finite flag
    for share in ("all", "minimal"):
        sent = SiteBudget(epsilon=8.0, share_metrics=share).shared_metrics(r, n_val=10, dp_sgd=False)
        assert DP_EPSILON_SPENT not in sent and sent["dp_epsilon_unbounded"] == 1, share
        assert all(math.isfinite(v) for v in sent.values() if isinstance(v, float)), sent
    trainer, privacy = _budgeted(tmp_path, cases)  # a later DP job on the same patients, with a budget
    assert privacy.spent() == math.inf and privacy.withhold() == BUDGET_EXHAUSTED


def test_concurrent_jobs_see_each_others_releases_before_their_next(cases, tmp_path):
    t1, p1 = _budgeted(tmp_path, cases)
    t2, p2 = _budgeted(tmp_path, cases)
    _rounds(p1, t1, t1.build_model(), 1, job="job-1")
    _rounds(p2, t2, t2.build_model(), 1, job="job-2")
    assert p2.spent() == pytest.approx(_offline_epsilon(4, 0.5, 1e-5), rel=1e-9)  # job-1's round counted


def test_legacy_per_datalist_accountant_files_bound_every_patient(tmp_path):
    import json

    old = tmp_path / "site" / "privacy" / "data-abc" / "accountant.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"accountant": "rdp", "history": [[1.0, 0.5, 4]], "jobs": {}}))
    ledger = PrivacyLedger(tmp_path / "site")
    assert ledger.import_legacy() == 1 and ledger.import_legacy() == 0
    assert ledger.history_for(ledger.patients(["anyone"])) == [(1.0, 0.5, 4)]


def test_a_site_refuses_to_build_on_a_global_model_from_too_few_trained_sites(cases, tmp_path, caplog):
    from fedbrain.privacy.budget import TOO_FEW_TRAINED

    trainer = SegmentationTrainer(cases, [], SegmentationConfig(**SMALL))
    privacy = SitePrivacy(trainer, _site(tmp_path, SiteBudget(min_trained_sites=3)), "hospital-x")
    assert privacy.withhold(None) == 0 and privacy.withhold(3) == 0  # the initial model; enough sites
    with caplog.at_level(logging.ERROR, logger="fedbrain"):
        assert privacy.withhold(2) == TOO_FEW_TRAINED
    assert any("comes from 2 trained site(s), fewer than this site's minimum 3" in r.message for r in caplog.records)
    assert SiteBudget.from_site_json({}).min_trained_sites == 2
    assert SiteBudget.from_site_json({"min_trained_sites": 4}).min_trained_sites == 4
    with pytest.raises(ValueError, match="min_trained_sites must be an integer >= 2"):
        SiteBudget.from_site_json({"min_trained_sites": 1})


def test_what_metrics_leave_follows_the_hospitals_rules():
    metrics = {"val_dice": 0.8, "val_dice_wt": 0.9, "train_loss": 0.3, "n_train": 12.0, "n_val": 3.0,
               "site_error": 0.0, "train_steps": 6, "dp_epsilon_spent": 1.5, "round_seconds": 4.0}
    default = SiteBudget.from_site_json({})
    few = default.shared_metrics(metrics, n_val=3, dp_sgd=False)  # 3 < 5 validation cases: no per-site Dice
    assert "val_dice" not in few and "val_dice_wt" not in few and few["train_loss"] == 0.3
    enough = default.shared_metrics(metrics, n_val=5, dp_sgd=True)  # DP-SGD: the un-noised loss stays home
    assert enough["val_dice"] == 0.8 and "train_loss" not in enough
    minimal = SiteBudget.from_site_json({"share_metrics": "minimal"}).shared_metrics(metrics, n_val=50, dp_sgd=False)
    assert minimal == {"site_error": 0.0, "train_steps": 6, "dp_epsilon_spent": 1.5}
    with pytest.raises(ValueError, match="share_metrics"):
        SiteBudget.from_site_json({"share_metrics": "some"})
    with pytest.raises(ValueError, match="min_validation_cases"):
        SiteBudget.from_site_json({"min_validation_cases": 0})


def test_dp_noise_never_comes_from_a_seed_the_job_knows():
    """Every generator that draws privacy noise is seeded from os.urandom: with the process's global seeds fixed
    (as a job's seed would fix them), two filters and two DP-SGD generators still draw different noise."""
    import numpy as np
    import torch

    from fedbrain.privacy.client_dp import ClientLevelDP
    from fedbrain.privacy.dpsgd import os_generator

    draws = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        draws.append((ClientLevelDP(clip_norm=1.0, noise_multiplier=1.0)._rng.standard_normal(4),
                       torch.randn(4, generator=os_generator())))
    assert not np.allclose(draws[0][0], draws[1][0]) and not torch.allclose(draws[0][1], draws[1][1])
