"""Hand-over as a MONAI bundle: MONAI's own `python -m monai.bundle run` segments a synthetic case."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from fedbrain.bundle import BundleError, export_bundle
from fedbrain.tasks.segmentation import SegmentationConfig

try:
    from .fixtures_seg import make_case
    from .test_report import make_result
except ImportError:
    from fixtures_seg import make_case
    from test_report import make_result


@pytest.fixture
def central(tmp_path):
    """What `fedbrain train --central` leaves: model.pt and config.json."""
    config = SegmentationConfig(spacing=(4.0, 4.0, 4.0), roi_size=(32, 32, 32))
    out = tmp_path / "central"
    out.mkdir()
    torch.save(config.build_model().state_dict(), out / "model.pt")
    (out / "config.json").write_text(config.to_json())
    return out


def test_monai_bundle_run_writes_a_brats_label_map(central, tmp_path):
    bundle = export_bundle(central, tmp_path / "bundle")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 4 and image["channel_def"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "TC", "1": "WT", "2": "ET"}
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["network_def"]["_target_"] == "monai.networks.nets.UNet"  # runs without fedbrain

    case = make_case(tmp_path / "data", "CASE-1", seed=3)
    t1, t1ce, t2, flair = case["image"]
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--t1", t1, "--t1ce", t1ce, "--t2", t2, "--flair", flair,
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    [written] = list((tmp_path / "out").glob("*_seg.nii.gz"))
    seg, source = nib.load(written), nib.load(t1)
    assert seg.shape == source.shape
    np.testing.assert_allclose(seg.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}


def test_a_federated_result_gives_the_per_site_table(central, tmp_path):
    result = make_result(tmp_path, {"hospital-a": [0.5, 0.8], "hospital-b": [0.4, 0.7]},
                         final={"hospital-a": 0.85, "hospital-b": 0.75})
    model = result / "workspace" / "app_server" / "best_FL_global_model.pt"
    torch.save({"model": torch.load(central / "model.pt")}, model)  # FLARE's persistor wraps the state dict
    bundle = export_bundle(result, tmp_path / "bundle", config_file=central / "config.json")
    readme = (bundle / "docs" / "README.md").read_text()
    assert "federated job result (best_FL_global_model.pt: best global model)" in readme
    assert "| hospital-a | 0.750 | 0.850 | 0.650 | 2 | final global model |" in readme
    assert "| hospital-b | 0.650 | 0.750 | 0.550 |" in readme


def test_what_cannot_be_handed_over_is_named(central, tmp_path):
    (tmp_path / "no-model").mkdir()
    with pytest.raises(BundleError, match="no model.pt .* and no best_FL_global_model.pt / FL_global_model.pt"):
        export_bundle(tmp_path / "no-model", tmp_path / "b")
    (central / "model.pt").write_bytes(b"not a model")
    with pytest.raises(BundleError, match=r"model.pt: cannot read the model"):
        export_bundle(central, tmp_path / "b")
    torch.save(SegmentationConfig(arch="segresnet").build_model().state_dict(), central / "model.pt")
    with pytest.raises(BundleError, match="weights do not fit the unet of the task config"):
        export_bundle(central, tmp_path / "b")
    shutil.rmtree(central)
    with pytest.raises(BundleError, match="not found"):
        export_bundle(central, tmp_path / "b")
