"""The product's segmentation metrics against the BraTS organisers' own evaluation package.

fedbrain scores Dice with MONAI's DiceMetric and HD95 with MONAI's Hausdorff distance
(``fedbrain.tasks.seg_metrics``), per region (TC, WT, ET). The BraTS challenges score with
``brats-evaluation`` (panoptica underneath): the same whole-volume metrics ("global") and lesion-wise
ones. Here both score the same prediction / ground-truth pairs, as NIfTI files on the input's own grid:
synthetic cases, each ground truth changed the way real predictions err (eroded, dilated, shifted, the
enhancing part missed, a false lesion elsewhere, or left as it is). The product's numbers should agree
with the package's global ones; the lesion-wise ones are shown beside them, and so is what scoring on the
training grid (the job's validation) changes.

brats-evaluation is AGPL-3.0: it is installed into its own venv (bench/work/brats-eval) for this
cross-check only, never into the product's requirements.

    python bench/run.py --only metrics_check      # ~2 min (first run: + the package's install)
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

TITLE = "Metrics: fedbrain's Dice and HD95 against the BraTS evaluation package"
PACKAGE = "brats-evaluation==0.0.10"
REGIONS = ("tc", "wt", "et")
ERRORS = ("as is", "eroded 1 voxel", "dilated 2 voxels", "shifted 2 voxels", "enhancing part missed",
          "false lesion added")
SPACING_MM = 1.5
#: Agreement goals, where both define the metric the same way: to three decimals.
GOAL_DICE, GOAL_HD95 = 1e-3, 1e-3

#: Runs inside the package's venv: pairs (JSON on stdin) -> panoptica's per-region results (JSON on stdout).
EVALUATE = r"""
import json, sys, warnings
from importlib.resources import files
from panoptica import Panoptica_Evaluator
warnings.simplefilter("ignore")
pairs = json.load(sys.stdin)
evaluator = Panoptica_Evaluator.load_from_config(str(files("brats_evaluation").joinpath("configs", "config_gli.yaml")))
out = []
for pred, ref in pairs:
    res = evaluator.evaluate(pred, ref)
    keep = ("global_bin_dsc", "global_bin_hd95", "sq_dsc", "pq_dsc", "tp", "fp", "fn")
    out.append({region: {k: float(v) for k, v in res[region].to_dict(True).items() if k in keep}
                for region in ("tc", "wt", "et")})
print(json.dumps(out))
"""


def package_python(work: Path) -> Path:
    """The venv holding the BraTS package (made on first use)."""
    venv = Path(work) / "brats-eval"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    ok = subprocess.run([str(python), "-c", "import brats_evaluation, panoptica"], capture_output=True).returncode == 0
    if not ok:
        subprocess.run([str(python), "-m", "pip", "install", "-q", PACKAGE], check=True)
    return python


def perturb(label, kind: str, rng):
    """A prediction from a ground truth label map ({0, 1, 2, 4}), erring the way ``kind`` says."""
    import numpy as np
    from scipy import ndimage

    pred = label.copy()
    tumour = label > 0
    if kind == "eroded 1 voxel":
        pred[tumour & ~ndimage.binary_erosion(tumour)] = 0
    elif kind == "dilated 2 voxels":
        pred[ndimage.binary_dilation(tumour, iterations=2) & ~tumour] = 2
    elif kind == "shifted 2 voxels":
        pred = np.roll(label, (2, 1, 0), axis=(0, 1, 2))
    elif kind == "enhancing part missed":
        pred[label == 4] = 1
    elif kind == "false lesion added":
        far = ndimage.distance_transform_edt(~tumour) > 12
        brain = ndimage.binary_erosion(np.ones_like(tumour), iterations=6) & far
        if brain.any():
            centre = np.argwhere(brain)[rng.integers(brain.sum())]
            zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in label.shape)]
            ball = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= 9
            pred[ball] = 4
    return pred


def pooled_hd95_voxels(pred, gt) -> float:
    """HD95 as the package computes it: the 95th percentile of both directions' surface distances pooled
    together, in voxels (it is not given the spacing); from MONAI's surface distances."""
    import numpy as np
    from monai.metrics.utils import get_edge_surface_distance

    if not gt.any():
        return math.nan
    if not pred.any():
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI 1.6 warns about its own deprecated internal argument
        _, distances, _ = get_edge_surface_distance(pred.bool(), gt.bool(), symmetric=True, warn_empty=False)
    return float(np.percentile(np.hstack([d.numpy() for d in distances]), 95))


def product_metrics(pred, label, spacing) -> dict:
    """fedbrain's validation metrics for one case: MONAI Dice (ignore_empty) and seg_metrics.hd95, per region;
    and HD95 defined as the package defines it (to tell an implementation gap from a definition gap)."""
    import torch
    from monai.metrics import DiceMetric
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    from fedbrain.tasks.seg_metrics import hd95

    to_regions = ConvertToMultiChannelBasedOnBratsClasses()
    p = torch.as_tensor(to_regions(pred)).float()
    g = torch.as_tensor(to_regions(label)).float()
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True, get_not_nans=True)
    metric(y_pred=p[None], y=g[None])
    dice, not_nans = metric.aggregate()
    return {r: {"dice": float(dice[i]) if not_nans[i] > 0 else math.nan, "hd95": hd95(p[i], g[i], spacing),
                "hd95_pooled_voxels": pooled_hd95_voxels(p[i], g[i])} for i, r in enumerate(REGIONS)}


def to_grid(label, spacing, target: float):
    """A label map resampled (nearest neighbour) to ``target`` mm: what a job's validation scores on."""
    from scipy import ndimage

    return ndimage.zoom(label, [s / target for s in spacing], order=0)


def run(work: Path, console) -> dict:
    import nibabel as nib
    import numpy as np

    from fedbrain.synthetic.cohort import synthesize_consortium
    from fedbrain.tasks.segmentation import SegmentationConfig

    work = Path(work)
    data, pairs_dir = work / "metrics-data", work / "metrics-pairs"
    pairs_dir.mkdir(parents=True, exist_ok=True)
    synthesize_consortium(data, sites=3, cases=4, seed=11, spacing_mm=SPACING_MM, progress=False)
    labels = sorted(data.rglob("seg.nii.gz"))
    train_grid = float(SegmentationConfig().spacing[0])
    rng = np.random.default_rng(0)
    cases, pairs = [], []
    for i, path in enumerate(labels):
        img = nib.load(path)
        label = np.asarray(img.dataobj).astype(np.uint8)
        spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
        kind = ERRORS[i % len(ERRORS)]
        pred = perturb(label, kind, rng)
        files = []
        for name, arr in (("pred", pred), ("ref", label)):
            out = pairs_dir / f"case{i:02d}-{name}.nii.gz"
            brats = arr.copy()
            brats[arr == 4] = 3  # BraTS 2023+ labels: enhancing tumour is 3
            nib.save(nib.Nifti1Image(brats, img.affine), out)
            files.append(str(out))
        pairs.append(files)
        small_pred, small_label = to_grid(pred, spacing, train_grid), to_grid(label, spacing, train_grid)
        cases.append({"case": path.parent.name, "error": kind, "shape": list(label.shape), "spacing": spacing,
                      "product": product_metrics(pred, label, spacing),
                      "product_training_grid": product_metrics(small_pred, small_label, (train_grid,) * 3)})
    python = package_python(work)
    res = subprocess.run([str(python), "-c", EVALUATE], input=json.dumps(pairs), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"brats-evaluation failed: {res.stderr[-2000:]}")
    for case, brats in zip(cases, json.loads(res.stdout.strip().splitlines()[-1])):
        case["brats"] = brats
    version = subprocess.run([str(python), "-m", "pip", "show", "brats-evaluation"], capture_output=True,
                             text=True).stdout
    return {"cases": cases, "package": PACKAGE, "package_version": next(
        (ln.split(":", 1)[1].strip() for ln in version.splitlines() if ln.startswith("Version")), None),
        "spacing_mm": SPACING_MM, "training_grid_mm": train_grid}


def _pairs(result: dict, metric: str, brats_key: str):
    """(product, package) values where both are finite (the ground truth has the region)."""
    out = []
    for case in result["cases"]:
        for r in REGIONS:
            mine, theirs = case["product"][r][metric], case["brats"][r][brats_key]
            if math.isfinite(mine) and math.isfinite(theirs):
                out.append((r, case["error"], mine, theirs))
    return out


def rows(result: dict) -> list[tuple]:
    dice, hd = _pairs(result, "dice", "global_bin_dsc"), _pairs(result, "hd95", "global_bin_hd95")
    pooled = _pairs(result, "hd95_pooled_voxels", "global_bin_hd95")
    n = len(result["cases"])

    def worst(pairs):
        return max(pairs, key=lambda t: abs(t[2] - t[3]))

    w_dice, w_pooled, w_hd = worst(dice), worst(pooled), worst(hd)
    d_gap, p_gap, h_gap = (abs(w[2] - w[3]) for w in (w_dice, w_pooled, w_hd))
    ratio = [mine / theirs for _, _, mine, theirs in hd if theirs > 0]
    out = [
        (f"Dice, fedbrain (MONAI) vs BraTS package global, {len(dice)} case-regions of {n} cases",
         f"max difference {d_gap:.2g}", f"<= {GOAL_DICE:g}",
         f"worst: {w_dice[0].upper()} of a prediction {w_dice[1]} ({w_dice[2]:.4f} vs {w_dice[3]:.4f})"
         f"; {'met' if d_gap <= GOAL_DICE else 'not met'}"),
        (f"HD95 defined as the package defines it (both directions pooled, in voxels), from MONAI's surface "
         f"distances vs the package, {len(pooled)} case-regions", f"max difference {p_gap:.2g} voxels",
         f"<= {GOAL_HD95:g}", f"worst: {w_pooled[0].upper()} of a prediction {w_pooled[1]} ({w_pooled[2]:.3f} vs "
         f"{w_pooled[3]:.3f}); {'met' if p_gap <= GOAL_HD95 else 'not met'}"),
        ("HD95 as fedbrain reports it (mm; the larger of the two directions' 95th percentiles, MONAI) vs the "
         "package's", f"max difference {h_gap:.2f}", "",
         f"two definitions, not a bug: the package is not given the spacing (its values are voxels: fedbrain's are "
         f"{statistics.median(ratio):.2f}x on this {result['spacing_mm']:g} mm grid, median) and pools both "
         f"directions, so a small false lesion far away can vanish below its 95th percentile (worst: "
         f"{w_hd[0].upper()} of a prediction {w_hd[1]}, {w_hd[2]:.2f} mm vs {w_hd[3]:.2f})"),
    ]
    for r in REGIONS:
        lw = [c["brats"][r]["pq_dsc"] for c in result["cases"] if math.isfinite(c["brats"][r].get("pq_dsc", math.nan))]
        gl = [c["brats"][r]["global_bin_dsc"] for c in result["cases"]
              if math.isfinite(c["brats"][r].get("global_bin_dsc", math.nan))]
        if lw and gl:
            out.append((f"{r.upper()}: lesion-wise (panoptic) Dice vs global Dice, BraTS package, mean over cases",
                        f"{statistics.mean(lw):.3f} vs {statistics.mean(gl):.3f}", "",
                        "lesion-wise counts each missed or false lesion; global does not"))
    shift = [abs(c["product_training_grid"][r]["dice"] - c["product"][r]["dice"]) for c in result["cases"] for r in REGIONS
             if math.isfinite(c["product"][r]["dice"]) and math.isfinite(c["product_training_grid"][r]["dice"])]
    if shift:
        out.append((f"Dice on the training grid ({result['training_grid_mm']:g} mm) vs the input's grid "
                    f"({result['spacing_mm']:g} mm), fedbrain", f"mean absolute difference {statistics.mean(shift):.3f}, "
                    f"max {max(shift):.3f}", "", "what a job's validation (resampled) reports vs what a challenge "
                    "scores; the report's per-site Dice is the training grid's"))
    return out


def notes(result: dict) -> list[str]:
    return [
        f"Package: {result['package']} (installed {result.get('package_version')}), its glioma config "
        "(`config_gli.yaml`, labels 1 NETC, 2 SNFH, 3 ET; fedbrain's label 4 is written as 3). Predictions: each "
        "ground truth with one error applied, in turn: " + ", ".join(ERRORS) + ". Where a region's ground truth "
        "is empty, fedbrain leaves the case out of that region's mean (Dice's ignore_empty; HD95 NaN) and the "
        "package scores it by its edge-case rules: such case-regions are not compared. An empty prediction of a "
        "present region scores the volume's diagonal in fedbrain and infinity in the package: not compared either.",
        "",
    ]
