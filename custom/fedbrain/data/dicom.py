"""CT DICOM series I/O with explicit geometry validation.

Sites hand us CT folders exported from PACS. A folder that silently mixes two
series, misses a slice or holds a 3-plane localizer produces a volume whose
affine is wrong, and a wrong affine poisons registration and training without
any error. So the reader refuses such folders loudly, naming the folder, the
file and the reason, instead of guessing.

Geometry convention (shared by writer and reader):

* volumes are indexed ``[i, j, k]`` with a RAS+ 4x4 affine (nibabel convention);
* ``i`` runs along a DICOM row (increasing column index), ``j`` along a column
  (increasing row index), ``k`` is the slice axis; so one slice's
  ``pixel_array`` (rows, columns) is ``volume[:, :, k].T``;
* DICOM patient coordinates are LPS, hence the ``diag(-1, -1, 1)`` flips.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

__all__ = ["DicomSeriesError", "write_ct_series", "read_ct_series"]

# RAS <-> LPS flip; it is its own inverse.
_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

# Direction cosines written by scanners carry ~1e-6 noise; orientations
# further apart than this are genuinely different planes.
_ORIENTATION_ATOL = 1e-4
# Slice spacing tolerance: float noise in ImagePositionPatient is sub-micron,
# a missing slice doubles the step, so 1 % + 10 micrometres separates them.
_SPACING_RTOL = 0.01
_SPACING_ATOL = 0.01
# Two slices closer than this along the normal are the same position.
_DUPLICATE_ATOL = 1e-3


class DicomSeriesError(ValueError):
    """A folder is not one clean, contiguous, single-orientation image series."""

    def __init__(self, folder, reason: str):
        self.folder = Path(folder)
        self.reason = reason
        super().__init__(f"{self.folder}: {reason}")

    def __reduce__(self):
        # Keep the error picklable (raised inside DataLoader / FLARE workers).
        return type(self), (self.folder, self.reason)


# --------------------------------------------------------------------------- writer


def _stored_pixels(volume_hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Invert the rescale and pick the narrowest DICOM integer type that holds it.

    uint16 covers the usual CT range (-1024 .. 64511 HU with intercept -1024);
    int16 is the fallback for values below the intercept.
    """
    stored = np.rint((np.asarray(volume_hu, dtype=np.float64) - intercept) / slope)
    lo, hi = float(stored.min()), float(stored.max())
    if lo >= 0 and hi <= np.iinfo(np.uint16).max:
        return stored.astype(np.uint16)
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return stored.astype(np.int16)
    raise ValueError(
        f"HU range [{volume_hu.min()}, {volume_hu.max()}] does not fit 16-bit pixels "
        f"with RescaleSlope={slope}, RescaleIntercept={intercept}"
    )


def _ds_float(value: float) -> str:
    """Format a float for a DS element (16 characters at most)."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.6g}"
    return text


def write_ct_series(
    volume_hu: np.ndarray,
    affine: np.ndarray,
    folder,
    *,
    patient_id: str,
    study_uid: str | None = None,
    series_description: str = "CT HEAD",
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    series_number: int = 1,
) -> list[Path]:
    """Write a HU volume as a CT Image Storage series, one file per slice.

    Exists so the synthetic consortium has real DICOM CT to ingest: the files
    go through the same reader and validation as scanner exports.

    ``volume_hu[i, j, k]`` with RAS+ ``affine``; ``k`` is the slice axis and
    ``IM0001.dcm`` holds ``k = 0``. HU round-trips exactly for integer HU with
    slope 1 (values are rounded to the stored integer grid otherwise). The
    ``i`` and ``j`` axes must be orthogonal (DICOM pixels are rectangular).

    UIDs are derived deterministically from ``study_uid``, ``patient_id``,
    ``series_description`` and ``series_number``, so a seeded generator that
    passes a seeded ``study_uid`` writes byte-identical files. Without
    ``study_uid`` a fresh random study UID is generated.
    """
    volume_hu = np.asarray(volume_hu)
    affine = np.asarray(affine, dtype=np.float64)
    if volume_hu.ndim != 3:
        raise ValueError(f"volume must be 3-D [i, j, k], got shape {volume_hu.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    if not np.all(np.isfinite(volume_hu)):
        raise ValueError("volume holds NaN or Inf; DICOM pixels cannot store them")
    if rescale_slope == 0:
        raise ValueError("rescale_slope must be non-zero")

    lps = _LPS_FLIP @ affine
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    spacing_i = float(np.linalg.norm(col_step))  # distance between columns
    spacing_j = float(np.linalg.norm(row_step))  # distance between rows
    slice_thickness = float(np.linalg.norm(slice_step))
    if min(spacing_i, spacing_j, slice_thickness) <= 0:
        raise ValueError("affine has a zero-length axis")
    row_cosine, col_cosine = col_step / spacing_i, row_step / spacing_j
    if abs(float(row_cosine @ col_cosine)) > 1e-6:
        raise ValueError("affine i and j axes are not orthogonal; DICOM cannot represent that")
    normal = np.cross(row_cosine, col_cosine)
    if abs(float(normal @ slice_step)) < 1e-6 * slice_thickness:
        raise ValueError("affine slice axis lies in the image plane")

    stored = _stored_pixels(volume_hu, rescale_slope, rescale_intercept)

    study_uid = study_uid or generate_uid()
    entropy = [str(study_uid), patient_id, series_description, str(series_number)]
    series_uid = generate_uid(entropy_srcs=entropy + ["series"])
    frame_uid = generate_uid(entropy_srcs=entropy + ["frame-of-reference"])

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iop = [_ds_float(v) for v in (*row_cosine, *col_cosine)]
    written: list[Path] = []
    for k in range(stored.shape[2]):
        position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
        sop_uid = generate_uid(entropy_srcs=entropy + ["instance", str(k)])

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.Manufacturer = "fedbrain synthetic"
        ds.SeriesDescription = series_description
        # Patient / study: type-2 elements left empty rather than invented.
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.StudyID = ""
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.KVP = ""
        # Geometry.
        ds.ImagePositionPatient = [_ds_float(v) for v in position]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [_ds_float(spacing_j), _ds_float(spacing_i)]  # [row, column] spacing
        ds.SliceThickness = _ds_float(slice_thickness)
        ds.SliceLocation = _ds_float(float(position @ normal))
        # Pixels: DICOM frames are (rows, columns) = (j, i).
        ds.set_pixel_data(
            np.ascontiguousarray(stored[:, :, k].T),
            photometric_interpretation="MONOCHROME2",
            bits_stored=16,
            generate_instance_uid=False,
        )
        ds.RescaleIntercept = _ds_float(rescale_intercept)
        ds.RescaleSlope = _ds_float(rescale_slope)
        ds.RescaleType = "HU"

        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


# --------------------------------------------------------------------------- reader


_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def _series_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file: a stray non-DICOM file is reported, not skipped."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
    )


def _read_slice(folder: Path, path: Path) -> Dataset:
    """Read one file fully (pixels included) so truncation surfaces here, with its name."""
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            # Old exports may lack the 128-byte preamble; a forced read of such
            # a file still finds PixelData, a forced read of junk does not.
            ds = pydicom.dcmread(path, force=True)
            if "PixelData" not in ds:
                raise DicomSeriesError(
                    folder, f"{path.name} is not a DICOM file (no DICM header; truncated or foreign file)"
                ) from None
    except DicomSeriesError:
        raise
    except Exception as exc:  # pydicom raises EOFError, struct.error, OSError... on damage
        raise DicomSeriesError(
            folder, f"{path.name} is unreadable or truncated ({type(exc).__name__}: {exc})"
        ) from exc
    if "PixelData" not in ds:
        # pydicom stops quietly at a premature end of file, so a file cut
        # inside its header looks like a dataset without pixels.
        raise DicomSeriesError(folder, f"{path.name} holds no image (no PixelData): truncated or not an image")
    missing = [name for name in _REQUIRED if name not in ds or ds[name].value in (None, "")]
    if missing:
        raise DicomSeriesError(folder, f"{path.name} lacks {', '.join(missing)}")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
        raise DicomSeriesError(folder, f"{path.name} is multi-frame; one slice per file expected")
    return ds


def _decode_hu(folder: Path, path: Path, ds: Dataset) -> np.ndarray:
    """Decode pixels and apply the modality LUT (RescaleSlope/Intercept -> HU)."""
    try:
        raw = ds.pixel_array
    except Exception as exc:  # short PixelData, missing codec, ...
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        name = getattr(syntax, "name", syntax)
        raise DicomSeriesError(
            folder, f"{path.name}: cannot decode pixel data ({name}): {type(exc).__name__}: {exc}"
        ) from exc
    expected = (int(ds.Rows), int(ds.Columns))
    if raw.shape != expected:
        raise DicomSeriesError(folder, f"{path.name}: pixel array {raw.shape} != Rows x Columns {expected}")
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)


def _check_same(folder: Path, files: list[Path], values: list, what: str, same) -> None:
    """Refuse when ``values`` differ across slices; name a file of each variant."""
    reference = values[0]
    for path, value in zip(files, values):
        if not same(reference, value):
            raise DicomSeriesError(
                folder,
                f"inconsistent {what}: {files[0].name} has {reference}, {path.name} has {value}",
            )


def read_ct_series(folder, modality: str | None = "CT") -> tuple[np.ndarray, np.ndarray]:
    """Read one CT series folder into (HU float32 volume [i, j, k], RAS+ affine).

    Slices are ordered by position along the slice normal (row x column
    cosines), ascending, whatever the file names or InstanceNumbers say. The
    slice step comes from the actual positions (SliceThickness is only used
    for a single slice, where there is nothing else). Any folder that is not
    exactly one contiguous, uniformly spaced, single-orientation series
    raises DicomSeriesError, and so does a series whose Modality is not ``modality``
    (an MR series in the CT slot would otherwise be windowed as HU; None skips the check).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(folder, "not a folder" if folder.exists() else "folder does not exist")
    files = _series_files(folder)
    if not files:
        raise DicomSeriesError(folder, "empty folder: no DICOM files")
    datasets = [_read_slice(folder, path) for path in files]

    series = Counter(str(ds.get("SeriesInstanceUID", "<missing>")) for ds in datasets)
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({n} files)" for uid, n in series.most_common())
        raise DicomSeriesError(folder, f"mixed series: {len(series)} SeriesInstanceUIDs: {listing}")
    if modality is not None:
        found = sorted({str(ds.get("Modality", "")) or "<missing>" for ds in datasets})
        if found != [modality]:
            raise DicomSeriesError(folder, f"Modality is {'/'.join(found)}, expected {modality}")

    orientations = [np.asarray(ds.ImageOrientationPatient, dtype=np.float64) for ds in datasets]
    if any(o.shape != (6,) for o in orientations):
        raise DicomSeriesError(folder, "malformed ImageOrientationPatient (need 6 values)")
    _check_same(
        folder, files, [np.round(o, 6).tolist() for o in orientations],
        "ImageOrientationPatient (mixed orientations, e.g. a localizer)",
        lambda a, b: np.allclose(a, b, atol=_ORIENTATION_ATOL),
    )
    _check_same(folder, files, [(int(ds.Rows), int(ds.Columns)) for ds in datasets],
                "Rows x Columns", lambda a, b: a == b)
    _check_same(folder, files, [[float(v) for v in ds.PixelSpacing] for ds in datasets],
                "PixelSpacing", lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-5))

    row_cosine, col_cosine = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_cosine, col_cosine)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DicomSeriesError(folder, f"ImageOrientationPatient rows are not orthonormal: {orientations[0].tolist()}")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    files = [files[n] for n in order]
    datasets = [datasets[n] for n in order]
    positions = positions[order]
    along = positions @ normal

    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    if len(datasets) == 1:
        thickness = datasets[0].get("SliceThickness") or datasets[0].get("SpacingBetweenSlices")
        if not thickness or float(thickness) <= 0:
            raise DicomSeriesError(folder, f"single slice {files[0].name} without SliceThickness")
        slice_step = normal * float(thickness)
    else:
        _check_slice_spacing(folder, files, along)
        slice_step = (positions[-1] - positions[0]) / (len(positions) - 1)
        # Every slice must sit on the line first + n * step; otherwise slices
        # are shifted in-plane and no single affine describes them.
        expected = positions[0] + np.outer(np.arange(len(positions)), slice_step)
        off = np.linalg.norm(positions - expected, axis=1)
        worst = int(np.argmax(off))
        if off[worst] > _SPACING_ATOL + _SPACING_RTOL * float(np.linalg.norm(slice_step)):
            raise DicomSeriesError(
                folder, f"{files[worst].name} is displaced {off[worst]:.3f} mm from the slice stack line"
            )

    lps = np.eye(4)
    lps[:3, 0] = row_cosine * col_spacing
    lps[:3, 1] = col_cosine * row_spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    affine = _LPS_FLIP @ lps

    volume = np.stack([_decode_hu(folder, p, ds).T for p, ds in zip(files, datasets)], axis=-1)
    return volume.astype(np.float32, copy=False), affine


def _check_slice_spacing(folder: Path, files: list[Path], along: np.ndarray) -> None:
    """Refuse duplicate positions and non-uniform steps (missing slices), naming where."""
    steps = np.diff(along)
    for n, step in enumerate(steps):
        if step < _DUPLICATE_ATOL:
            raise DicomSeriesError(
                folder,
                f"duplicate slice position: {files[n].name} and {files[n + 1].name} "
                f"both at {along[n]:.3f} mm along the normal",
            )
    expected = float(np.median(steps))
    tolerance = _SPACING_ATOL + _SPACING_RTOL * expected
    for n, step in enumerate(steps):
        if abs(step - expected) > tolerance:
            missing = round(step / expected) - 1
            hint = f" (about {missing} missing slice{'s' * (missing != 1)})" if missing >= 1 else ""
            raise DicomSeriesError(
                folder,
                f"gap / non-uniform slice spacing between {files[n].name} ({along[n]:.3f} mm) and "
                f"{files[n + 1].name} ({along[n + 1]:.3f} mm): step {step:.3f} mm, "
                f"expected {expected:.3f} mm{hint}",
            )
