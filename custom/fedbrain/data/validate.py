"""The one validator of a case: `fedbrain data check` reports its problems, training skips on them.

Two validators drift: the check once passed 4-D files that training then skipped, and refused
BraTS 2023 labels that training silently turned into background. So both paths call
:func:`case_problems`, and a case is usable exactly when it returns no problem. Each problem is
one string naming the role, the file (relative to the case folder) and the reason; checking
never raises for a bad case, so a site learns about every bad file in one pass.

What is checked, per case: every NIfTI readable to the end (gzip trailer included), 3-D, finite,
not all zero, no contrast a voxel copy of another; the five files on one voxel grid; label values in the datalist's label convention;
the CT series (when listed) one clean stack whose field of view holds the MRI brain in world
coordinates and is not air there (a CT elsewhere would reach the classifier as "CT present"
while every CT voxel it sees is padding).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fedbrain.contracts import (
    AFFINE_ATOL_MM,
    CT_MIN_BRAIN_COVERAGE,
    CT_SERIES_KEY,
    DEFAULT_LABEL_CONVENTION,
    LABEL_CONVENTION_KEY,
    LABEL_CONVENTIONS,
    MRI_CONTRAST_LABELS,
)
from fedbrain.data.dicom import DicomSeriesError, read_ct_series

__all__ = ["case_problems", "ct_brain_coverage", "label_convention_of", "label_problem"]

#: Below this HU a CT voxel is air: a CT that is mostly air inside the MRI brain is not in the MRI's space.
_AIR_HU = -200.0
# At most this many brain voxels are mapped into the CT to measure coverage (a 2 mm sample is exact enough).
_COVERAGE_SAMPLES = 200_000


@dataclass
class _Volume:
    role: str  # "T1", ..., "label"
    name: str  # how problems refer to the file
    shape: tuple
    affine: np.ndarray


def label_convention_of(case: dict) -> str:
    """The case's label convention (the datalist sets it; default BraTS 2018-2021)."""
    return str(case.get(LABEL_CONVENTION_KEY) or DEFAULT_LABEL_CONVENTION)


def label_problem(data, convention: str, name: str) -> str | None:
    """Values of a label file outside its convention (fractions included), or None."""
    allowed = LABEL_CONVENTIONS[convention]
    values = np.unique(np.asarray(data))
    bad = values[~np.isin(values, allowed)]
    if not bad.size:
        return None
    shown = ", ".join(f"{v:g}" for v in bad[:8]) + (f", ... ({len(bad)} distinct)" if len(bad) > 8 else "")
    hint = ""
    for other, other_values in LABEL_CONVENTIONS.items():
        if other != convention and np.isin(bad, other_values).all():
            hint = (f"; these are {other}'s values (enhancing tumour {other_values[-1]}): declare "
                    f"\"{LABEL_CONVENTION_KEY}\": \"{other}\" in the datalist, or relabel "
                    f"{other_values[-1]} -> {allowed[-1]}")
    return (f"label {name}: values outside {{{', '.join(map(str, allowed))}}}: {shown} "
            f"(label convention {convention}{hint})")


def _display_name(path: Path, case_dir: Path | None) -> str:
    """Path relative to the case folder when inside it, else the full path: short but unambiguous."""
    if case_dir is not None and path.is_relative_to(case_dir):
        return str(path.relative_to(case_dir))
    return str(path)


def _verify_gzip(path: Path) -> None:
    """Stream the whole gzip member: nibabel reads only what it needs, so a
    file cut inside its trailer (CRC, length) would otherwise pass."""
    with gzip.open(path, "rb") as stream:
        while stream.read(1 << 20):
            pass


def _load_nifti(path: Path, label: str, problems: list[str]):
    """Load header and data fully; on failure record why and return None."""
    if not path.exists():
        problems.append(f"{label}: file not found ({path})")
        return None
    if not path.is_file():
        problems.append(f"{label}: not a file ({path})")
        return None
    if path.stat().st_size == 0:
        problems.append(f"{label}: empty file (0 bytes)")
        return None
    try:
        if path.name.endswith(".gz"):
            _verify_gzip(path)
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        problems.append(f"{label}: unreadable, truncated or corrupt gzip ({type(exc).__name__}: {exc})")
        return None
    except Exception as exc:  # nibabel raises ImageFileError, OSError, ValueError...
        reason = " ".join(str(exc).split())
        problems.append(f"{label}: unreadable NIfTI ({type(exc).__name__}: {reason})")
        return None
    return image, data


def _describe_affine_difference(affine: np.ndarray, reference: np.ndarray) -> str:
    """Say *how* two affines differ: orientation, voxel size, or origin."""
    parts = []
    codes, ref_codes = nib.aff2axcodes(affine), nib.aff2axcodes(reference)
    if codes != ref_codes:
        parts.append(f"orientation {''.join(codes)} vs {''.join(ref_codes)}")
    zooms = nib.affines.voxel_sizes(affine)
    ref_zooms = nib.affines.voxel_sizes(reference)
    if not np.allclose(zooms, ref_zooms, atol=AFFINE_ATOL_MM):
        parts.append(f"voxel size {tuple(np.round(zooms, 4).tolist())} vs {tuple(np.round(ref_zooms, 4).tolist())}")
    shift = float(np.linalg.norm(affine[:3, 3] - reference[:3, 3]))
    if shift > AFFINE_ATOL_MM:
        parts.append(f"origin shifted by {shift:.3f} mm")
    if not parts:
        parts.append("direction cosines differ")
    max_diff = float(np.max(np.abs(affine - reference)))
    return f"{'; '.join(parts)} (max |difference| {max_diff:.4g})"


def _same_grid(a: _Volume, b: _Volume) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, rtol=0, atol=AFFINE_ATOL_MM)


def _grid_reference(volumes: list[_Volume]) -> _Volume:
    """The grid most files share (ties go to the label, the grid the network learns on), so
    the one odd file is the one named, whichever it is."""
    groups = [next(n for n, ref in enumerate(volumes) if _same_grid(v, ref)) for v in volumes]
    counts = Counter(groups)
    best = max(counts.values())
    label = next((n for n, v in enumerate(volumes) if v.role == "label"), None)
    if label is not None and counts[groups[label]] == best:
        return volumes[label]
    return volumes[next(g for g in groups if counts[g] == best)]


def _check_geometry(volumes: list[_Volume], problems: list[str]) -> _Volume | None:
    """All files must share one voxel grid; report each file off it. Returns the grid, or
    None when some file is off it."""
    if not volumes:
        return None
    reference = _grid_reference(volumes)
    ok = True
    for volume in volumes:
        if _same_grid(volume, reference):
            continue
        ok = False
        where = f"{volume.role} {volume.name}: not on the voxel grid of {reference.role} {reference.name}"
        if volume.shape != reference.shape:
            problems.append(f"{where}: shape {volume.shape} differs from {reference.shape}")
        else:
            problems.append(f"{where}: affine differs: {_describe_affine_difference(volume.affine, reference.affine)}")
    return reference if ok else None


def ct_brain_coverage(ct: np.ndarray, ct_affine: np.ndarray, brain: np.ndarray,
                      mri_affine: np.ndarray) -> tuple[float, float]:
    """``(covered, air)``: the fraction of MRI brain voxels inside the CT's field of view (world
    coordinates), and of those the fraction where the CT (nearest voxel) is air."""
    index = np.argwhere(brain)
    if len(index) > _COVERAGE_SAMPLES:
        index = index[:: len(index) // _COVERAGE_SAMPLES + 1]
    world = index @ mri_affine[:3, :3].T + mri_affine[:3, 3]
    to_ct = np.linalg.inv(ct_affine)
    ct_index = world @ to_ct[:3, :3].T + to_ct[:3, 3]
    inside = np.all((ct_index > -0.5) & (ct_index < np.asarray(ct.shape) - 0.5), axis=1)
    covered = float(inside.mean()) if len(index) else 0.0
    if not inside.any():
        return covered, 1.0
    nearest = np.rint(ct_index[inside]).astype(int)
    air = float((ct[tuple(nearest.T)] < _AIR_HU).mean())
    return covered, air


def _extent(shape, affine: np.ndarray, mask: np.ndarray | None = None) -> str:
    """World bounding box (RAS, mm) of a grid, or of a mask's voxels on it, for messages."""
    index = np.argwhere(mask) if mask is not None else np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = index @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = world.min(0), world.max(0)
    return " ".join(f"{axis} {a:.0f}..{b:.0f}" for axis, a, b in zip("xyz", lo, hi))


def _check_ct(case: dict, case_dir: Path, grid: _Volume | None, brain: np.ndarray | None,
              problems: list[str]) -> None:
    ct = Path(case["ct"])
    name = f"CT {_display_name(ct, case_dir)}"
    try:
        volume, affine = read_ct_series(ct, series_uid=case.get(CT_SERIES_KEY))
    except DicomSeriesError as exc:
        problems.append(f"{name}: {exc.reason}")
        return
    if grid is None or brain is None or not brain.any():
        return  # the MRI problems are already reported; coverage needs a usable MRI
    covered, air = ct_brain_coverage(volume, affine, brain, grid.affine)
    if covered < CT_MIN_BRAIN_COVERAGE:
        problems.append(
            f"{name}: covers {covered:.0%} of the MRI brain (needs {CT_MIN_BRAIN_COVERAGE:.0%}): CT spans "
            f"{_extent(volume.shape, affine)}, brain {_extent(None, grid.affine, brain)} (mm, RAS); "
            "CT and MRI must be in one space (co-registered)")
    elif air > 0.5:
        problems.append(
            f"{name}: is air (below {_AIR_HU:.0f} HU) in {air:.0%} of the MRI brain: the CT is not "
            "co-registered with the MRI")


def _check_files(case: dict, problems: list[str], ct: bool = True) -> None:
    label_path = Path(case["label"])
    case_dir = label_path.parent
    convention = label_convention_of(case)
    if convention not in LABEL_CONVENTIONS:
        problems.append(f"{LABEL_CONVENTION_KEY} {convention!r} is not one of {', '.join(LABEL_CONVENTIONS)}")
        return
    volumes: list[_Volume] = []
    brain = None
    contrasts: dict[str, str] = {}  # voxel digest -> the first contrast that had it
    roles = [MRI_CONTRAST_LABELS[n] if n < len(MRI_CONTRAST_LABELS) else f"image[{n}]"
             for n in range(len(case["image"]))]
    for role, path in [*zip(roles, map(Path, case["image"])), ("label", label_path)]:
        name = _display_name(path, case_dir)
        where = f"{role} {name}"
        loaded = _load_nifti(path, where, problems)
        if loaded is None:
            continue
        image, data = loaded
        if len(image.shape) != 3:
            problems.append(f"{where}: not a 3D volume (shape {tuple(image.shape)})")
            continue
        volumes.append(_Volume(role, name, tuple(image.shape), np.asarray(image.affine, dtype=np.float64)))
        if role == "label":
            problem = label_problem(data, convention, name)
            if problem:
                problems.append(problem)
            continue
        if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
            n_nan, n_inf = int(np.count_nonzero(np.isnan(data))), int(np.count_nonzero(np.isinf(data)))
            if n_nan or n_inf:
                problems.append(f"{where}: non-finite voxels ({n_nan} NaN, {n_inf} Inf)")
                continue
        nonzero = data != 0
        if not nonzero.any():
            problems.append(f"{where}: all voxels are zero (no brain)")
            continue
        digest = hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
        if digest in contrasts:  # one scan copied into another slot: a contrast is missing, not present
            problems.append(f"{where}: same voxels as {contrasts[digest]} (a copied contrast?)")
            continue
        contrasts[digest] = where
        brain = nonzero if brain is None or brain.shape != nonzero.shape else brain | nonzero
        del data

    grid = _check_geometry(volumes, problems)
    if ct and case.get("ct"):
        _check_ct(case, case_dir, grid, brain, problems)


def case_problems(case: dict, *, ct: bool = True) -> list[str]:
    """Every reason a datalist item (as ``load_datalist`` returns it) is unusable; [] when it is fine.
    ``ct=False``: for a job that reads no CT, the case's CT is not read or judged.

    Never raises: a malformed item or an unexpected error becomes a problem string too.
    """
    item = case if isinstance(case, dict) else {}
    images = item.get("image")
    if not isinstance(images, (list, tuple)) or len(images) != len(MRI_CONTRAST_LABELS):
        return [f"expected {len(MRI_CONTRAST_LABELS)} image files ({', '.join(MRI_CONTRAST_LABELS)}), got {images!r}"]
    if not isinstance(item.get("label"), (str, os.PathLike)) or not item.get("label"):
        return ["malformed item: no 'label' path"]
    problems: list[str] = []
    try:
        _check_files(item, problems, ct=ct)
    except Exception as exc:  # a bug or an exotic file must not abort the whole check
        problems.append(f"unexpected error while checking: {type(exc).__name__}: {exc}")
    return problems
