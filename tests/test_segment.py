"""Transforms, robust loading, model and the segmentation loop (fast, CPU).

Most training tests resample the 3 mm fixtures to 6 mm with a 32^3 roi: the same code
path as the real config at an eighth of the cost.
"""

from __future__ import annotations

import logging
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from fedbrain.data.dataset import SkippedCase, load_cases
from fedbrain.data.transforms import segmentation_transforms
from fedbrain.models.segmentation import build_segmentation_model
from fedbrain.tasks.loop import train_central
from fedbrain.tasks.segmentation import SegmentationConfig, SegmentationTrainer

try:
    from .fixtures_seg import make_case, make_cases, truncate
except ImportError:  # tests/ is not a package
    from fixtures_seg import make_case, make_cases, truncate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# One torch thread: immune to CPU oversubscription when other jobs share the cores.
FAST = dict(arch="segresnet", lr=1e-3, spacing=(6.0, 6.0, 6.0), roi_size=(32, 32, 32), seed=0, num_threads=1)
VAL_KEYS = {"val_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    return {
        "root": root,
        "train": make_cases(root, 6, prefix="TR", seed=100),
        "val": make_cases(root, 2, prefix="VA", seed=200),
        # big, bright blobs: the "easy" fixture the learning test relies on
        "easy_train": make_cases(root, 8, prefix="EZ", seed=300, tumour_radius=(9.0, 12.0)),
        "easy_val": make_cases(root, 2, prefix="EZV", seed=400, tumour_radius=(9.0, 12.0)),
    }


# ---------------------------------------------------------------- transforms
def test_train_transform_shapes(data):
    out = segmentation_transforms(True)(dict(data["train"][0]))
    assert out["image"].shape == (4, 64, 64, 64)
    assert out["label"].shape == (3, 64, 64, 64)
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.float32
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}


def test_val_transform_shapes_and_normalisation(data):
    case = data["train"][0]
    out = segmentation_transforms(False)(dict(case))
    image, label = out["image"], out["label"]
    assert image.shape[0] == 4 and label.shape[0] == 3
    assert image.shape[1:] == label.shape[1:]
    assert all(s % 16 == 0 for s in image.shape[1:])
    # cropped to the brain: smaller than the 64x76x64 input but holding all of it
    assert image.shape[1:] != (64, 76, 64) and min(image.shape[1:]) >= 48
    brain = image[3] != 0
    flair = image[3][brain]
    assert abs(float(flair.mean())) < 0.05 and abs(float(flair.std()) - 1) < 0.05


def test_label_conversion_brats_regions(data):
    """4 -> TC, WT, ET; 2 -> WT only; 1 -> TC and WT (checked by voxel counts and nesting)."""
    case = data["train"][1]
    seg = np.asarray(nib.load(case["label"]).dataobj)
    n1, n2, n4 = (int((seg == v).sum()) for v in (1, 2, 4))
    assert n1 and n2 and n4
    label = segmentation_transforms(False)(dict(case))["label"].bool()  # 3 mm: no resampling loss
    tc, wt, et = label
    assert int(et.sum()) == n4
    assert int((tc & ~et).sum()) == n1  # label 1: TC (and WT) but not ET
    assert int((wt & ~tc).sum()) == n2  # label 2: WT only
    assert int(wt.sum()) == n1 + n2 + n4
    assert not (et & ~tc).any() and not (tc & ~wt).any()  # ET within TC within WT


# ---------------------------------------------------------------- model
@pytest.mark.parametrize("arch", ["segresnet", "unet"])
def test_model_output_shape(arch):
    model = SegmentationConfig(arch=arch).build_model().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 64, 64, 64))
    assert out.shape == (1, 3, 64, 64, 64)
    norms = {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}
    assert norms and not any("BatchNorm" in n for n in norms)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown"):
        SegmentationConfig(arch="resnet")
    with pytest.raises(ValueError, match="unknown"):
        build_segmentation_model("resnet", init_filters=8)


# ---------------------------------------------------------------- robust loading
def _bad_cases(root):
    bad = make_cases(root, 6, prefix="BAD", seed=900)
    truncate(bad[0]["image"][3])  # FLAIR cut in half
    os.remove(bad[1]["label"])  # missing label
    for path in bad[2]["image"]:  # all-zero images: no brain
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), path)
    bad[3]["image"] = bad[3]["image"][:3]  # only three modalities
    seg = nib.load(bad[4]["label"])  # label on another grid
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[:, :, :60], seg.affine), bad[4]["label"])
    t2 = nib.load(bad[5]["image"][2])  # NaN intensities
    data = np.asarray(t2.dataobj).copy()
    data[30, 30, 30] = np.nan
    nib.save(nib.Nifti1Image(data, t2.affine), bad[5]["image"][2])
    return bad


def test_bad_cases_are_skipped_and_training_goes_on(data, tmp_path, caplog):
    bad = _bad_cases(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedbrain"):
        trainer = SegmentationTrainer(data["train"][:3] + bad, data["val"][:1], SegmentationConfig(**FAST))
    assert trainer.data_summary() == {"n_train": 3, "n_val": 1, "n_skipped": 6}
    reasons = {s.case_id: s.reason for s in trainer.skipped}
    assert all(isinstance(s, SkippedCase) for s in trainer.skipped)
    assert set(reasons) == {f"BAD-00{i}" for i in range(6)}
    assert "flair.nii.gz" in reasons["BAD-000"] and "unreadable" in reasons["BAD-000"]
    assert "seg.nii.gz" in reasons["BAD-001"] and "not found" in reasons["BAD-001"]
    assert "t1.nii.gz" in reasons["BAD-002"] and "no brain" in reasons["BAD-002"]
    assert "4 image files" in reasons["BAD-003"]
    assert "seg.nii.gz" in reasons["BAD-004"] and "grid" in reasons["BAD-004"]
    assert "t2.nii.gz" in reasons["BAD-005"] and "non-finite" in reasons["BAD-005"]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "fedbrain"]
    assert any("BAD-000" in m and "flair.nii.gz" in m for m in logged)
    assert trainer.train(trainer.build_model(), steps=2)["steps"] == 2


def test_everything_bad_gives_empty_dataset(tmp_path):
    bad = _bad_cases(tmp_path)
    ds, skipped = load_cases(bad, segmentation_transforms(True))
    assert len(ds) == 0 and len(skipped) == 6
    trainer = SegmentationTrainer(bad, [], SegmentationConfig(**FAST))
    out = trainer.train(trainer.build_model(), epochs=1)
    assert out["steps"] == 0 and math.isnan(out["train_loss"])
    assert all(math.isnan(v) for v in trainer.validate(trainer.build_model()).values())


# ---------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def trainer(data):
    return SegmentationTrainer(data["train"][:3], data["val"], SegmentationConfig(**FAST))


def test_trainer_takes_requested_steps(trainer):
    model = trainer.build_model()
    assert len(trainer.train_loader) == 2  # 3 cases at batch 2
    seen = []
    out = trainer.train(model, steps=3, on_step=lambda step, loss: seen.append(step))
    assert out["steps"] == 3 and out["epochs"] == 1.5 and len(seen) == 3
    assert math.isfinite(out["train_loss"]) and len(trainer.last_step_losses) == 3
    assert trainer.train(model, epochs=1)["steps"] == 2
    with pytest.raises(ValueError):
        trainer.train(model, epochs=1, steps=1)


def test_training_runs_channels_last_on_a_cpu_and_hands_the_usual_layout_back(trainer):
    """3D convolutions train faster channels-last on a CPU; what leaves train() (sent, saved) is laid out as before."""
    model = trainer.build_model()
    convs = [p for p in model.parameters() if p.dim() == 5]
    layouts = []
    trainer.train(model, steps=2, on_step=lambda step, loss: layouts.append(
        all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)))
    assert convs and layouts == [True, True]
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(v.is_contiguous() for v in model.state_dict().values())


def test_max_steps_caps_epochs(data):
    t = SegmentationTrainer(data["train"][:3], [], SegmentationConfig(max_steps=1, epochs_per_round=3, **FAST))
    assert t.train(t.build_model())["steps"] == 1


def test_optimizer_persists_across_rounds(trainer):
    """FL rounds: new global weights are loaded into the same model; Adam state carries on."""

    def adam_step():
        return int(next(iter(trainer.optimizer.state.values()))["step"])

    model = trainer.build_model()
    trainer.train(model, steps=1)
    opt, start = trainer.optimizer, adam_step()
    model.load_state_dict(trainer.build_model().state_dict())  # "receive global weights"
    trainer.train(model, steps=1)
    assert trainer.optimizer is opt and adam_step() == start + 1
    # a different model object: optimizer rebuilt for its parameters, moments transferred
    other = trainer.build_model()
    trainer.train(other, steps=1)
    assert trainer.optimizer is not opt and adam_step() == start + 2
    assert trainer.optimizer.param_groups[0]["params"][0] is next(other.parameters())


def test_validate_returns_dice_in_unit_interval_and_hd95_in_mm(trainer):
    torch.manual_seed(0)
    out = trainer.validate(trainer.build_model())
    assert set(out) == VAL_KEYS | {"val_hd95", "val_hd95_tc", "val_hd95_wt", "val_hd95_et"}
    assert all(0.0 <= v <= 1.0 for k, v in out.items() if k.startswith("val_dice")), out
    assert all(0.0 <= v for k, v in out.items() if k.startswith("val_hd95")), out  # mm
    assert out["val_hd95"] == pytest.approx((out["val_hd95_tc"] + out["val_hd95_wt"] + out["val_hd95_et"]) / 3)
    assert out["val_dice"] == pytest.approx((out["val_dice_tc"] + out["val_dice_wt"] + out["val_dice_et"]) / 3)


def test_validate_ignores_empty_ground_truth(data, tmp_path):
    """A healthy case (no tumour) does not change Dice; a region nobody has is NaN."""
    healthy = make_case(tmp_path, "HEALTHY", seed=5, tumour=False)
    cfg = SegmentationConfig(**FAST)
    model = cfg.build_model()
    with_tumour = SegmentationTrainer([], data["val"][:1], cfg).validate(model)
    mixed = SegmentationTrainer([], data["val"][:1] + [healthy], cfg).validate(model)
    assert mixed == pytest.approx(with_tumour)
    only_healthy = SegmentationTrainer([], [healthy], cfg).validate(model)
    assert all(math.isnan(v) for v in only_healthy.values())


def test_short_training_improves_whole_tumour_dice(data):
    cfg = SegmentationConfig(**{**FAST, "lr": 3e-3})
    trainer = SegmentationTrainer(data["easy_train"], data["easy_val"], cfg)
    torch.manual_seed(0)
    model = trainer.build_model()
    before = trainer.validate(model)["val_dice_wt"]
    trainer.train(model, steps=40)
    after = trainer.validate(model)["val_dice_wt"]
    assert after >= before + 0.4 and after >= 0.6, (before, after)


def test_train_central_logs_per_epoch(data, tmp_path):
    cfg = SegmentationConfig(**FAST)
    trainer = SegmentationTrainer(data["train"][:2], data["val"][:1], cfg)
    model = trainer.build_model()
    history = train_central(trainer, epochs=2, model=model, log_dir=tmp_path / "tb", progress=False,
                            best_path=tmp_path / "best.pt")
    assert [h["epoch"] for h in history] == [1, 2]
    # the best epoch's weights are kept: the first epoch always, the second only if its Dice is higher
    best = [h["epoch"] for h in history if h.get("best")]
    dice = [h["val_dice"] for h in history]
    assert best == ([1, 2] if dice[1] > dice[0] else [1]), (best, dice)
    saved = torch.load(tmp_path / "best.pt")
    same_as_final = all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert same_as_final == (best[-1] == 2)
    for h in history:
        assert VAL_KEYS | {"train_loss", "steps", "n_train", "n_val", "n_skipped"} <= set(h)
        assert h["steps"] == 1 and h["n_train"] == 2
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_config_geometry():
    """The segmentation-only rules (round trips and unknown keys: tests/test_config.py)."""
    cfg = SegmentationConfig(arch="unet", roi_size=[48, 48, 48], spacing=2)
    assert cfg.spacing == (2.0, 2.0, 2.0) and cfg.roi_size == (48, 48, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        SegmentationConfig(arch="unet", roi_size=(40, 40, 40))


def test_progress_bar_does_not_change_training(data):
    """The bar is display only: same steps, same per-step losses, bit-identical weights."""
    runs = []
    for progress in (False, True):
        cfg = SegmentationConfig(**FAST)
        trainer = SegmentationTrainer(data["train"][:3], [], cfg)
        model = trainer.build_model()
        out = trainer.train(model, steps=3, progress=progress)
        runs.append((out["steps"], list(trainer.last_step_losses), model.state_dict()))
    (steps_a, losses_a, state_a), (steps_b, losses_b, state_b) = runs
    assert steps_a == steps_b == 3 and len(losses_a) == 3
    assert losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize("value", [3, 1.5])
def test_training_refuses_the_label_values_data_check_refuses(tmp_path, value):
    """BraTS 2023's enhancing label 3, or a fractional value, once became background silently
    in training while `data check` refused it: one rule now, the case skipped with the reason."""
    import nibabel as nib

    from fedbrain.data.check import check_case

    case = make_case(tmp_path, "LABEL-3", seed=9)
    img = nib.load(case["label"])
    data = np.asarray(img.dataobj).astype(np.float32)
    data[data == 4] = value
    nib.save(nib.Nifti1Image(data, img.affine), case["label"])
    trainer = SegmentationTrainer([case], [], SegmentationConfig(**FAST))
    assert trainer.data_summary()["n_skipped"] == 1
    reason = trainer.skipped[0].reason
    assert "values outside {0, 1, 2, 4}" in reason and f"{value:g}" in reason and "seg.nii.gz" in reason
    if value == 3:
        assert "relabel 3 -> 4" in reason
    checked = check_case(case)
    assert not checked.ok and any("values outside {0, 1, 2, 4}" in p for p in checked.problems)
