"""Dual-stream MRI+CT grade classifier: model, fusion masking, DP-compatibility, splits, data, loop."""

from __future__ import annotations

import importlib
import json
import math
import shutil

import numpy as np
import pytest
import torch

from fedbrain.models.classifier import (
    FUSIONS,
    build_classifier,
    head_parameter_names,
    model_spec,
    shared_parameter_names,
)

SMALL = dict(channels=(8, 16), embed_dim=16, head_hidden=8)  # tiny trunks keep the tests fast
SIZE = (16, 20, 16)


def _inputs(b=3, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, *size, generator=g), torch.randn(b, 2, *size, generator=g)


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("fusion", FUSIONS)
def test_output_shapes_with_and_without_modalities(fusion):
    torch.manual_seed(0)
    model = build_classifier(fusion, **SMALL).eval()
    mri, ct = _inputs()
    ones, zeros = torch.ones(3), torch.zeros(3)
    with torch.no_grad():
        for out in (
            model(mri, ct),  # flags None: both present
            model(mri, ct, has_mri=ones, has_ct=ones),
            model(mri, torch.zeros_like(ct), has_ct=zeros),  # CT missing
            model(torch.zeros_like(mri), ct, has_mri=zeros),  # MRI missing
            model(mri, ct, has_mri=torch.tensor([1.0, 1.0, 0.0]), has_ct=torch.tensor([1.0, 0.0, 1.0])),  # mixed
            model(mri, None),  # a None stream is treated as absent
        ):
            assert out.shape == (3, 3)
            assert torch.isfinite(out).all()


def test_late_fusion_cannot_mask():
    torch.manual_seed(0)
    model = build_classifier("late", **SMALL).eval()
    mri, ct = _inputs()
    with torch.no_grad():
        a = model(mri, ct, has_ct=torch.ones(3))
        b = model(mri, ct, has_ct=torch.zeros(3))
        c = model(mri, ct + 1.0, has_ct=torch.zeros(3))
    assert torch.equal(a, b)  # the flag is ignored ...
    assert not torch.allclose(a, c)  # ... and the CT input always counts


@pytest.mark.parametrize("fusion", ["masked_mean", "attention"])
def test_masked_fusions_ignore_absent_ct(fusion):
    torch.manual_seed(0)
    model = build_classifier(fusion, **SMALL).eval()
    mri, ct = _inputs()
    has_ct = torch.tensor([0.0, 1.0, 0.0])
    with torch.no_grad():
        a = model(mri, ct, has_ct=has_ct)
        b = model(mri, 5.0 * torch.randn_like(ct), has_ct=has_ct)
    assert torch.equal(a[has_ct == 0], b[has_ct == 0])  # absent CT: its tensor has no influence
    assert not torch.allclose(a[has_ct == 1], b[has_ct == 1])  # present CT is used
    # the same holds for MRI
    has_mri = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        a = model(mri, ct, has_mri=has_mri)
        b = model(mri * 3 + 1, ct, has_mri=has_mri)
    assert torch.equal(a[1], b[1])


def test_modality_dropout_never_drops_both():
    torch.manual_seed(0)
    model = build_classifier("masked_mean", modality_dropout=0.9, **SMALL)
    present = torch.ones(2000, 2)
    dropped = model._drop_modalities(present)
    assert (dropped.sum(1) >= 1).all()
    assert 0.8 < float((dropped.sum(1) == 1).float().mean()) < 0.97  # ~p of samples lose one
    assert (dropped[:, 0] == 0).any() and (dropped[:, 1] == 0).any()  # either modality can go
    only_one = torch.tensor([[1.0, 0.0]] * 100)
    assert torch.equal(model._drop_modalities(only_one), only_one)  # a lone modality is kept


def test_head_and_shared_parameter_names():
    model = build_classifier("attention", **SMALL)
    keys = list(model.state_dict())
    head = head_parameter_names(model)
    shared = shared_parameter_names(model)
    assert head and head == [k for k in keys if k.startswith("head.")]
    assert shared == [k for k in keys if not k.startswith("head.")]
    assert any(k.startswith("mri_trunk.") for k in shared) and any(k.startswith("ct_trunk.") for k in shared)
    assert any(k.startswith("fusion.") for k in shared)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # inputs need no grad here
@pytest.mark.parametrize("fusion", FUSIONS)
def test_opacus_compatible(fusion):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = build_classifier(fusion, modality_dropout=0.5, **SMALL)
    assert ModuleValidator.validate(model, strict=False) == []
    assert ModuleValidator.validate(build_classifier(fusion, streams=("mri",), **SMALL), strict=False) == []
    # Per-sample gradients exist for every trainable parameter (what DP-SGD needs).
    gsm = GradSampleModule(model)
    mri, ct = _inputs(b=2, size=(8, 8, 8))
    gsm(mri, ct, has_ct=torch.tensor([1.0, 0.0])).sum().backward()
    for name, p in gsm.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 2, name
    assert head_parameter_names(gsm) == [k for k in gsm.state_dict() if k.startswith("_module.head.")]
    if fusion != "late":  # each stream graded alone reuses fusion and head in one forward: still per-sample
        gsm.zero_grad()
        for p in gsm.parameters():
            p.grad_sample = None
        gsm(mri, ct, has_ct=torch.tensor([1.0, 0.0]), each_stream=True).sum().backward()
        for name, p in gsm.named_parameters():
            assert p.grad_sample is not None and p.grad_sample.shape[0] == 2, name


@pytest.mark.parametrize("fusion", ["masked_mean", "attention"])
def test_each_stream_is_the_model_with_the_other_stream_absent(fusion):
    mri, ct = _inputs()
    model = build_classifier(fusion, init_seed=0, **SMALL).eval()
    one, zero = torch.ones(3), torch.zeros(3)
    with torch.no_grad():
        out = model(mri, ct, one, one, each_stream=True)
        assert out.shape == (3, 3, 3)
        assert torch.allclose(out[:, 0], model(mri, ct, one, one), atol=1e-6)
        assert torch.allclose(out[:, 1], model(mri, ct, one, zero), atol=1e-6)  # MRI alone
        assert torch.allclose(out[:, 2], model(mri, ct, zero, one), atol=1e-6)  # CT alone
    with pytest.raises(ValueError, match="each_stream"):
        build_classifier("late", **SMALL)(mri, ct, each_stream=True)


def test_each_stream_loss_trains_the_ct_stream_alone():
    """With ``stream_loss`` the step's loss has one term per stream; without it only the fused term."""
    from fedbrain.tasks.classification import ClassificationConfig, ClassificationTrainer

    batch = {"mri": torch.randn(2, 4, 16, 20, 16), "ct": torch.rand(2, 2, 16, 20, 16),
             "has_mri": torch.ones(2), "has_ct": torch.tensor([1.0, 0.0]), "label": torch.tensor([0, 2])}
    for weight, names in ((0.5, {"ce_loss", "ce_mri_alone", "ce_ct_alone"}), (0.0, {"ce_loss"})):
        config = ClassificationConfig(stream_loss=weight, channels=(8, 16), embed_dim=16, head_hidden=8)
        trainer = ClassificationTrainer([], [], config)
        model = trainer.build_model()
        terms = trainer.loss_terms(model, batch)
        assert set(terms) == names
        if weight:
            model.eval()  # no modality dropout: the CT term is the CT-alone logits of the one case with CT
            terms = trainer.loss_terms(model, batch)
            with torch.no_grad():
                alone = model(None, batch["ct"][:1], torch.zeros(1), torch.ones(1))
            expected = weight * torch.nn.functional.cross_entropy(alone, batch["label"][:1]) / 2
            assert torch.allclose(terms["ce_ct_alone"], expected, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(fusion="attention"), dict(fusion="late", streams=("ct",)),
                                    dict(fusion="masked_mean", streams=["mri"], modality_dropout=0.3)])
def test_model_spec_round_trip(kwargs):
    spec = json.loads(json.dumps(model_spec(**kwargs, **SMALL)))  # must survive JSON (FLARE config)
    module, name = spec["class_path"].rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**spec["args"])
    original = build_classifier(**kwargs, **SMALL)
    a, b = original.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    with pytest.raises(TypeError):
        model_spec(no_such_arg=1)


def test_max_pool_trunk_keeps_a_small_lesion_visible():
    """Why max is the default: one bright voxel moves the max-pooled embedding, barely the average."""
    from fedbrain.models.classifier import Trunk

    torch.manual_seed(0)
    x = torch.zeros(1, 4, 16, 20, 16)
    lesion = x.clone()
    lesion[0, 1, 8, 10, 8] = 6.0  # a small enhancing spot on T1ce
    shift = {}
    for pool in ("max", "avg"):
        torch.manual_seed(0)
        trunk = Trunk(4, (8, 16), 16, 8, pool).eval()
        with torch.no_grad():
            feats = [trunk.pool(trunk.features(v)).flatten() for v in (x, lesion)]
        shift[pool] = float((feats[1] - feats[0]).abs().max())
    assert shift["max"] > 5 * shift["avg"]
    with pytest.raises(ValueError, match="pool"):
        build_classifier("late", pool="sum", **SMALL)


def test_init_seed_gives_the_same_start():
    torch.manual_seed(123)
    a = build_classifier("attention", init_seed=7, **SMALL).state_dict()
    b = build_classifier("attention", init_seed=7, **SMALL).state_dict()
    c = build_classifier("attention", init_seed=8, **SMALL).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    spec = json.loads(json.dumps(model_spec(fusion="attention", init_seed=7, **SMALL)))
    rebuilt = build_classifier(**spec["args"]).state_dict()
    assert all(torch.equal(a[k], rebuilt[k]) for k in a)  # what FLARE's persistor builds


def test_ct_trunk_compares_the_hemispheres():
    """A symmetric CT adds nothing in the mirror channel; a one-sided hypodensity shows there with
    opposite signs on the two sides, and the CT trunk's embedding moves with it."""
    from fedbrain.models.classifier import LR_AXIS, mirror_difference

    x = torch.rand(1, 2, 16, 20, 16)
    symmetric = (x + x.flip(LR_AXIS)) / 2
    assert mirror_difference(symmetric).shape == (1, 3, 16, 20, 16)
    assert torch.allclose(mirror_difference(symmetric)[:, 2], torch.zeros(1, 16, 20, 16))
    lesion = symmetric.clone()
    lesion[0, 0, 2:5, 8:12, 6:10] -= 0.15  # oedema, ~12 HU darker in the brain window, left only
    diff = mirror_difference(lesion)[0, 2]
    assert diff[2:5, 8:12, 6:10].max() < -0.1 and diff[11:14, 8:12, 6:10].min() > 0.1
    model = build_classifier("masked_mean", streams=("ct",), init_seed=0, **SMALL).eval()
    plain = build_classifier("masked_mean", streams=("ct",), init_seed=0, ct_mirror=False, **SMALL).eval()
    assert model.ct_trunk.features[0].conv.in_channels == 3 and plain.ct_trunk.features[0].conv.in_channels == 2
    with torch.no_grad():
        assert not torch.allclose(model.ct_trunk(lesion), model.ct_trunk(symmetric))
        assert model(None, torch.zeros(1, 2, 16, 20, 16), None, torch.zeros(1)).shape == (1, 3)  # absent CT


def test_single_stream_models():
    mri, ct = _inputs()
    mri_only = build_classifier("masked_mean", streams=("mri",), **SMALL).eval()
    assert mri_only.ct_trunk is None and mri_only.mri_trunk is not None
    with torch.no_grad():
        assert torch.equal(mri_only(mri, ct), mri_only(mri, None))  # CT input ignored
    ct_only = build_classifier("late", streams=("ct",), **SMALL).eval()
    assert ct_only.mri_trunk is None
    assert ct_only(None, ct).shape == (3, 3)


# --------------------------------------------------------------------------- splits


def test_dirichlet_partition_properties():
    from fedbrain.data.splits import class_entropy, dirichlet_partition

    labels = np.random.default_rng(1).integers(0, 3, 240)
    a = dirichlet_partition(labels, 5, 0.3, seed=7)
    assert a == dirichlet_partition(labels, 5, 0.3, seed=7)
    assert a != dirichlet_partition(labels, 5, 0.3, seed=8)
    assert sorted(i for site in a for i in site) == list(range(240))
    for quantity_skew in (True, False):
        for seed in range(5):
            parts = dirichlet_partition(labels, 6, 0.05, seed, min_per_site=10, quantity_skew=quantity_skew)
            assert min(len(p) for p in parts) >= 10
            assert sorted(i for p in parts for i in p) == list(range(240))
    skewed = np.mean([class_entropy(labels, dirichlet_partition(labels, 5, 0.1, s)) for s in range(8)])
    iid = np.mean([class_entropy(labels, dirichlet_partition(labels, 5, 100.0, s)) for s in range(8)])
    assert skewed < iid - 0.5
    with pytest.raises(ValueError):
        dirichlet_partition(labels[:10], 3, 1.0, 0, min_per_site=4)


def test_dirichlet_partition_min_per_class_keeps_every_grade_at_every_site():
    """Dirichlet(0.5) on the demo's grade mix left a site with only HGG (seed 1): the floor gives every
    site every grade, keeps the sizes' floor, and the split still skewed."""
    from fedbrain.data.splits import class_entropy, dirichlet_partition

    labels = np.array([0] * 13 + [1] * 22 + [2] * 37)
    plain = [dirichlet_partition(labels, 3, 0.5, s, min_per_site=18) for s in range(6)]
    assert any(min(np.bincount(labels[p], minlength=3).min() for p in parts) == 0 for parts in plain)
    for seed in range(6):
        parts = dirichlet_partition(labels, 3, 0.5, seed, min_per_site=18, min_per_class=4)
        assert sorted(i for p in parts for i in p) == list(range(len(labels)))
        assert all(np.bincount(labels[p], minlength=3).min() >= 4 for p in parts), seed
        assert min(len(p) for p in parts) >= 18

    def entropy(alpha, floor):
        return np.mean([class_entropy(labels, dirichlet_partition(labels, 3, alpha, s, min_per_class=floor))
                        for s in range(10)])

    assert entropy(0.5, 0) + 0.1 < entropy(0.5, 3) < entropy(100.0, 0) - 0.05  # less skewed than unfloored, not IID
    with pytest.raises(ValueError, match="min_per_class"):
        dirichlet_partition(labels, 3, 0.5, 0, min_per_class=5)  # 13 healthy cannot give 3 sites 5 each


def test_write_partitioned_datalists(tmp_path):
    from fedbrain.data.datalist import load_datalist
    from fedbrain.data.splits import write_partitioned_datalists

    grades = ["healthy"] * 10 + ["LGG"] * 16 + ["HGG"] * 22
    cases = [{"case_id": f"C{i:03d}", "image": [f"rel/C{i}/{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")],
              "label": f"rel/C{i}/seg.nii.gz", "grade": g} for i, g in enumerate(grades)]
    paths = write_partitioned_datalists(cases, tmp_path, ["s1", "s2", "s3"], alpha=0.5, seed=3)
    assert set(paths) == {"s1", "s2", "s3"}
    seen = []
    for site, path in paths.items():
        data = load_datalist(path)
        for section in ("training", "validation"):
            for item in data[section]:
                assert all(p.startswith("/") for p in item["image"])
        train = [i["grade"] for i in data["training"]]
        val = [i["grade"] for i in data["validation"]]
        for g in set(train + val):
            if (train + val).count(g) >= 2:
                assert g in val and g in train, (site, g)
        seen += [i["case_id"] for i in data["training"] + data["validation"]]
    assert sorted(seen) == sorted(c["case_id"] for c in cases)
    assert json.loads((tmp_path / "partition.json").read_text())["alpha"] == 0.5
    with pytest.raises(ValueError):
        write_partitioned_datalists([{**cases[0], "grade": None}] + cases[1:], tmp_path / "x", ["a", "b"], 1.0, 0)


# --------------------------------------------------------------------------- data + training loop


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """2 sites of the synthetic consortium (MRI + DICOM CT + grade), as datalist items."""
    from fedbrain.data.datalist import load_datalist
    from fedbrain.synthetic.cohort import synthesize_consortium

    root = tmp_path_factory.mktemp("consortium")
    manifest = synthesize_consortium(root, sites=2, cases=4, seed=0, progress=False)
    train, val = [], []
    for site in manifest["sites"]:
        data = load_datalist(root / site["datalist"])
        train += data["training"]
        val += data["validation"]
    return train, val


@pytest.fixture(scope="module")
def trainer(cohort):
    from fedbrain.tasks.classification import ClassificationConfig, ClassificationTrainer

    train, val = cohort
    val = [dict(val[0], ct=None)] + val[1:]  # one validation case without CT
    config = ClassificationConfig(fusion="attention", spatial_size=SIZE, channels=(8, 16), embed_dim=16,
                                  head_hidden=8, modality_dropout=0.3, batch_size=4, num_threads=2,
                                  class_weights=True)
    return ClassificationTrainer(train, val, config)


def test_site_without_training_cases_validates_and_does_not_train(cohort):
    """A hospital with only validation cases (or none at all) must not crash its trainer."""
    from fedbrain.tasks.classification import ClassificationConfig, ClassificationTrainer

    _, val = cohort
    config = ClassificationConfig(spatial_size=SIZE, channels=(8, 16), embed_dim=16, head_hidden=8)
    for train_cases, val_cases in (([], val), ([], [])):
        trainer = ClassificationTrainer(train_cases, val_cases, config)
        model = trainer.build_model()
        assert trainer.train(model)["steps"] == 0
        metrics = trainer.validate(model)
        assert metrics["n_val"] == len(val_cases)
        assert math.isnan(metrics["val_bacc"]) == (not val_cases)


def test_multimodal_items(cohort, tmp_path):
    from fedbrain.data.multimodal import classification_transforms, load_classification_cases

    train, _ = cohort
    no_ct = {k: v for k, v in train[0].items() if k != "ct"}
    no_grade = {k: v for k, v in train[1].items() if k != "grade"}
    broken = dict(train[2], case_id="BROKEN-CT", ct=str(tmp_path / "ct"))
    shutil.copytree(train[2]["ct"], tmp_path / "ct")
    (tmp_path / "ct" / "IM0010.dcm").unlink()  # a missing slice: the series reader refuses it
    ds, skipped = load_classification_cases([no_ct, no_grade, broken, train[3]],
                                             classification_transforms(False, spatial_size=SIZE))
    reasons = {s.case_id: s.reason for s in skipped}
    assert set(reasons) == {train[1]["case_id"], "BROKEN-CT"}
    assert "grade" in reasons[train[1]["case_id"]]
    assert "gap" in reasons["BROKEN-CT"] and str(tmp_path / "ct") in reasons["BROKEN-CT"]
    a, b = ds.items
    assert a["mri"].shape == (4, *SIZE) and a["ct"].shape == (2, *SIZE)
    assert float(a["has_ct"]) == 0.0 and float(a["ct"].abs().max()) == 0.0  # missing CT -> zeros
    assert float(b["has_ct"]) == 1.0 and float(b["has_mri"]) == 1.0
    assert 0.0 <= float(b["ct"].min()) and float(b["ct"].max()) <= 1.0 and float(b["ct"][0].max()) > 0
    assert b["label"] == ["healthy", "LGG", "HGG"].index(train[3]["grade"])


def test_ct_lands_on_the_mri_grid(cohort):
    """The synthetic CT shares the MRI's affine, so resampling must reproduce it voxel for voxel."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ResampleToMatchd

    from fedbrain.data.dicom import read_ct_series
    from fedbrain.data.multimodal import LoadCTSeriesd

    case = cohort[0][0]
    chain = Compose([
        LoadImaged(keys="mri", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="mri"),
        LoadCTSeriesd(keys="ct", ref_key="mri"),
        ResampleToMatchd(keys="ct", key_dst="mri"),
    ])
    out = chain({"mri": case["image"], "ct": case["ct"]})
    hu, affine = read_ct_series(case["ct"])
    assert out["ct"].shape == (1, *out["mri"].shape[1:])
    np.testing.assert_allclose(out["ct"].affine.numpy(), affine, atol=1e-4)
    np.testing.assert_allclose(out["ct"][0].numpy(), hu, atol=1e-3)


def test_training_validation_and_fedprox(trainer):
    from fedbrain.models.classifier import head_parameter_names
    from fedbrain.tasks.loop import FedProx

    summary = trainer.data_summary()
    assert summary["n_train"] > 0 and summary["n_val"] > 0 and summary["n_skipped"] == 0
    assert sum(summary["train_class_counts"].values()) == summary["n_train"]
    assert summary["n_val_with_ct"] == summary["n_val"] - 1
    torch.manual_seed(0)
    model = trainer.build_model()

    out = trainer.train(model, steps=2)
    assert out["steps"] == 2 and math.isfinite(out["train_loss"]) and "prox_loss" not in out
    # Without the FedProx algorithm the global weights add no term.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert "prox_loss" not in trainer.train(model, steps=1, global_params=state)

    # FedProx: zero at the global weights, mu/2 ||dw||^2 away from them, head excluded.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    head = head_parameter_names(model)
    assert FedProx(state, 1.0, "cpu", exclude=head).loss_term(model).item() == 0.0
    moved = {k: (v + 0.1 if not k.startswith("head.") else v + 100.0) for k, v in state.items()}
    n_shared = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("head."))
    assert FedProx(moved, 1.0, "cpu", exclude=head).loss_term(model).item() == pytest.approx(0.5 * 0.01 * n_shared,
                                                                                           rel=1e-3)
    old = trainer.config
    trainer.config = old.replace(algorithm="fedprox", fedprox_mu=0.5)
    try:
        prox = trainer.train(model, steps=1, global_params={k: v.numpy() for k, v in moved.items()})
    finally:
        trainer.config = old
    # The head moved by 100 per value: had it been included, the term would be ~1e4 times larger.
    assert 0 < prox["prox_loss"] < 0.5 * 0.5 * 0.011 * n_shared
    # the step's loss: the fused term, each stream graded alone (stream_loss) and the proximal term
    assert prox["train_loss"] == pytest.approx(prox["ce_loss"] + prox["ce_mri_alone"] + prox["ce_ct_alone"]
                                               + prox["prox_loss"])

    for drop in (None, "ct", "mri"):
        metrics = trainer.validate(model, drop=drop)
        assert metrics["n_val"] == summary["n_val"]
        assert 0.0 <= metrics["val_acc"] <= 1.0 and 0.0 <= metrics["val_bacc"] <= 1.0
        assert math.isnan(metrics["val_auc"]) or 0.0 <= metrics["val_auc"] <= 1.0
    with pytest.raises(ValueError):
        trainer.validate(model, drop="pet")
    _check_missing_modality_predictions(trainer, model)


def _check_missing_modality_predictions(trainer, model):
    """A dropped modality reaches the model as absent (zero input *and* flag 0), and only that one."""
    from fedbrain.tasks.loop import plain

    base = trainer.predict(model)
    dropped = {d: trainer.predict(model, drop=d) for d in ("ct", "mri")}
    # What "absent" means to the model: None for the stream, the other stream's own flag kept.
    model.eval()
    with torch.no_grad():
        batches = list(trainer.val_loader)
        absent = {
            "ct": [model(plain(b["mri"]), None) for b in batches],
            "mri": [model(None, plain(b["ct"]), has_ct=plain(b["has_ct"]).float()) for b in batches],
        }
    model.train()
    has_ct = {i["case_id"]: float(i["has_ct"]) == 1.0 for i in trainer.val_ds.items}
    had_ct = np.array([has_ct[c] for c in base["case_ids"]])
    assert had_ct.any() and not had_ct.all()  # the fixture's one validation case without CT
    changed = {d: np.abs(out["probs"] - base["probs"]).max(1) > 1e-5 for d, out in dropped.items()}
    for drop, out in dropped.items():
        assert out["case_ids"] == base["case_ids"] and np.array_equal(out["labels"], base["labels"])
        expected = torch.softmax(torch.cat(absent[drop]).float(), 1).numpy()
        np.testing.assert_allclose(out["probs"], expected, rtol=1e-5, atol=1e-6, err_msg=f"drop={drop}")
    # This fusion uses both streams: dropping CT moves every case that had a CT, and nothing else.
    assert changed["ct"][had_ct].all(), changed["ct"]
    assert np.array_equal(dropped["ct"]["probs"][~had_ct], base["probs"][~had_ct])
    assert changed["mri"].all(), changed["mri"]

    # An MRI-only model has no CT to lose: dropping CT changes nothing; dropping MRI does.
    mri_only = trainer.config.replace(streams=("mri",)).build_model()
    assert mri_only.ct_trunk is None
    mine = trainer.predict(mri_only)
    assert np.array_equal(trainer.predict(mri_only, drop="ct")["probs"], mine["probs"])
    assert (np.abs(trainer.predict(mri_only, drop="mri")["probs"] - mine["probs"]).max(1) > 1e-5).all()


def test_classification_metrics():
    """Exact values on cases small enough to compute by hand (one-vs-rest AUC = share of
    (positive, negative) pairs ranked right, a tie counting 1/2)."""
    from fedbrain.tasks.classification import classification_metrics

    labels = np.array([0, 1, 2, 2])
    perfect = classification_metrics(np.eye(3)[labels] * 0.9 + 0.05, labels)
    assert perfect == {"val_acc": 1.0, "val_bacc": 1.0, "val_auc": 1.0}
    # Reversed: in every column the class's own cases score lowest -> AUC 0 (and every argmax wrong).
    reversed_ = classification_metrics((1.0 - np.eye(3)[labels]) * 0.45 + 0.05, labels)
    assert reversed_ == {"val_acc": 0.0, "val_bacc": 0.0, "val_auc": 0.0}

    # Healthy (class 0) absent: the macro AUC is over LGG and HGG only, whatever column 0 holds.
    probs = np.array([[0.1, 0.6, 0.3],   # LGG, predicted LGG
                      [0.2, 0.3, 0.5],   # LGG, predicted HGG
                      [0.1, 0.4, 0.5],   # HGG
                      [0.2, 0.2, 0.6]])  # HGG
    labels = np.array([1, 1, 2, 2])
    # LGG column: positives 0.6, 0.3 vs negatives 0.4, 0.2 -> 3 of 4 pairs = 0.75.
    # HGG column: positives 0.5, 0.6 vs negatives 0.3, 0.5 -> 3 pairs + 1 tie = 3.5 / 4 = 0.875.
    two = classification_metrics(probs, labels)
    assert two["val_auc"] == pytest.approx((0.75 + 0.875) / 2)
    assert two["val_acc"] == 0.75 and two["val_bacc"] == pytest.approx((1 / 2 + 2 / 2) / 2)

    # Imbalanced: accuracy 4/5, balanced accuracy = mean recall of the present classes
    # (3/4 healthy, 1/1 LGG; HGG absent, not a zero) = 0.875; the ranking is still perfect,
    # so AUC 1.0 although one argmax is wrong (AUC from hard predictions would give 0.875).
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    skewed = classification_metrics(probs, np.array([0, 0, 0, 0, 1]))
    assert skewed["val_acc"] == pytest.approx(0.8)
    assert skewed["val_bacc"] == pytest.approx(0.875)
    assert skewed["val_auc"] == pytest.approx(1.0)

    one_class = classification_metrics(probs, np.array([2, 2, 2, 2, 2]))  # no AUC with one class present
    assert math.isnan(one_class["val_auc"]) and one_class["val_acc"] == 0.0 and one_class["val_bacc"] == 0.0
    empty = classification_metrics(np.zeros((0, 3)), np.zeros(0, np.int64))
    assert all(math.isnan(v) for v in empty.values())


def test_mixed_heads_start_as_the_shared_head_and_only_the_personal_one_stays():
    """Algorithm mixed: logits = shared head + personal head. The personal head adds nothing until its site
    trains it; the site's standard scope (the real ExcludeVars of its privacy.json) removes the personal head and
    nothing else, and the site's final check finds no personal parameter left in what would be sent."""
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.filters.exclude_vars import ExcludeVars

    from fedbrain.contracts import NUM_STEPS_META
    from fedbrain.filters.final_check import payload_problems
    from fedbrain.ops.builder import PERSONAL_PARTS, SCOPE_PARTS
    from fedbrain.tasks.classification_config import ClassificationConfig

    model = build_classifier("masked_mean", shared_head=True, init_seed=4, **SMALL).eval()
    personal = head_parameter_names(model)
    assert personal == [k for k in model.state_dict() if k.startswith("head.")]
    assert [k for k in shared_parameter_names(model) if "head" in k] == [k for k in model.state_dict()
                                                                         if k.startswith("shared_head.")]
    mri, ct = _inputs()
    with torch.no_grad():
        assert torch.equal(model(mri, ct), model.shared_head(model.fusion(
            torch.stack([model.mri_trunk(mri), model.ct_trunk(ct)], 1), torch.ones(3, 2))))
        model.head[-1].bias.add_(torch.tensor([0.0, 0.0, 5.0]))  # a site that learned its own habit
        assert (model(mri, ct).argmax(1) == 2).all()

    update = DXO(DataKind.WEIGHT_DIFF, data={k: v.numpy() for k, v in model.state_dict().items()},
                 meta={NUM_STEPS_META: 3}).to_shareable()
    assert "personal parameters" in " ".join(payload_problems(update, SCOPE_PARTS["standard"], PERSONAL_PARTS))
    sent = ExcludeVars(exclude_vars=PERSONAL_PARTS).process(update, FLContext())
    assert sorted(from_shareable(sent).data) == sorted(shared_parameter_names(model))
    assert payload_problems(sent, SCOPE_PARTS["standard"], PERSONAL_PARTS, steps_sent=3) == []

    # The spec names the shared head only when there is one: starts and specs saved before it still match.
    assert "shared_head" not in ClassificationConfig().model_spec()["args"]
    assert ClassificationConfig(algorithm="mixed").model_spec()["args"]["shared_head"] is True
    with pytest.raises(ValueError, match="shared grade head that a start model does not have"):
        ClassificationConfig(algorithm="mixed", start_model="start.pt")
