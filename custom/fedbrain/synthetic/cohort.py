"""Synthetic multi-hospital brain-tumour consortium (MRI + labels + paired CT).

No real BraTS data can be fetched in this environment, yet the demo must train a
3D segmentation net and a grade classifier across hospitals that genuinely
differ. So this module fakes a consortium that is *plausible enough to learn
from and non-IID in the ways real consortia are*:

* anatomy: the MNI152 2009a template shipped inside nilearn (T1, GM and WM
  probability maps; CSF = brain mask - GM - WM), warped per case by a small
  random affine + smooth displacement so no two heads are identical;
* tumours: irregular blobs seeded in white matter, BraTS labels
  (1 necrotic / non-enhancing core, 2 oedema, 4 enhancing rim) with oedema
  creeping along white matter and a mass effect pushing tissue aside;
* MRI: T1, T1ce, T2 and FLAIR from per-tissue intensities with partial-volume
  mixing, scanner PSF, slice thickness, bias field and Rician noise;
* CT: a paired head CT in HU (skull, scalp, air) with the glioma findings of plain
  CT in :class:`GliomaCT` (calcification, tumour density, haemorrhage, oedema, midline
  shift), each following the *true* grade, written as a DICOM series;
* sites: a :class:`SiteProfile` per hospital skews scanner parameters, grade
  mix and case count, and the last hospital (when there are >= 3) has no CT.

Everything is drawn from ``numpy.random.default_rng`` seeded by
``(seed, site, case)``, so the same seed gives identical arrays.
The on-disk layout is the one in ``docs/CONTRACTS.md``.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.polynomial import legendre
from pydicom.uid import generate_uid
from scipy import ndimage
from scipy.spatial.transform import Rotation

from fedbrain.contracts import GRADES, MRI_CONTRASTS
from fedbrain.data.dicom import write_ct_series

__all__ = [
    "GRADES",
    "MRI_CONTRASTS",
    "LABELS",
    "SiteProfile",
    "GliomaCT",
    "Anatomy",
    "default_site_profiles",
    "public_site_profiles",
    "PUBLIC_ACQUISITION",
    "load_anatomy",
    "synthesize_case",
    "write_case",
    "synthesize_consortium",
]

# GRADES (contracts) are the grades synthesized, in this order.
LABELS = {0: "background", 1: "necrotic / non-enhancing core", 2: "oedema", 4: "enhancing tumour"}

# Relative MR signal per tissue (WM on T1 = 1); one column per contrast in
# MRI_CONTRASTS order. Chosen so the textbook appearances hold: CSF dark on T1
# and FLAIR but bright on T2; oedema bright on T2/FLAIR; the enhancing rim
# bright on T1ce only; necrosis dark on T1/T1ce and bright on T2.
TISSUE_MRI = {
    #              T1    T1ce  T2    FLAIR
    "csf":       (0.30, 0.30, 1.60, 0.12),
    "gm":        (0.70, 0.71, 0.95, 0.85),
    "wm":        (1.00, 1.00, 0.62, 0.62),
    "oedema":    (0.62, 0.63, 1.35, 1.32),
    "necrosis":  (0.28, 0.30, 1.50, 0.55),
    "nonenh":    (0.50, 0.52, 1.25, 1.10),  # LGG solid tumour (BraTS label 1)
    "enhancing": (0.62, 1.90, 1.05, 0.98),
}

# CT attenuation (HU). Contrast enhancement is not modelled on CT (a plain head CT).
TISSUE_HU = {
    "csf": 8.0, "gm": 40.0, "wm": 28.0,
    "oedema": 18.0, "necrosis": 15.0, "nonenh": 24.0, "enhancing": 36.0,
    "scalp": 20.0, "air": -1000.0,
}



@dataclass(frozen=True)
class GliomaCT:
    """What a plain head CT shows of a glioma, one setting per finding with its clinical basis.

    Why: CT must carry grade information of its own, or a dual-stream classifier has nothing
    to learn from it. Every finding follows the tumour's *true* grade (its biology), not how it
    looks on MRI, so an atypical glioma (see :func:`sample_tumour_plan`) keeps the CT signs of
    its grade. Strengths are deliberately weaker than MRI's: no single finding grades a case
    (calcification is absent in most LGG, haemorrhage in most HGG, densities overlap), so CT
    alone should grade better than chance but worse than MRI. Probabilities are per glioma;
    0 switches a finding off. Densities are drawn per case as (mean, sd) HU relative to this
    patient's normal white matter.
    """

    #: Calcification: the classic CT sign of oligodendroglial tumours (calcified in 70-90 %),
    #: seen in ~20 % of diffuse astrocytomas, so ~40 % of LGG overall; rare in glioblastoma
    #: (a few %). Clustered foci of 150-500 HU, a few mm each (MRI shows them poorly).
    calcification_lgg: float = 0.40
    calcification_hgg: float = 0.04
    calcification_hu: tuple = (150.0, 500.0)
    calcification_mm: tuple = (4.0, 9.0)  # diameter of one focus; 1-3 foci per calcified tumour
    #: Cellularity: attenuation rises with cell density (nuclear/cytoplasmic ratio; it tracks
    #: low ADC). Solid high-grade tumour is iso- to hyperdense (~35-45 HU), low-grade tumour
    #: hypo- to isodense (~18-28 HU). This includes non-enhancing HGG: hyperattenuation on CT
    #: flags a non-enhancing glioma as high grade (IDH-wildtype).
    density_hgg_hu: tuple = (8.0, 5.0)
    density_lgg_hu: tuple = (-6.0, 4.0)
    #: Haemorrhage: macroscopic intratumoural bleeding (acute blood 55-80 HU) in ~15-20 % of
    #: glioblastomas at presentation (microbleeds on SWI are far commoner), rare in LGG.
    haemorrhage_hgg: float = 0.20
    haemorrhage_lgg: float = 0.02
    haemorrhage_hu: tuple = (55.0, 80.0)
    haemorrhage_mm: tuple = (6.0, 14.0)
    #: Oedema: vasogenic oedema is hypodense (more water), ~8-14 HU below white matter; its
    #: extent (larger around HGG) comes from the shared tumour geometry, seen on MRI too.
    oedema_hu: tuple = (-14.0, -8.0)
    #: Mass effect and midline shift: a space-occupying lesion pushes the midline (septum,
    #: third ventricle) to the other side; shifts of several mm are common with glioblastoma,
    #: small with LGG for its size. Shift at the midline = this * the tumour's mass-effect
    #: strength (HGG-looking 0.2-0.45 -> 2.4-5.4 mm; LGG-looking 0.05-0.25 -> 0.6-3 mm). It warps
    #: the anatomy, so MRI shows it as well.
    midline_shift_mm: float = 12.0
    midline_sigma_mm: float = 30.0  # reach of the shift around the tumour's level

    def probability(self, finding: str, grade: str) -> float:
        return getattr(self, f"{finding}_{grade.lower()}") if grade in ("LGG", "HGG") else 0.0


_SYNTH_VERSION = 2
_GRID_MULTIPLE = 16  # volume edges divisible by 16: any 4-level U-Net takes whole volumes
_HEAD_MARGIN_MM = 21.0  # room for CSF gap + skull + scalp around the brain
_SUPRATENTORIAL_Z_MM = -10.0  # gliomas seeded above roughly the tentorium


# --------------------------------------------------------------------------- site profiles


@dataclass(frozen=True)
class SiteProfile:
    """Per-hospital scanner and cohort parameters: the sources of non-IID-ness."""

    name: str
    case_factor: float = 1.0  # quantity skew: cases at this site = round(cases * factor)
    grade_mix: dict = field(default_factory=lambda: {"healthy": 0.15, "LGG": 0.35, "HGG": 0.5})
    mri_gain: dict = field(default_factory=lambda: {c: 1000.0 for c in MRI_CONTRASTS})
    gamma: float = 1.0  # intensity non-linearity of the reconstruction
    bias_strength: float = 0.15  # std of the log bias field
    noise_level: float = 0.03  # Rician sigma relative to white matter
    psf_fwhm_mm: float = 1.5  # in-plane blur of the scanner
    slice_thickness_mm: float = 1.0  # through-plane blur (thick 2D slices)
    slice_axis: int = 2  # 2 = axial acquisition
    has_ct: bool = True
    ct_noise_hu: float = 5.0
    ct_offset_hu: float = 0.0  # calibration error of the CT scanner
    ct_psf_sigma_vox: float = 0.35
    #: Tumour size relative to the usual draw (radii x this): a cohort's size mix.
    tumour_scale: float = 1.0
    #: Another MR protocol: per tissue, per contrast (MRI_CONTRASTS order) factors on TISSUE_MRI.
    tissue_contrast: dict = field(default_factory=dict)


def _site_letter(index: int) -> str:
    letters = string.ascii_uppercase
    return letters[index] if index < len(letters) else f"S{index + 1:02d}"


def _default_site_name(index: int) -> str:
    return f"hospital-{string.ascii_lowercase[index]}" if index < 26 else f"hospital-{index + 1}"


def default_site_profiles(n: int, seed: int = 0, names: list[str] | None = None) -> list[SiteProfile]:
    """Profiles for ``n`` hospitals that differ the way real ones do.

    Label skew goes from mostly-HGG (first site) to mostly-LGG (last), quantity
    skew from x1.3 to x0.7, slice thickness cycles 1 / 5 / 4 mm, and the last
    site of three or more has no CT. Scanner gains, gamma, bias and noise are
    drawn from ``seed`` so they are reproducible.
    """
    if n < 1:
        raise ValueError("need at least one site")
    names = list(names) if names is not None else [_default_site_name(i) for i in range(n)]
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"need {n} distinct site names, got {names}")
    rng = np.random.default_rng([seed, 0x517E])
    hgg_share = np.linspace(0.7, 0.25, n) if n > 1 else np.array([0.5])
    factors = np.linspace(1.3, 0.7, n) if n > 1 else np.array([1.0])
    thickness = (1.0, 5.0, 4.0)  # 3D isotropic vs. thick 2D clinical stacks
    profiles = []
    for i, name in enumerate(names):
        healthy = float(rng.uniform(0.10, 0.20))
        hgg = float(hgg_share[i])
        base_gain = float(rng.uniform(0.6, 1.6)) * 1000.0
        profiles.append(SiteProfile(
            name=name,
            case_factor=round(float(factors[i]), 3),
            grade_mix={"healthy": round(healthy, 3), "LGG": round(1.0 - healthy - hgg, 3), "HGG": round(hgg, 3)},
            mri_gain={c: round(base_gain * float(rng.uniform(0.85, 1.15)), 1) for c in MRI_CONTRASTS},
            gamma=round(float(rng.uniform(0.8, 1.25)), 3),
            bias_strength=round(float(rng.uniform(0.04, 0.18)), 3),
            noise_level=round(float(rng.uniform(0.015, 0.06)), 4),
            psf_fwhm_mm=round(float(rng.uniform(1.0, 2.5)), 2),
            slice_thickness_mm=round(thickness[i % 3] * float(rng.uniform(0.9, 1.1)), 2),
            has_ct=not (n >= 3 and i == n - 1),
            ct_noise_hu=round(float(rng.uniform(3.0, 8.0)), 2),
            ct_offset_hu=round(float(rng.uniform(-4.0, 4.0)), 2),
        ))
    return profiles


#: The public cohort's names: never a hospital's (``fedbrain pretrain`` refuses hospital data named so).
PUBLIC_PREFIX = "public-"
#: Another MR protocol than the hospitals' (TISSUE_MRI factors, MRI_CONTRASTS order): weaker FLAIR and
#: T2 oedema contrast, a softer enhancing rim, brighter grey matter on T1, as a public challenge
#: cohort pooled from other scanners and sequences differs from one hospital's.
PUBLIC_PROTOCOL = {
    "gm": (1.06, 1.06, 1.0, 0.96),
    "oedema": (1.0, 1.0, 1.07, 1.12),
    "nonenh": (1.0, 1.0, 1.05, 1.1),
    "enhancing": (1.0, 1.12, 1.0, 1.0),
    "necrosis": (1.1, 1.1, 0.95, 1.07),
}


#: How a public cohort's acquisitions were curated, per task (noise level and PSF FWHM in mm, each drawn per
#: centre from its range): a segmentation challenge's (BraTS: co-registered, resampled to 1 mm, little noise or
#: blur) is cleaner than a grading archive's (clinical scans from many centres, as TCIA's glioma collections).
#: How far the public data sits from the hospitals' decides what a public start leaves to learn: with the
#: archive's ranges the segmentation start alone came within 0.04 Dice of fine-tuning (docs/maintainers.md).
PUBLIC_ACQUISITION = {
    "segmentation": {"noise_level": (0.005, 0.015), "psf_fwhm_mm": (1.0, 1.3)},
    "classification": {"noise_level": (0.01, 0.03), "psf_fwhm_mm": (1.0, 1.8)},
}


def public_site_profiles(n: int = 2, seed: int = 0, task: str = "classification") -> list[SiteProfile]:
    """Profiles of a public cohort for ``task`` (what a consortium may pretrain on).

    It differs from the hospitals of :func:`default_site_profiles` the way public data differs
    from a hospital's: other scanners and intensity profiles (another protocol with brighter lesions,
    a stronger intensity non-linearity, 1 mm acquisitions curated as :data:`PUBLIC_ACQUISITION` says),
    another grade and size mix (mostly HGG, larger tumours, few healthy scans) and no CT.
    """
    if task not in PUBLIC_ACQUISITION:
        raise ValueError(f"no public cohort for task {task!r}; one of {sorted(PUBLIC_ACQUISITION)}")
    acquisition = PUBLIC_ACQUISITION[task]
    rng = np.random.default_rng([seed, 0x9B11C])
    profiles = []
    for i in range(n):
        base_gain = float(rng.uniform(200.0, 400.0))
        profiles.append(SiteProfile(
            name=f"{PUBLIC_PREFIX}{i + 1}",
            grade_mix={"healthy": 0.1, "LGG": 0.2, "HGG": 0.7},
            mri_gain={c: round(base_gain * float(rng.uniform(0.7, 1.3)), 1) for c in MRI_CONTRASTS},
            gamma=round(float(rng.uniform(1.25, 1.4)), 3),
            bias_strength=round(float(rng.uniform(0.01, 0.03)), 3),
            noise_level=round(float(rng.uniform(*acquisition["noise_level"])), 4),
            psf_fwhm_mm=round(float(rng.uniform(*acquisition["psf_fwhm_mm"])), 2),
            slice_thickness_mm=1.0,
            has_ct=False,
            tumour_scale=1.3,
            tissue_contrast=PUBLIC_PROTOCOL,
        ))
    return profiles


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class Anatomy:
    """Template maps (source grid) plus the fixed, cropped output grid.

    Cases are sampled straight from the (anti-alias pre-filtered) source grid
    through one warp, so there is a single interpolation per case.
    """

    source: str  # "MNI152 2009a (nilearn)" or "procedural phantom"
    src_affine: np.ndarray
    t1: np.ndarray  # template T1, scaled so white matter ~ 1
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray  # brain mask as a float in [0, 1]
    shape: tuple  # output grid
    affine: np.ndarray  # output grid RAS+ affine
    spacing_mm: float
    centre_mm: np.ndarray  # brain centre (world), pivot of the per-case affine
    seed_points_mm: np.ndarray  # (n, 3) white-matter points deep enough for a tumour
    seed_depth_mm: np.ndarray  # (n,) distance of each seed point to the brain surface


def _procedural_template(resolution: int = 2):
    """A crude head phantom on an MNI-like grid, used only if nilearn's templates fail.

    Ellipsoidal brain, folded cortex from thresholded noise, ventricles and deep
    grey nuclei: enough structure for the rest of the pipeline to run.
    """
    rng = np.random.default_rng(1234)
    step = float(resolution)
    shape = tuple(int(round(n * 2 / step)) for n in (99, 117, 95))
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = (-98.0, -134.0, -72.0)
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3, *shape))

    def ellipsoid(centre, radii):
        return sum(((xyz[a] - centre[a]) / radii[a]) ** 2 for a in range(3))

    wobble = ndimage.gaussian_filter(rng.standard_normal(shape), 6 / step)
    wobble /= wobble.std()
    r = ellipsoid((0, -18, 10), (68, 86, 62))
    mask = (r + 0.03 * wobble < 1).astype(np.float32)
    folds = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5 / step)
    folds /= folds.std()
    depth = ndimage.distance_transform_edt(mask) * step
    cortex = (depth < 3.5 + 1.5 * folds) & (mask > 0)
    ventricles = (ellipsoid((-12, -10, 12), (7, 28, 12)) < 1) | (ellipsoid((12, -10, 12), (7, 28, 12)) < 1)
    nuclei = (ellipsoid((-16, -12, 2), (9, 14, 9)) < 1) | (ellipsoid((16, -12, 2), (9, 14, 9)) < 1)
    sulci = (depth < 6) & (folds > 1.3) & (mask > 0)
    gm = (cortex | nuclei) & ~ventricles & ~sulci
    wm = (mask > 0) & ~gm & ~ventricles & ~sulci
    gm = ndimage.gaussian_filter(gm.astype(np.float32), 0.6) * mask
    wm = ndimage.gaussian_filter(wm.astype(np.float32), 0.6) * mask
    total = np.maximum(gm + wm, 1.0)
    gm, wm = gm / total, wm / total
    csf = np.clip(mask - gm - wm, 0, 1)
    t1 = 0.87 * wm + 0.65 * gm + 0.28 * csf
    return t1, gm, wm, mask, affine


def _mni152_template(resolution: int):
    """MNI152 2009a T1 / GM / WM / brain mask from the nilearn wheel (no download)."""
    from nilearn import datasets

    imgs = (
        datasets.load_mni152_template(resolution=resolution),
        datasets.load_mni152_gm_template(resolution=resolution),
        datasets.load_mni152_wm_template(resolution=resolution),
        datasets.load_mni152_brain_mask(resolution=resolution),
    )
    affine = imgs[0].affine
    for img in imgs[1:]:
        if img.shape != imgs[0].shape or not np.allclose(img.affine, affine):
            raise ValueError("MNI152 templates are not on one grid")
    t1, gm, wm, mask = (np.asarray(img.get_fdata(dtype=np.float32)) for img in imgs)
    return t1, np.clip(gm, 0, 1), np.clip(wm, 0, 1), (mask > 0.5).astype(np.float32), np.asarray(affine, float)


@functools.lru_cache(maxsize=4)
def load_anatomy(spacing_mm: float = 3.0, source: str = "mni152") -> Anatomy:
    """Load the template once and fix the output grid for ``spacing_mm``.

    The grid is the brain bounding box plus room for skull and scalp (none
    below the brain stem, where the template ends), rounded up to a multiple
    of 16 voxels per edge. Cached: a run pays the template load once.
    """
    if not 1.0 <= spacing_mm <= 4.0:
        raise ValueError(f"spacing_mm must be within [1, 4] mm, got {spacing_mm}")
    resolution = 1 if spacing_mm < 2.0 else 2
    name = "MNI152 2009a (nilearn)"
    if source == "mni152":
        try:
            t1, gm, wm, mask, src_affine = _mni152_template(resolution)
        except Exception:  # noqa: BLE001 - any failure: fall back to a phantom, keep the demo running
            source = "procedural"
    if source == "procedural":
        name = "procedural phantom"
        t1, gm, wm, mask, src_affine = _procedural_template(resolution)
    elif source != "mni152":
        raise ValueError(f"unknown anatomy source {source!r}")

    src_step = float(np.mean(np.linalg.norm(src_affine[:3, :3], axis=0)))
    # Anti-alias once: a Gaussian that brings the source resolution to ~spacing_mm.
    sigma = 0.42 * math.sqrt(max((spacing_mm / src_step) ** 2 - 1.0, 0.0))
    wm_ref = float(np.median(t1[wm > 0.9]))
    maps = [t1 / wm_ref, gm, wm, mask]
    if sigma > 0.05:
        maps = [ndimage.gaussian_filter(m, sigma) for m in maps]
    t1, gm, wm, mask = (np.ascontiguousarray(m, dtype=np.float32) for m in maps)
    for m in (t1, gm, wm, mask):
        m.setflags(write=False)

    # Output grid: axis-aligned RAS+, brain bounding box + head margin.
    ijk = np.argwhere(mask > 0.5)
    corners = np.array([[a, b, c] for a in (ijk.min(0)[0], ijk.max(0)[0])
                        for b in (ijk.min(0)[1], ijk.max(0)[1])
                        for c in (ijk.min(0)[2], ijk.max(0)[2])], float)
    world = corners @ src_affine[:3, :3].T + src_affine[:3, 3]
    lo, hi = world.min(0), world.max(0)
    lo_margin = np.array([_HEAD_MARGIN_MM, _HEAD_MARGIN_MM, 0.0])
    if ijk.min(0)[2] > 2:  # brain does not touch the template floor: room for skull below too
        lo_margin[2] = _HEAD_MARGIN_MM
    lo, hi = lo - lo_margin, hi + _HEAD_MARGIN_MM
    n = np.ceil((hi - lo) / spacing_mm).astype(int) + 1
    shape = tuple(int(math.ceil(v / _GRID_MULTIPLE) * _GRID_MULTIPLE) for v in n)
    extra = (np.array(shape) - n) * spacing_mm
    origin = lo - extra / 2.0
    origin[2] = lo[2]  # keep the brain-stem end flush with the volume floor
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = origin

    # Tumour seed points: deep, supratentorial white matter.
    depth = ndimage.distance_transform_edt(mask > 0.5, sampling=src_step)
    points = np.argwhere((wm > 0.85) & (depth >= 14.0))
    points_mm = points @ src_affine[:3, :3].T + src_affine[:3, 3]
    keep = points_mm[:, 2] > _SUPRATENTORIAL_Z_MM
    centre = ijk.mean(0) @ src_affine[:3, :3].T + src_affine[:3, 3]
    return Anatomy(
        source=name, src_affine=src_affine, t1=t1, gm=gm, wm=wm, mask=mask,
        shape=shape, affine=affine, spacing_mm=float(spacing_mm), centre_mm=centre,
        seed_points_mm=points_mm[keep], seed_depth_mm=depth[tuple(points[keep].T)],
    )


# --------------------------------------------------------------------------- smooth random fields


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    """Gaussian random field with unit std: the raw material of irregular borders."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox)
    return field_ / max(float(field_.std()), 1e-6)


def _legendre_grid(coeffs: np.ndarray, shape, degree: int) -> np.ndarray:
    """Sum of products of Legendre polynomials over the volume in [-1, 1]^3.

    Low-order polynomials are the classic model for MR bias fields and give a
    cheap smooth warp; evaluated as outer products, not voxel by voxel.
    """
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float64) for n in shape]
    basis = [[legendre.legval(x, np.eye(degree + 1)[d]) for d in range(degree + 1)] for x in axes]
    out = np.zeros(shape, dtype=np.float64)
    for c, (a, b, d) in zip(coeffs, _legendre_terms(degree)):
        out += c * basis[0][a][:, None, None] * basis[1][b][None, :, None] * basis[2][d][None, None, :]
    return out.astype(np.float32)


def _legendre_terms(degree: int) -> list[tuple[int, int, int]]:
    return [(a, b, d) for a in range(degree + 1) for b in range(degree + 1) for d in range(degree + 1)
            if 0 < a + b + d <= degree]


def _legendre_point(coeffs: np.ndarray, unit_xyz: np.ndarray, degree: int) -> float:
    vals = [[legendre.legval(x, np.eye(degree + 1)[d]) for d in range(degree + 1)] for x in unit_xyz]
    return float(sum(c * vals[0][a] * vals[1][b] * vals[2][d]
                     for c, (a, b, d) in zip(coeffs, _legendre_terms(degree))))


# --------------------------------------------------------------------------- geometry


@dataclass
class TumourPlan:
    """Where and how big the tumour is; needed before warping (mass effect)."""

    grade: str
    centre_mm: np.ndarray  # output (patient) space
    core_radius_mm: float
    oedema_radius_mm: float
    rim_mm: float
    axes: np.ndarray  # ellipsoid axis ratios (geometric mean 1)
    rotation: np.ndarray  # ellipsoid orientation
    mass_effect: float  # k in u(r) = k r exp(-r^2 / 2 s^2)
    mass_sigma_mm: float
    appearance: str = ""  # the grade it looks like on MRI ("" = its own grade)
    midline_shift_mm: float = 0.0  # lateral push at the midline (GliomaCT.midline_shift_mm)
    midline_sigma_mm: float = 30.0

    @property
    def looks_like(self) -> str:
        return self.appearance or self.grade


@dataclass
class Deformation:
    """Per-case head shape: output (patient) point -> template point."""

    scale: np.ndarray  # head size relative to the template, per axis
    rotation: np.ndarray
    shift_mm: np.ndarray
    disp_coeffs: np.ndarray  # (3, n_terms) smooth displacement, mm
    disp_degree: int = 2


def sample_deformation(rng: np.random.Generator) -> Deformation:
    """Head-to-head variation: +-5 % size, a few degrees of tilt, ~1.5 mm wobble."""
    degree = 2
    return Deformation(
        scale=rng.uniform(0.95, 1.05, 3),
        rotation=Rotation.from_euler("xyz", rng.uniform(-4.0, 4.0, 3), degrees=True).as_matrix(),
        shift_mm=rng.uniform(-3.0, 3.0, 3),
        disp_coeffs=rng.normal(0.0, 0.8, (3, len(_legendre_terms(degree)))),
        disp_degree=degree,
    )


def _to_template(points_mm: np.ndarray, anatomy: Anatomy, deform: Deformation,
                 plan: TumourPlan | None, disp: np.ndarray | None = None) -> np.ndarray:
    """Map patient-space points (3, N) to template space: mass effect, wobble, affine."""
    p = points_mm
    if plan is not None and plan.mass_effect > 0:
        rel = p - plan.centre_mm[:, None]
        r2 = np.einsum("in,in->n", rel, rel)
        # Tissue at radius r came from r (1 - k exp(-r^2/2s^2)): pushed outward, monotone for k < 1.
        p = p - plan.mass_effect * rel * np.exp(-r2 / (2.0 * plan.mass_sigma_mm ** 2))
    if plan is not None and plan.midline_shift_mm > 0:
        # The midline level with the tumour shows tissue from the tumour's side: pushed across.
        side = 1.0 if plan.centre_mm[0] >= anatomy.centre_mm[0] else -1.0
        anchor = np.array([anatomy.centre_mm[0], plan.centre_mm[1], plan.centre_mm[2]])
        rel = p - anchor[:, None]
        w = np.exp(-np.einsum("in,in->n", rel, rel) / (2.0 * plan.midline_sigma_mm ** 2))
        p = p + np.array([side, 0.0, 0.0])[:, None] * (plan.midline_shift_mm * w)[None, :]
    if disp is not None:
        p = p + disp
    c = anatomy.centre_mm[:, None]
    return c + deform.rotation.T @ ((p - c) / deform.scale[:, None]) + deform.shift_mm[:, None]


def sample_tumour_plan(rng: np.random.Generator, anatomy: Anatomy, deform: Deformation,
                       grade: str, atypical: float = 0.0, size_scale: float = 1.0) -> TumourPlan | None:
    """Pick a white-matter seed and sizes; WT ~2-6 cm across, HGG with a thicker rim.

    With probability ``atypical`` a glioma looks like the other grade on MRI (an
    enhancing, necrotic LGG; a non-enhancing HGG without necrosis), as a minority do
    in real cohorts: then MRI alone cannot grade it, and the site's grade mix (or the
    CT findings of :class:`GliomaCT`, which follow the true grade) decides. 0 draws nothing extra,
    so cohorts made without it stay identical.
    """
    if grade == "healthy":
        return None
    if not 0.0 <= atypical <= 1.0:
        raise ValueError(f"atypical must be in [0, 1], got {atypical}")
    appearance = grade
    if atypical > 0 and grade in ("LGG", "HGG") and rng.random() < atypical:
        appearance = "HGG" if grade == "LGG" else "LGG"
    sp = anatomy.spacing_mm
    if appearance == "HGG":
        oedema_r = rng.uniform(14.0, 24.0)
        core_r = oedema_r / rng.uniform(1.15, 1.45)
        rim = max(rng.uniform(4.0, 7.0), 1.3 * sp)  # thick enough to survive the PSF
        core_r = max(core_r, rim + 2.5 * sp)
        mass = rng.uniform(0.2, 0.45)
    elif appearance == "LGG":
        oedema_r = rng.uniform(13.0, 24.0)
        core_r = oedema_r / rng.uniform(1.1, 1.4)
        core_r = max(core_r, 1.6 * sp)
        rim = 0.0
        mass = rng.uniform(0.05, 0.25)
    else:
        raise ValueError(f"grade must be one of {GRADES}, got {grade!r}")
    if size_scale != 1.0:  # after every draw: the same cases, only larger or smaller
        oedema_r, core_r = oedema_r * size_scale, core_r * size_scale
    # Seeds deep enough that most of the core stays inside the brain.
    ok = np.flatnonzero(anatomy.seed_depth_mm >= min(0.7 * core_r + 4.0, anatomy.seed_depth_mm.max()))
    seed_template = anatomy.seed_points_mm[rng.choice(ok)]
    # Invert the affine part (mass effect is zero at the centre; wobble taken once).
    c = anatomy.centre_mm
    centre = c + deform.scale * (deform.rotation @ (seed_template - deform.shift_mm - c))
    unit = (np.linalg.solve(anatomy.affine, np.append(centre, 1.0))[:3] / (np.array(anatomy.shape) - 1)) * 2 - 1
    centre = centre - np.array([_legendre_point(deform.disp_coeffs[a], unit, deform.disp_degree) for a in range(3)])
    axes = rng.uniform(0.75, 1.3, 3)
    axes /= np.prod(axes) ** (1 / 3)
    return TumourPlan(
        grade=grade, centre_mm=centre, core_radius_mm=float(core_r), oedema_radius_mm=float(oedema_r),
        rim_mm=float(rim), axes=axes,
        rotation=Rotation.from_euler("zyx", rng.uniform(0.0, 180.0, 3), degrees=True).as_matrix(),
        mass_effect=float(mass), mass_sigma_mm=float(1.2 * core_r),
        appearance="" if appearance == grade else appearance,
    )


@dataclass
class Tissue:
    """Warped tissue fractions on the output grid."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain_frac: np.ndarray  # partial-volume brain fraction (gm + wm + csf)
    brain: np.ndarray  # bool skull-strip mask
    t1_texture: np.ndarray  # template T1 (WM ~ 1): deep nuclei, cortex detail


def warp_anatomy(anatomy: Anatomy, deform: Deformation, plan: TumourPlan | None) -> Tissue:
    """Resample the template maps into this patient's head: one interpolation."""
    shape = anatomy.shape
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    pts = anatomy.affine[:3, :3] @ ijk + anatomy.affine[:3, 3:]
    disp = np.stack([_legendre_grid(deform.disp_coeffs[a], shape, deform.disp_degree).ravel() for a in range(3)])
    src = _to_template(pts, anatomy, deform, plan, disp)
    inv = np.linalg.inv(anatomy.src_affine)
    vox = inv[:3, :3] @ src + inv[:3, 3:]

    def sample(volume):
        return ndimage.map_coordinates(volume, vox, order=1, mode="constant", cval=0.0,
                                       prefilter=False).reshape(shape).astype(np.float32)

    t1, gm, wm, mask = (sample(m) for m in (anatomy.t1, anatomy.gm, anatomy.wm, anatomy.mask))
    mask = np.clip(mask, 0.0, 1.0)
    gm, wm = np.minimum(gm, mask), np.minimum(wm, mask)
    over = np.maximum(gm + wm, 1e-6)
    scale = np.minimum(1.0, mask / over)  # GM + WM never exceed the brain fraction
    gm, wm = gm * scale, wm * scale
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    return Tissue(gm=gm, wm=wm, csf=csf, brain_frac=mask, brain=mask >= 0.5, t1_texture=t1)


# --------------------------------------------------------------------------- tumour


@dataclass
class Tumour:
    """BraTS labels plus soft (partial-volume) fractions for image synthesis."""

    label: np.ndarray  # uint8 in {0, 1, 2, 4}
    necrosis: np.ndarray  # fractions, float32
    nonenh: np.ndarray
    enhancing: np.ndarray
    oedema: np.ndarray
    texture: np.ndarray  # smooth heterogeneity (unit std) inside the lesion


def _soft(score: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction of a region {score < 1}; > 0.5 exactly where labelled."""
    return np.clip(0.5 + (1.0 - score) / max(width, 1e-6), 0.0, 1.0).astype(np.float32)


def grow_tumour(rng: np.random.Generator, tissue: Tissue, anatomy: Anatomy, plan: TumourPlan | None) -> Tumour:
    """Draw an irregular lesion around ``plan.centre_mm`` on the output grid.

    Borders are level sets of distance + smooth noise; the oedema's distance is
    shortened in white matter so it spreads along tracts and stops at cortex.
    """
    shape = anatomy.shape
    zeros = np.zeros(shape, np.float32)
    empty = Tumour(np.zeros(shape, np.uint8), zeros, zeros, zeros, zeros, zeros)
    if plan is None:
        return empty
    sp = anatomy.spacing_mm
    cv = np.linalg.solve(anatomy.affine, np.append(plan.centre_mm, 1.0))[:3]
    half = int(math.ceil(1.9 * plan.oedema_radius_mm / sp)) + 2
    lo = np.maximum(np.floor(cv).astype(int) - half, 0)
    hi = np.minimum(np.floor(cv).astype(int) + half + 1, np.array(shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    bshape = tuple(int(b - a) for a, b in zip(lo, hi))

    ijk = np.indices(bshape, dtype=np.float32).reshape(3, -1) + lo[:, None]
    rel = anatomy.affine[:3, :3] @ (ijk - cv[:, None])  # mm from the centre
    local = (plan.rotation.T @ rel) / plan.axes[:, None]
    dist = np.sqrt(np.einsum("in,in->n", local, local)).reshape(bshape)

    wm = ndimage.gaussian_filter(tissue.wm[box], 0.7)
    csf = tissue.csf[box]
    brain = tissue.brain[box]
    n_core = _smooth_noise(rng, bshape, 5.0 / sp)
    n_nec = _smooth_noise(rng, bshape, 3.0 / sp)
    n_oed = _smooth_noise(rng, bshape, 6.0 / sp)
    texture = _smooth_noise(rng, bshape, 3.0 / sp)

    core_score = dist / plan.core_radius_mm + 0.16 * n_core
    core = _soft(core_score, sp / plan.core_radius_mm) * brain * (csf < 0.6)
    oed_score = dist / plan.oedema_radius_mm * (1.0 + 0.6 * (0.5 - wm)) + 0.12 * n_oed
    oedema = _soft(oed_score, sp / plan.oedema_radius_mm) * brain * (1.0 - csf)

    necrosis = np.zeros(bshape, np.float32)
    nonenh = np.zeros(bshape, np.float32)
    enhancing = np.zeros(bshape, np.float32)
    if plan.looks_like == "HGG":
        nec_r = plan.core_radius_mm - plan.rim_mm
        nec_score = dist / nec_r + 0.18 * n_nec
        necrosis = np.minimum(_soft(nec_score, sp / nec_r), core)
        if not (necrosis > 0.5).any():  # rim ate the whole core: keep a necrotic centre
            c = tuple(int(round(v)) - a for v, a in zip(cv, lo))
            necrosis[c] = core[c] = 1.0
        enhancing = np.clip(core - necrosis, 0.0, 1.0)
    else:
        nonenh = core.copy()
        if rng.random() < 0.25:  # a faint enhancing focus: "little or no" label 4 in LGG
            inside = np.argwhere(core > 0.9)
            if len(inside):
                spot = np.zeros(bshape, bool)
                spot[tuple(inside[rng.integers(len(inside))])] = True
                spot = ndimage.binary_dilation(spot, iterations=1) & (core > 0.9)
                enhancing = np.where(spot, 0.6 * core, 0.0).astype(np.float32)
                nonenh = nonenh - enhancing

    label_box = np.zeros(bshape, np.uint8)
    label_box[(oedema > 0.5) & brain] = 2
    label_box[core > 0.5] = 1
    label_box[(enhancing > 0.5 * core) & (core > 0.5)] = 4
    label_box[(necrosis > 0.5) & (core > 0.5)] = 1
    label_box[~brain] = 0
    oedema = oedema * (1.0 - core)  # oedema fraction in the healthy part of the voxel


    def paste(values, dtype):
        out = np.zeros(shape, dtype)
        out[box] = values
        return out

    return Tumour(
        label=paste(label_box, np.uint8), necrosis=paste(necrosis, np.float32),
        nonenh=paste(nonenh, np.float32), enhancing=paste(enhancing, np.float32),
        oedema=paste(oedema, np.float32), texture=paste(texture, np.float32),
    )


# --------------------------------------------------------------------------- MRI


def _tissue_image(values: dict, tissue: Tissue, tumour: Tumour, texture_amp: dict | None = None,
                  t1_texture_mix: float = 0.0) -> np.ndarray:
    """Partial-volume mixture of tissue values (MR signal or HU) on the output grid."""
    healthy = tissue.gm * values["gm"] + tissue.wm * values["wm"] + tissue.csf * values["csf"]
    if t1_texture_mix:
        # T1-weighted images look like the T1 template: borrow its deep-nuclei detail.
        healthy = (1.0 - t1_texture_mix) * healthy + t1_texture_mix * tissue.t1_texture
    amp = texture_amp or {}
    lesion = lambda key: values[key] * (1.0 + amp.get(key, 0.0) * tumour.texture)  # noqa: E731
    core = tumour.necrosis + tumour.nonenh + tumour.enhancing
    healthy = (1.0 - tumour.oedema) * healthy + tumour.oedema * tissue.brain_frac * lesion("oedema")
    return ((1.0 - core) * healthy + tumour.necrosis * lesion("necrosis") + tumour.nonenh * lesion("nonenh")
            + tumour.enhancing * lesion("enhancing")).astype(np.float32)


def _blur_sigma_vox(profile: SiteProfile, spacing_mm: float) -> tuple[float, float, float]:
    """Scanner PSF in-plane; thick slices add blur through-plane (output grid is finer)."""
    in_plane = profile.psf_fwhm_mm / 2.355 / spacing_mm
    through = math.sqrt(max(profile.slice_thickness_mm ** 2 - spacing_mm ** 2, 0.0)
                        + profile.psf_fwhm_mm ** 2) / 2.355 / spacing_mm
    sigma = [in_plane] * 3
    sigma[profile.slice_axis] = through
    return tuple(sigma)


def simulate_mri(rng: np.random.Generator, tissue: Tissue, tumour: Tumour, profile: SiteProfile,
                 spacing_mm: float) -> dict[str, np.ndarray]:
    """T1, T1ce, T2, FLAIR as this site's scanner would record them (skull-stripped, float32)."""
    shape = tissue.gm.shape
    sigma = _blur_sigma_vox(profile, spacing_mm)
    # One coil sensitivity for the session, slightly different per sequence.
    shared_bias = rng.normal(0.0, 1.0, len(_legendre_terms(3)))
    # Patient-level intensity variation (age, hydration): a few per cent per tissue.
    patient = {t: rng.normal(1.0, 0.03, len(MRI_CONTRASTS)) for t in TISSUE_MRI}
    session_gain = rng.normal(1.0, 0.04, len(MRI_CONTRASTS))  # auto-prescan scaling per scan
    out = {}
    for ci, contrast in enumerate(MRI_CONTRASTS):
        protocol = profile.tissue_contrast
        values = {t: TISSUE_MRI[t][ci] * patient[t][ci] * (protocol[t][ci] if t in protocol else 1.0)
                  for t in TISSUE_MRI}
        amp = {"oedema": 0.06, "necrosis": 0.08, "nonenh": 0.08, "enhancing": 0.15 if contrast == "t1ce" else 0.06}
        mix = 0.5 if contrast in ("t1", "t1ce") else 0.0
        img = _tissue_image(values, tissue, tumour, amp, t1_texture_mix=mix)
        img = ndimage.gaussian_filter(img, sigma)
        coeffs = shared_bias + rng.normal(0.0, 0.3, shared_bias.shape)
        log_bias = _legendre_grid(coeffs, shape, 3)
        log_bias -= log_bias[tissue.brain].mean()  # bias shapes the image; the gain sets its level
        log_bias *= profile.bias_strength / max(float(log_bias[tissue.brain].std()), 1e-6)
        img = np.power(np.clip(img, 0.0, None) * np.exp(log_bias), profile.gamma)
        noise = profile.noise_level
        real = img + rng.normal(0.0, noise, shape).astype(np.float32)
        imag = rng.normal(0.0, noise, shape).astype(np.float32)
        img = np.sqrt(real * real + imag * imag)  # Rician magnitude
        gain = profile.mri_gain[contrast] * session_gain[ci]
        out[contrast] = (img * gain * tissue.brain).astype(np.float32)
    return out


# --------------------------------------------------------------------------- CT


def _foci(rng: np.random.Generator, where: np.ndarray, n: int, diameter_mm: tuple, spacing_mm: float) -> np.ndarray:
    """``n`` balls (diameters drawn from ``diameter_mm``) centred on random voxels of ``where``, kept inside it."""
    out = np.zeros(where.shape, bool)
    points = np.argwhere(where)
    if not len(points):
        return out
    for centre in points[rng.choice(len(points), size=min(n, len(points)), replace=False)]:
        r = rng.uniform(*diameter_mm) / 2.0 / spacing_mm
        k = int(math.ceil(r))
        lo = np.maximum(centre - k, 0)
        hi = np.minimum(centre + k + 1, where.shape)
        grid = np.indices(tuple(hi - lo)).reshape(3, -1).T + lo
        inside = ((grid - centre) ** 2).sum(1) <= max(r * r, 0.5)
        out[tuple(grid[inside].T)] = True
    return out & where


def simulate_ct(rng: np.random.Generator, tissue: Tissue, tumour: Tumour, profile: SiteProfile,
                spacing_mm: float, grade: str = "healthy",
                findings: GliomaCT | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Head CT in HU on the MRI grid, the skull mask (for checks) and what it shows.

    Layers outside the brain by distance: CSF gap, skull (dense tables, lighter
    diploe, varying thickness), scalp, air. Tumour findings (:class:`GliomaCT`) follow the
    true ``grade``: solid-tumour density, oedema, haemorrhage before the PSF, calcification
    foci after it so their HU survive; enhancement is invisible on plain CT. Every draw
    here comes after the MRI's, so CT settings never change the MRI of a case.
    """
    f = findings or GliomaCT()
    shape = tissue.gm.shape
    hu = {t: v + rng.normal(0.0, 1.0) for t, v in TISSUE_HU.items() if t not in ("air", "scalp")}
    found = {"calcified": False, "haemorrhage": False, "density_hu": 0.0}
    glioma = grade in ("LGG", "HGG")
    if glioma:
        mean, sd = f.density_hgg_hu if grade == "HGG" else f.density_lgg_hu
        found["density_hu"] = round(float(rng.normal(mean, sd)), 2)
        hu["nonenh"] = hu["enhancing"] = hu["wm"] + found["density_hu"]  # solid tumour, whatever its MRI look
        hu["oedema"] = hu["wm"] + rng.uniform(*f.oedema_hu)
    inside = _tissue_image(hu, tissue, tumour, {"oedema": 0.03})
    core = np.isin(tumour.label, (1, 4))
    if glioma and rng.random() < f.probability("haemorrhage", grade):
        blood = _foci(rng, core, 1, f.haemorrhage_mm, spacing_mm)
        inside = np.where(blood, rng.uniform(*f.haemorrhage_hu), inside).astype(np.float32)
        found["haemorrhage"] = bool(blood.any())

    d = ndimage.distance_transform_edt(~tissue.brain, sampling=spacing_mm).astype(np.float32)
    gap = rng.uniform(2.0, 4.0)
    thickness = rng.uniform(5.5, 8.0) * (1.0 + 0.2 * _legendre_grid(rng.normal(0, 0.5, len(_legendre_terms(2))), shape, 2))
    scalp = rng.uniform(3.5, 6.0)
    outer = gap + thickness

    def below(edge):  # fraction of the voxel closer to the brain than ``edge``
        return np.clip((edge - d) / spacing_mm + 0.5, 0.0, 1.0)

    w_csf = below(gap)
    w_bone = below(outer) - w_csf
    w_scalp = below(outer + scalp) - below(outer)
    w_air = 1.0 - below(outer + scalp)
    depth = np.clip((d - gap) / np.maximum(thickness, 1e-3), 0.0, 1.0)
    bone = rng.uniform(1250.0, 1450.0) - 450.0 * np.sin(np.pi * depth) ** 2  # tables ~1400, diploe ~900
    bone = np.clip(bone * (1.0 + 0.06 * _smooth_noise(rng, shape, 2.0)), 700.0, 1600.0)
    outside = (w_csf * hu["csf"] + w_bone * bone + w_scalp * TISSUE_HU["scalp"] + w_air * TISSUE_HU["air"])
    ct = tissue.brain_frac * inside + (1.0 - tissue.brain_frac) * outside
    ct = ndimage.gaussian_filter(ct, profile.ct_psf_sigma_vox)
    if glioma and rng.random() < f.probability("calcification", grade):
        calc = _foci(rng, core, int(rng.integers(1, 4)), f.calcification_mm, spacing_mm)
        ct[calc] = rng.uniform(*f.calcification_hu, int(calc.sum()))
        found["calcified"] = bool(calc.any())
    ct = ct + rng.normal(0.0, profile.ct_noise_hu, shape) + profile.ct_offset_hu
    ct = np.clip(np.rint(ct), -1024.0, 3071.0).astype(np.float32)
    return ct, (w_bone > 0.5) & ~tissue.brain, found


# --------------------------------------------------------------------------- one case


def synthesize_case(rng: np.random.Generator, anatomy: Anatomy, site_profile: SiteProfile, grade: str,
                    atypical: float = 0.0, ct_findings: GliomaCT | None = None) -> dict:
    """One patient: MRI contrasts, label, CT (if the site has CT) and metadata.

    Returns ``{"t1", "t1ce", "t2", "flair": float32, "seg": uint8, "brain": bool,
    "wm": float32 white-matter fraction, "ct": float32 HU and "skull": bool (only
    with CT), "meta": dict}``; ``brain``, ``wm`` and ``skull`` are for checks, not written,
    all arrays on ``anatomy.shape`` / ``anatomy.affine``.
    """
    if grade not in GRADES:
        raise ValueError(f"grade must be one of {GRADES}, got {grade!r}")
    deform = sample_deformation(rng)
    findings = ct_findings or GliomaCT()
    plan = sample_tumour_plan(rng, anatomy, deform, grade, atypical, site_profile.tumour_scale)
    if plan is not None:  # deterministic from the plan: no draw, so it changes no other random choice
        plan.midline_shift_mm = findings.midline_shift_mm * plan.mass_effect
        plan.midline_sigma_mm = findings.midline_sigma_mm
    tissue = warp_anatomy(anatomy, deform, plan)
    tumour = grow_tumour(rng, tissue, anatomy, plan)
    case = simulate_mri(rng, tissue, tumour, site_profile, anatomy.spacing_mm)
    case["seg"] = tumour.label
    case["brain"] = tissue.brain
    case["wm"] = tissue.wm
    ct_found = {}
    if site_profile.has_ct:
        case["ct"], case["skull"], ct_found = simulate_ct(rng, tissue, tumour, site_profile, anatomy.spacing_mm,
                                                          grade, findings)

    voxel_ml = anatomy.spacing_mm ** 3 / 1000.0
    lab = tumour.label
    brain_ml = float(tissue.brain.sum()) * voxel_ml
    wt_ml = float((lab > 0).sum()) * voxel_ml
    case["meta"] = {
        "grade": grade,
        "looks_like": grade if plan is None else plan.looks_like,  # differs for atypical presentations
        "brain_ml": round(brain_ml, 1),
        "wt_ml": round(wt_ml, 2),
        "tc_ml": round(float(np.isin(lab, (1, 4)).sum()) * voxel_ml, 2),
        "et_ml": round(float((lab == 4).sum()) * voxel_ml, 2),
        "wt_fraction_of_brain": round(wt_ml / brain_ml, 4) if brain_ml else 0.0,
        "tumour_centre_mm": None if plan is None else [round(float(v), 1) for v in plan.centre_mm],
        "calcified": ct_found.get("calcified", False),  # CT findings: only where the site has CT
        "haemorrhage": ct_found.get("haemorrhage", False),
        "ct_density_hu": ct_found.get("density_hu", 0.0),
        "head_scale": [round(float(v), 3) for v in deform.scale],
        "mass_effect": 0.0 if plan is None else round(plan.mass_effect, 3),
        "midline_shift_mm": 0.0 if plan is None else round(plan.midline_shift_mm, 2),
    }
    return case


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.set_data_dtype(array.dtype)
    nib.save(img, path)  # nibabel gzips with mtime 0: same arrays -> same bytes


def write_case(case: dict, folder, affine: np.ndarray, *, case_id: str, study_uid: str | None = None) -> dict:
    """Write one case in the CONTRACTS layout; returns paths relative to ``folder.parent.parent``."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # no stale slices from an earlier, different run
    folder.mkdir(parents=True)
    for name in MRI_CONTRASTS:
        _save_nifti(case[name], affine, folder / f"{name}.nii.gz")
    _save_nifti(case["seg"].astype(np.uint8), affine, folder / "seg.nii.gz")
    rel = f"cases/{folder.name}"
    item = {
        "case_id": case_id,
        "image": [f"{rel}/{name}.nii.gz" for name in MRI_CONTRASTS],
        "label": f"{rel}/seg.nii.gz",
    }
    if "ct" in case:
        write_ct_series(case["ct"], affine, folder / "ct", patient_id=case_id, study_uid=study_uid)
        item["ct"] = f"{rel}/ct"
    item["grade"] = case["meta"]["grade"]
    return item


# --------------------------------------------------------------------------- consortium


def _allocate_grades(rng: np.random.Generator, n: int, mix: dict) -> list[str]:
    """Largest-remainder split of ``n`` cases by the site's grade mix, then shuffled.

    Proportional rather than i.i.d. so small sites still show their skew; at
    least one tumour per site so every validation split can hold one.
    """
    shares = np.array([mix.get(g, 0.0) for g in GRADES], float)
    shares = shares / shares.sum()
    exact = shares * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if counts[1] + counts[2] == 0:
        counts[0] -= 1
        counts[2 if shares[2] >= shares[1] else 1] += 1
    grades = [g for g, k in zip(GRADES, counts) for _ in range(k)]
    return [grades[i] for i in rng.permutation(n)]


def _is_public(profile: SiteProfile) -> bool:
    return profile.name.startswith(PUBLIC_PREFIX)


def _stream(profile: SiteProfile, seed: int) -> list[int]:
    """The random stream of a site's cases: a public cohort draws other patients than any hospital
    of the same seed (same stream, same heads and tumours)."""
    return [seed, 0x9B11C] if _is_public(profile) else [seed]


def _split(rng: np.random.Generator, grades: list[str], val_fraction: float) -> list[bool]:
    """Validation flags: >= 2 validation cases, at least one with a tumour, >= 1 training case."""
    n = len(grades)
    n_val = min(max(2, int(round(val_fraction * n))), n - 1)
    order = list(rng.permutation(n))
    val = set(order[:n_val])
    if all(grades[i] == "healthy" for i in val):
        tumour = next(i for i in order[n_val:] if grades[i] != "healthy")
        val.discard(order[0])
        val.add(tumour)
    return [i in val for i in range(n)]


def synthesize_consortium(
    out_dir,
    *,
    sites: int = 3,
    cases: int = 12,
    seed: int = 0,
    spacing_mm: float = 3.0,
    site_names: list[str] | None = None,
    val_fraction: float = 0.25,
    atypical: float = 0.0,
    ct_findings: GliomaCT | None = None,
    profiles: list[SiteProfile] | None = None,
    cohort: str = "",
    progress: bool = True,
) -> dict:
    """Write a synthetic consortium (layout in docs/CONTRACTS.md); returns the manifest.

    ``cases`` is the nominal number per site; quantity skew scales it per site
    (at least 3 so each site has >= 2 validation and >= 1 training case).
    ``atypical``: fraction of gliomas that look like the other grade on MRI
    (see :func:`sample_tumour_plan`); 0 gives a cohort MRI alone grades perfectly.
    ``ct_findings``: the glioma signs on CT and their strengths (:class:`GliomaCT` defaults).
    ``profiles``: one :class:`SiteProfile` per site instead of :func:`default_site_profiles`
    (e.g. a benchmark's own grade mixes).
    ``cohort``: a tag in every case ID (``SYN-<cohort>-A-0001``). A site's privacy ledger counts patients by
    case ID, so two synthetic cohorts at one site that should be different patients need different tags.
    """
    if sites < 1:
        raise ValueError("sites must be >= 1")
    if cases < 1:
        raise ValueError("cases must be >= 1")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    if cohort and not cohort.replace("_", "").isalnum():
        raise ValueError(f"cohort must be letters, digits or _, got {cohort!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    anatomy = load_anatomy(float(spacing_mm))
    if profiles is None:
        profiles = default_site_profiles(sites, seed, site_names)
    elif len(profiles) != sites:
        raise ValueError(f"need {sites} site profiles, got {len(profiles)}")

    plans = []
    for si, profile in enumerate(profiles):
        rng = np.random.default_rng([*_stream(profile, seed), si, 0xCA5E])
        n = max(3, int(round(cases * profile.case_factor)))
        grades = _allocate_grades(rng, n, profile.grade_mix)
        plans.append((si, profile, grades, _split(rng, grades, val_fraction)))
    total = sum(len(p[2]) for p in plans)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    manifest_sites, manifest_cases = [], []
    started = time.perf_counter()
    columns = (TextColumn("[bold]synth[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("consortium", total=total)
        for si, profile, grades, is_val in plans:
            site_dir = out / profile.name
            site_dir.mkdir(parents=True, exist_ok=True)
            letter = (f"{cohort}-" if cohort else "") + ("PUB-" if _is_public(profile) else "") + _site_letter(si)
            datalist = {"site": profile.name, "training": [], "validation": []}
            for ci, (grade, val) in enumerate(zip(grades, is_val)):
                case_id = f"SYN-{letter}-{ci + 1:04d}"
                bar.update(task, description=f"{profile.name} {case_id}")
                rng = np.random.default_rng([*_stream(profile, seed), si, ci])
                case = synthesize_case(rng, anatomy, profile, grade, atypical, ct_findings)
                study_uid = generate_uid(entropy_srcs=["fedbrain-synth", str(seed), profile.name, case_id])
                item = write_case(case, site_dir / "cases" / case_id, anatomy.affine,
                                  case_id=case_id, study_uid=study_uid)
                datalist["validation" if val else "training"].append(item)
                manifest_cases.append({"case_id": case_id, "site": profile.name,
                                       "split": "validation" if val else "training", **case["meta"]})
                bar.advance(task)
            counts = {g: grades.count(g) for g in GRADES}
            datalist["description"] = (
                f"Synthetic brain-tumour cohort of {profile.name}: {len(grades)} cases "
                f"(HGG {counts['HGG']}, LGG {counts['LGG']}, healthy {counts['healthy']}), "
                f"{profile.slice_thickness_mm} mm slices, {'with' if profile.has_ct else 'no'} CT. "
                f"fedbrain.synthetic.cohort seed {seed}."
            )
            datalist = {k: datalist[k] for k in ("site", "description", "training", "validation")}
            (site_dir / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n")
            manifest_sites.append({
                "name": profile.name,
                "datalist": f"{profile.name}/datalist.json",
                "n_cases": len(grades),
                "n_training": len(datalist["training"]),
                "n_validation": len(datalist["validation"]),
                "grade_counts": counts,
                "has_ct": profile.has_ct,
                "profile": asdict(profile),
            })
    elapsed = time.perf_counter() - started

    manifest = {
        "generator": "fedbrain.synthetic.cohort",
        "version": _SYNTH_VERSION,
        "seed": seed,
        "cohort": cohort,
        "spacing_mm": float(spacing_mm),
        "shape": list(anatomy.shape),
        "affine": np.round(anatomy.affine, 6).tolist(),
        "anatomy": anatomy.source,
        "modalities": list(MRI_CONTRASTS),
        "labels": {str(k): v for k, v in LABELS.items()},
        "val_fraction": val_fraction,
        "atypical": atypical,
        "ct_findings": asdict(ct_findings or GliomaCT()),
        "n_sites": sites,
        "n_cases": total,
        "grade_counts": {g: sum(s["grade_counts"][g] for s in manifest_sites) for g in GRADES},
        "sites": manifest_sites,
        "cases": manifest_cases,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["seconds"] = round(elapsed, 2)  # returned, not written: the file stays seed-deterministic
    return manifest
