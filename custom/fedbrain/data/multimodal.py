"""MONAI preprocessing for the MRI + CT grade classifier (healthy / LGG / HGG).

Per case the chain produces:

* ``mri``: float32 (4, *spatial_size), T1/T1ce/T2/FLAIR z-scored per channel inside the
  brain (background stays exactly 0);
* ``ct``: float32 (2, *spatial_size), the CT resampled onto the MRI grid, windowed
  twice (see :data:`CT_WINDOWS`) and masked to the brain; all zeros without a CT;
* ``has_mri`` / ``has_ct``: float availability flags (1 present, 0 absent);
* ``label``: class index of ``grade`` in :data:`CLASS_NAMES`.

Choices and why:

* CT geometry: the DICOM series is read by :func:`fedbrain.data.dicom.read_ct_series`
  (which refuses broken series) through :class:`DicomCTSeriesReader`, a MONAI
  ``ImageReader``, so the CT is a ``MetaTensor`` carrying its own RAS affine and
  ``ResampleToMatchd`` can put it voxel-for-voxel onto the MRI grid, whatever the CT's
  slice spacing or orientation.
* CT as two windows rather than one [-100, 1000] HU channel: in the single wide window
  the grey/white/oedema contrast (8-40 HU) is ~3 % of the range and drowns in noise,
  while the things CT adds over MRI are (a) hypodense oedema and mass effect, visible
  only in a narrow brain window, and (b) calcifications (typically 100-600 HU, frequent
  in oligodendroglial LGG) that the brain window clips flat. Channel 0 is the brain
  window 0..80 HU, channel 1 a calcification window 100..400 HU, both scaled to [0, 1].
  The CT is then masked to the MRI brain: the skull would otherwise saturate the
  calcification window, and the narrow upper bound (400, not bone's 1000+) keeps a
  small calcification bright enough to survive the downsampling below. Air and a
  missing CT (filled with -1024 HU) map to exactly 0 in both channels.
* Size: one isotropic ``spacing`` first (scanners differ across sites), then a crop to
  the brain and a resize to a small fixed ``spatial_size`` ("area" mode averages, i.e.
  anti-aliases, when shrinking). Grade is a whole-brain property; 32x40x32 voxels (about
  4.5-6 mm) keep a 2-core CPU training step (batch 4, both streams) near 0.1 s.
* Everything before the first random transform is deterministic, so
  :func:`load_classification_cases` runs it once per case and replays only the light
  augmentation (left-right flip, small affine, MRI intensity jitter) every epoch.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import ImageReader, MetaTensor
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirst,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    MaskIntensityd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResampleToMatchd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
)
from monai.transforms.transform import apply_transform
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys, ensure_tuple

from fedbrain.data.dataset import CaseDataset, CaseError, SkippedCase, load_with_skips, require_usable
from fedbrain.data.dicom import read_ct_series
from fedbrain.contracts import CT_SERIES_KEY
from fedbrain.contracts import GRADES as CLASS_NAMES

__all__ = [
    "AIR_HU",
    "CLASS_NAMES",
    "CT_WINDOWS",
    "DicomCTSeriesReader",
    "LoadCTSeriesd",
    "classification_transforms",
    "load_classification_cases",
    "class_counts",
]


#: (low, high) HU of each CT channel: brain window, calcification window.
CT_WINDOWS = ((0.0, 80.0), (100.0, 400.0))
#: Fill value of a missing CT (and the CT's own padding): air, which both windows map to 0.
AIR_HU = -1024.0
#: Keys of a preprocessed item (besides ``case_id``).
ITEM_KEYS = ("mri", "ct", "has_mri", "has_ct", "label")


def _triple(value, name: str) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * 3
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values, got {value!r}")
    return values


class DicomCTSeriesReader(ImageReader):
    """MONAI ``ImageReader`` for a folder holding one CT series, via ``read_ct_series``.

    Why not MONAI's ``ITKReader``/``PydicomReader``: ours validates the series (mixed
    series, gaps, localizers raise ``DicomSeriesError`` naming the folder), shares its
    geometry convention with the synthetic writer, and needs no ITK. The volume comes
    back channel-less ``[i, j, k]`` in HU with its RAS affine.
    """

    def verify_suffix(self, filename) -> bool:
        return all(os.path.isdir(f) for f in ensure_tuple(filename))

    def read(self, data, series_uid: str | None = None, **kwargs):
        folders = ensure_tuple(data)
        series = [read_ct_series(f, series_uid=series_uid) for f in folders]
        return series if len(series) > 1 else series[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        arrays, meta = [], {}
        for volume, affine in (img if isinstance(img, list) else [img]):
            header = {
                MetaKeys.AFFINE: np.asarray(affine, dtype=np.float64),
                MetaKeys.ORIGINAL_AFFINE: np.asarray(affine, dtype=np.float64),
                MetaKeys.SPATIAL_SHAPE: np.asarray(volume.shape),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),  # no channel: EnsureChannelFirst adds one
            }
            arrays.append(volume)
            _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta


class LoadCTSeriesd(MapTransform):
    """Load ``d[key]`` (a CT series folder) as a channel-first HU ``MetaTensor``.

    When the path is ``None`` (the case has no CT) the output is air (:data:`AIR_HU`) on
    the grid of ``d[ref_key]``, so the rest of the chain needs no special case and the
    windowed result is exactly zero.
    """

    def __init__(self, keys, ref_key: str = "mri", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.reader = DicomCTSeriesReader()
        self.channel_first = EnsureChannelFirst()

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is None:
                ref = d[self.ref_key]
                d[key] = MetaTensor(torch.full((1, *ref.shape[1:]), AIR_HU, dtype=torch.float32),
                                    affine=ref.affine.clone(), meta={MetaKeys.SPACE: SpaceKeys.RAS})
            else:
                d[key] = self._load(d[key], d.get(CT_SERIES_KEY))
        return d

    def _load(self, folder, series_uid: str | None = None) -> MetaTensor:
        """What ``LoadImage`` does with a runtime reader, minus its fallback readers.

        ``LoadImage(reader=ours)`` would retry a refused folder with MONAI's
        PydicomReader, so a series with a missing slice would load with a wrong
        geometry instead of being skipped; here a ``DicomSeriesError`` propagates.
        """
        array, meta = self.reader.get_data(self.reader.read(folder, series_uid=series_uid))
        meta[ImageMetaKey.FILENAME_OR_OBJ] = os.fspath(folder)
        img = MetaTensor.ensure_torch_and_prune_meta(array.astype(np.float32, copy=False), meta)
        return self.channel_first(img, meta_dict=meta)


def brain_mask(mri: torch.Tensor) -> torch.Tensor:
    """(1, ...) mask of voxels non-zero in any MRI contrast: the skull-stripped brain."""
    return (mri != 0).any(0, keepdim=True)


def ct_onto_mri(mri_key: str) -> list:
    """The steps that turn ``d["ct"]`` (a series folder, or None) into the two windowed CT channels
    (:data:`CT_WINDOWS`) on the grid of ``d[mri_key]``, masked to its brain: one definition for the
    classifier and the dual-stream segmentation.

    Border padding: where the CT field of view ends its edge (air or scalp) is repeated rather
    than inventing 0 HU (water, which looks like CSF). The mask keeps the skull out of the
    high-density window, where it would bury the few calcified voxels.
    """
    (brain_lo, brain_hi), (dense_lo, dense_hi) = CT_WINDOWS
    return [
        LoadCTSeriesd(keys="ct", ref_key=mri_key),
        ResampleToMatchd(keys="ct", key_dst=mri_key, mode="bilinear", padding_mode="border", dtype=np.float32),
        CopyItemsd(keys="ct", names="ct_dense"),
        ScaleIntensityRanged(keys="ct", a_min=brain_lo, a_max=brain_hi, b_min=0.0, b_max=1.0, clip=True),
        ScaleIntensityRanged(keys="ct_dense", a_min=dense_lo, a_max=dense_hi, b_min=0.0, b_max=1.0, clip=True),
        ConcatItemsd(keys=["ct", "ct_dense"], name="ct"),
        CopyItemsd(keys=mri_key, names="brain"),
        Lambdad(keys="brain", func=brain_mask),
        MaskIntensityd(keys="ct", mask_key="brain"),
        DeleteItemsd(keys=["ct_dense", "brain"]),
    ]


def classification_transforms(
    train: bool,
    *,
    spacing: float | Sequence[float] = (3.0, 3.0, 3.0),
    spatial_size: int | Sequence[int] = (32, 40, 32),
    augment: bool = True,
) -> Compose:
    """Dict transform for ``{"mri": [t1, t1ce, t2, flair], "ct": folder | None, ...}``.

    Flags and ``label`` pass through untouched. ``train=True`` (and ``augment``) appends
    the random augmentation; spatial ops act on ``mri`` and ``ct`` together so they stay
    aligned.
    """
    spacing = tuple(float(s) for s in _triple(spacing, "spacing"))
    spatial_size = tuple(int(s) for s in _triple(spatial_size, "spatial_size"))
    both = ["mri", "ct"]
    steps = [
        LoadImaged(keys="mri", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="mri"),  # the 4 MRI files are stacked as 4 channels
        Orientationd(keys="mri", axcodes="RAS", labels=None),
        Spacingd(keys="mri", pixdim=spacing, mode="bilinear"),
        *ct_onto_mri("mri"),
        # The brain is everything non-zero in any MRI contrast (images are skull-stripped).
        CropForegroundd(keys=both, source_key="mri", allow_smaller=True, start_coord_key=None, end_coord_key=None),
        NormalizeIntensityd(keys="mri", nonzero=True, channel_wise=True),
        Resized(keys=both, spatial_size=spatial_size, mode="area"),
        EnsureTyped(keys=both, dtype=torch.float32, track_meta=False),
    ]
    if train and augment:
        steps += [
            RandFlipd(keys=both, prob=0.5, spatial_axis=0),  # left-right: tumours occur on both sides
            RandAffined(keys=both, prob=0.5, rotate_range=(0.15, 0.15, 0.15), scale_range=(0.08, 0.08, 0.08),
                        translate_range=(2, 2, 2), mode="bilinear", padding_mode="zeros"),
            RandScaleIntensityd(keys="mri", factors=0.1, prob=1.0),  # scanner gain differences
            RandShiftIntensityd(keys="mri", offsets=0.1, prob=1.0),
        ]
    return Compose(steps)


def _input_of(case: dict) -> dict:
    """Datalist item -> transform input; a missing or invalid ``grade`` is a CaseError."""
    images = case.get("image")
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)) or len(images) != 4:
        raise CaseError(f"expected 4 image files (T1, T1ce, T2, FLAIR), got {images!r}")
    grade = case.get("grade")
    if grade is None:
        raise CaseError(f"no 'grade' (one of {', '.join(CLASS_NAMES)}): needed for grade classification")
    if grade not in CLASS_NAMES:
        raise CaseError(f"grade {grade!r} is not one of {', '.join(CLASS_NAMES)}")
    ct = case.get("ct")
    return {
        "mri": [os.fspath(p) for p in images],
        "ct": os.fspath(ct) if ct else None,
        CT_SERIES_KEY: case.get(CT_SERIES_KEY),
        "has_mri": np.float32(1.0),
        "has_ct": np.float32(1.0 if ct else 0.0),
        "label": CLASS_NAMES.index(grade),
    }


def _check_item(item: dict, case: dict) -> None:
    """The transforms' output has the channels the network expects (a guard on our own chain)."""
    mri, ct = item["mri"], item["ct"]
    if mri.shape[0] != 4 or ct.shape[0] != len(CT_WINDOWS):
        raise CaseError(f"unexpected channels: mri {tuple(mri.shape)}, ct {tuple(ct.shape)} ({case['image'][0]})")


def _prepare_classification_case(case: dict, head: Compose) -> dict:
    data = _input_of(case)
    require_usable(case)  # what `fedbrain data check` reports: files, grids, CT series and its overlap
    item = apply_transform(head, data)
    _check_item(item, case)
    return {k: item[k] for k in ITEM_KEYS}


def load_classification_cases(
    cases: Sequence[dict], transform: Compose, *, progress: bool = False
) -> tuple[CaseDataset, list[SkippedCase]]:
    """Classification cases through :func:`fedbrain.data.dataset.load_with_skips`.

    Keeps ``mri``, ``ct``, the availability flags and ``label``. Cases without a ``grade``,
    with an unreadable MRI file or a broken CT series are skipped with the reason. Only the
    MRI files are probed for a culprit: the segmentation label is not used here, and a
    DicomSeriesError already names the CT folder and the reason.
    """
    return load_with_skips(cases, transform, _prepare_classification_case,
                           probe=lambda case: {"image": case.get("image") or []}, progress=progress)


def class_counts(dataset: CaseDataset) -> dict[str, int]:
    """Cases per grade, every grade listed (zeros included)."""
    counts = Counter(int(item["label"]) for item in dataset.items)
    return {name: counts.get(i, 0) for i, name in enumerate(CLASS_NAMES)}
