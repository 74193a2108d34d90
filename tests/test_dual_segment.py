"""Dual-stream (MRI + CT) segmentation: data chain, network, and a site without CT.

The synthetic consortium's first two hospitals have DICOM CT, the third has none (as in the
demo), so the same code path serves a CT site and a site without CT.
"""

from __future__ import annotations

import pytest
import torch

from fedbrain.tasks.segmentation import SegmentationConfig, SegmentationTrainer

SMALL = dict(streams=("mri", "ct"), spacing=6.0, roi_size=(32, 32, 32), init_filters=4, ct_filters=2,
             num_threads=1, max_steps=2)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """{site: (training, validation)} of a 3-hospital synthetic consortium (CT at two of them)."""
    from fedbrain.data.datalist import load_datalist
    from fedbrain.synthetic.cohort import synthesize_consortium

    root = tmp_path_factory.mktemp("dual")
    manifest = synthesize_consortium(root, sites=3, cases=4, seed=2, progress=False)
    out = {}
    for site in manifest["sites"]:
        data = load_datalist(root / site["datalist"])
        out[site["name"]] = (data["training"], data["validation"])
    return out


def _ct_site(sites, with_ct: bool) -> str:
    return next(s for s, (train, _) in sites.items() if all(bool(c.get("ct")) == with_ct for c in train))


def test_config_streams_and_model_spec():
    assert SegmentationConfig().model_spec()["class_path"].endswith("SeededUNet")
    dual = SegmentationConfig(streams=("mri", "ct"))
    assert dual.ct and dual.model_spec()["class_path"].endswith("DualStreamSegNet")
    assert SegmentationConfig.from_json(dual.to_json()) == dual
    with pytest.raises(ValueError, match="streams must be one of"):
        SegmentationConfig(streams=("ct",))
    # SegResNet needs multiples of 8, the UNet 16; the CT stream (three poolings) 8.
    assert SegmentationConfig(arch="segresnet", roi_size=(40, 40, 40), streams=("mri", "ct")).size_divisor == 8
    with pytest.raises(ValueError, match="multiple of 8 for segresnet with the CT stream"):
        SegmentationConfig(arch="segresnet", roi_size=(36, 40, 40), streams=("mri", "ct"))


def test_ct_channels_follow_the_mri(sites):
    """Six channels; the CT ones hold tissue inside the brain, zeros outside it and without CT."""
    from fedbrain.data.dataset import load_cases
    from fedbrain.data.transforms import segmentation_transforms

    ct_site, plain_site = _ct_site(sites, True), _ct_site(sites, False)
    transform = segmentation_transforms(False, spacing=6.0, k_divisible=16, ct=True)
    (ds, skipped), (ds_plain, _) = (load_cases(sites[s][0][:1], transform, ct=True) for s in (ct_site, plain_site))
    assert not skipped
    image = ds[0]["image"].as_tensor()
    assert image.shape[0] == 6 and ds[0]["label"].shape[1:] == image.shape[1:]
    brain = (image[:4] != 0).any(0)
    ct = image[4:]
    assert float(ct[0][brain].mean()) > 0.2  # brain tissue (~30-40 HU) in the 0..80 HU window
    assert float(ct[:, ~brain].abs().max()) == 0.0  # masked to the brain: no skull, no air
    assert float(ds_plain[0]["image"][4:].abs().max()) == 0.0
    # The MRI channels are exactly what the MRI-only chain gives.
    mri_only, _ = load_cases(sites[ct_site][0][:1], segmentation_transforms(False, spacing=6.0, k_divisible=16))
    torch.testing.assert_close(image[:4], mri_only[0]["image"])
    # Training crops: the CT follows (MONAI applies one random crop/flip to every key of the item).
    train_ds, _ = load_cases(sites[ct_site][0][:1], segmentation_transforms(True, spacing=6.0, roi_size=32, ct=True),
                             ct=True)
    crop = train_ds[0]["image"].as_tensor()
    assert crop.shape == (6, 32, 32, 32)
    assert float(crop[4].abs().max()) > 0.2


def test_without_ct_the_output_is_the_mri_streams(sites):
    model = SegmentationConfig(**SMALL).build_model().eval()
    x = torch.randn(2, 6, 32, 32, 32)
    x[0, 4:] = 0  # sample 0 has no CT
    with torch.no_grad():
        out, mri = model(x), model.mri(x[:, :4])
    torch.testing.assert_close(out[0], mri[0])
    assert float((out[1] - mri[1]).abs().max()) > 1e-4


def test_a_batch_without_ct_leaves_the_ct_stream_alone(sites):
    """No gradient (not a zero one: Adam's weight decay would move it a full step anyway)."""
    model = SegmentationConfig(**SMALL).build_model().train()
    x = torch.randn(2, 6, 32, 32, 32)
    x[:, 4:] = 0
    model(x).sum().backward()
    assert all(p.grad is None for p in model.ct.parameters())
    assert any(p.grad is not None for p in model.mri.parameters())


@pytest.mark.parametrize("with_ct", [True, False])
def test_site_trains_and_validates(sites, with_ct):
    site = _ct_site(sites, with_ct)
    train, val = sites[site]
    trainer = SegmentationTrainer(train, val, SegmentationConfig(**SMALL))
    model = trainer.build_model()
    ct_before = {k: v.clone() for k, v in model.ct.state_dict().items()}
    stats = trainer.train(model)
    metrics = trainer.validate(model)
    assert stats["steps"] == 2 and stats["train_loss"] == stats["train_loss"]
    assert 0.0 <= metrics["val_dice_wt"] <= 1.0
    moved = max(float((v - ct_before[k]).abs().max()) for k, v in model.ct.state_dict().items())
    assert (moved > 0) == with_ct, f"{site}: CT stream moved by {moved}"


def test_dp_sgd_runs_the_ct_stream_at_a_site_without_ct(sites):
    """Opacus needs every parameter's per-sample gradient: the skip is off while DP-SGD is attached."""
    from fedbrain.privacy.dpsgd import DPSGD

    train, val = sites[_ct_site(sites, False)]
    trainer = SegmentationTrainer(train, val, SegmentationConfig(**SMALL, dp_noise_multiplier=1.0))
    DPSGD.attach(trainer)
    model = trainer.build_model()
    stats = trainer.train(model)
    assert stats["steps"] == 2 and stats["dp_epsilon_spent"] > 0
    assert model.skip_unused_streams  # restored after training
