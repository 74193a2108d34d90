"""Tiny synthetic BraTS-like NIfTI cases for the segmentation tests.

Shaped like the project's synthetic data (64x76x64 voxels at 3 mm, RAS): an ellipsoid
"brain" with modality-specific intensities and a spherical tumour whose oedema (2),
enhancing rim (4) and necrotic core (1) are nested, bright on FLAIR (whole tumour) and
on T1ce (enhancing rim), so a small network can learn WT quickly.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (64, 76, 64)
SPACING = 3.0
FILES = ("t1", "t1ce", "t2", "flair")


def _affine(spacing: float, shape) -> np.ndarray:
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -np.array(shape) * spacing / 2  # roughly centred world origin
    return aff


def make_case(
    root: Path,
    case_id: str,
    *,
    seed: int = 0,
    tumour: bool = True,
    shape=SHAPE,
    spacing: float = SPACING,
    tumour_radius: tuple[float, float] = (6.0, 9.0),
) -> dict:
    """Write one case under ``root/case_id`` and return its datalist item (absolute paths)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    radii = np.array([0.40 * shape[0], 0.40 * shape[1], 0.38 * shape[2]], dtype=np.float32)[:, None, None, None]
    brain = (((grid - centre) / radii) ** 2).sum(0) <= 1.0

    label = np.zeros(shape, dtype=np.uint8)
    if tumour:
        offset = rng.uniform(-0.35, 0.35, size=3) * radii[:, 0, 0, 0]
        c = centre[:, 0, 0, 0] + offset
        r = rng.uniform(*tumour_radius)  # voxels
        dist = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0))
        label[(dist <= r) & brain] = 2
        label[(dist <= 0.6 * r) & brain] = 4
        label[(dist <= 0.35 * r) & brain] = 1

    base = {"t1": 0.60, "t1ce": 0.50, "t2": 0.40, "flair": 0.35}
    boost = {  # per modality: intensity added for labels 1, 2, 4
        "t1": {1: -0.25, 2: -0.05, 4: -0.10},
        "t1ce": {1: -0.15, 2: 0.05, 4: 0.60},
        "t2": {1: 0.45, 2: 0.40, 4: 0.30},
        "flair": {1: 0.45, 2: 0.60, 4: 0.50},
    }
    affine = _affine(spacing, shape)
    images = []
    for name in FILES:
        img = np.full(shape, base[name], dtype=np.float32)
        for lab, delta in boost[name].items():
            img[label == lab] += delta
        img += rng.normal(0.0, 0.05, size=shape).astype(np.float32)
        img = np.clip(img, 0.01, None) * brain  # skull-stripped: exactly zero outside
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(path))
        images.append(str(path))
    seg = folder / "seg.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), str(seg))
    return {"case_id": case_id, "image": images, "label": str(seg), "grade": "HGG" if tumour else "healthy"}


def make_cases(root: Path, n: int, *, prefix: str = "FIX", seed: int = 0, **kw) -> list[dict]:
    return [make_case(root, f"{prefix}-{i:03d}", seed=seed + i, **kw) for i in range(n)]


def truncate(path: str | Path) -> None:
    """Cut a .nii.gz in half: the header still parses, reading the voxels fails."""
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) // 2])
