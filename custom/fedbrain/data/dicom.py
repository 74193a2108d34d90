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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from fedbrain.contracts import CT_SERIES_KEY

__all__ = ["DicomSeriesError", "SeriesInfo", "find_series", "read_ct_series", "select_series",
           "write_ct_series"]

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
#: Companions of an image export that are not images: a CD/PACS export's index (DICOMDIR),
#: its read-me and viewer files. Skipped by name; any other unreadable file is reported.
_COMPANION_NAMES = ("dicomdir", "readme", "lockfile", "version", "autorun.inf")
_COMPANION_SUFFIXES = frozenset(
    ".txt .htm .html .xml .pdf .inf .ini .exe .dll .css .js .json .md .csv .log .jpg .jpeg .png .zip".split())
#: DICOM objects without pixels that share study folders with images (reports, key objects,
#: presentation states, registrations, RT structures): not a damaged slice, just not an image.
_NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "REG", "RTSTRUCT", "RTPLAN", "PLAN", "FID"})
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
# Pixel data above this size is read when decoded, not when the header is parsed, so a
# study folder of thousands of files can be surveyed without holding every image.
_DEFER_BYTES = 1024


@dataclass
class SeriesInfo:
    """One series found under a folder: what the error listing and the datalist builder show."""

    uid: str
    description: str
    modality: str
    files: list[Path]
    datasets: list[Dataset] = field(repr=False)
    where: str = ""  # its subfolder, relative to the folder searched ("" when at the top)

    @property
    def localizer(self) -> bool:
        """A scout / localizer: scanners mark it in ImageType; it is a projection, never a volume."""
        return any("LOCALIZER" in str(v).upper() for ds in self.datasets[:1] for v in ds.get("ImageType", []))

    def summary(self) -> str:
        kind = ", localizer" if self.localizer else ""
        n = len(self.files)
        described = repr(self.description) if self.description else "(no description)"
        where = f" in {self.where}" if self.where else ""
        return f"{self.uid} {described} ({self.modality or '?'}, {n} slice{'s' * (n != 1)}{kind}){where}"


def _is_companion(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith(_COMPANION_NAMES) or path.suffix.lower() in _COMPANION_SUFFIXES


def _series_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Every regular, non-hidden file at any depth (PACS exports nest patient/study/series
    folders): ``(candidates, skipped companions)``. A stray unknown file is a candidate, so
    it is reported rather than silently left out of a series."""
    candidates, skipped = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        (skipped if _is_companion(path) else candidates).append(path)
    return candidates, skipped


def _name(folder: Path, path: Path) -> str:
    """A file as messages show it: relative to the series folder (unique even when nested)."""
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def _read_slice(folder: Path, path: Path) -> Dataset | None:
    """Read one file's header (pixels deferred); None for a DICOM object that is not an image.

    A file cut inside its header parses as a dataset without PixelData: that is reported
    with the file's name; one cut inside its pixels fails later, when decoded, named too.
    """
    name = _name(folder, path)
    try:
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        except InvalidDicomError:
            # Old exports may lack the 128-byte preamble; a forced read of such
            # a file still finds PixelData, a forced read of junk does not.
            ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_BYTES)
            if "PixelData" not in ds:
                raise DicomSeriesError(
                    folder, f"{name} is not a DICOM file (no DICM header; truncated or foreign file)"
                ) from None
    except DicomSeriesError:
        raise
    except Exception as exc:  # pydicom raises EOFError, struct.error, OSError... on damage
        raise DicomSeriesError(folder, f"{name} is unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    sop_class = str(ds.get("SOPClassUID", "") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID", ""))
    if sop_class == _MEDIA_STORAGE_DIRECTORY:
        return None
    if "PixelData" not in ds:
        if str(ds.get("Modality", "")).upper() in _NON_IMAGE_MODALITIES:
            return None
        # pydicom stops quietly at a premature end of file, so a file cut
        # inside its header looks like a dataset without pixels.
        raise DicomSeriesError(folder, f"{name} holds no image (no PixelData): truncated or not an image")
    return ds


def find_series(folder) -> list[SeriesInfo]:
    """Every image series in ``folder`` and its subfolders (a PACS or CD export, DICOMDIR
    and read-me files skipped), largest first. Raises DicomSeriesError for a missing or
    image-less folder and for any damaged file (named), never returns an empty list."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(folder, "not a folder" if folder.exists() else "folder does not exist")
    files, skipped = _series_files(folder)
    groups: dict[str, SeriesInfo] = {}
    for path in files:
        ds = _read_slice(folder, path)
        if ds is None:
            skipped.append(path)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "<missing SeriesInstanceUID>")
        info = groups.setdefault(uid, SeriesInfo(uid, str(ds.get("SeriesDescription", "") or ""),
                                                 str(ds.get("Modality", "") or ""), [], []))
        info.files.append(path)
        info.datasets.append(ds)
    if not groups:
        shown = ", ".join(_name(folder, p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        raise DicomSeriesError(folder, "empty folder: no DICOM image files" + (f" (skipped: {shown})" if skipped else ""))
    for info in groups.values():
        parents = {p.parent for p in info.files}
        info.where = "" if parents == {folder} else ", ".join(sorted(_name(folder, p) for p in parents))
    return sorted(groups.values(), key=lambda s: (-len(s.files), s.uid))


def _unusable(series: SeriesInfo, modality: str | None) -> str | None:
    """Why a series cannot be the volume asked for, or None when it can."""
    if modality is not None and series.modality != modality:
        return f"Modality is {series.modality or '<missing>'}, expected {modality}"
    if series.localizer:
        return f"series {series.summary()} is a scout / localizer (ImageType LOCALIZER), not a volume"
    if len(series.files) < 2:
        return (f"single slice: series {series.summary()} has one image; a {modality or 'volume'} "
                "needs the whole stack of slices")
    return None


def select_series(folder, modality: str | None = "CT", series_uid: str | None = None) -> SeriesInfo:
    """The one series to read from ``folder``: ``series_uid`` when given, else the only
    series there that can be a volume of ``modality`` (scouts, single images, other
    modalities and non-image objects beside it are left out). Refuses, listing every
    series (UID, description, slices), when none or several qualify."""
    folder = Path(folder)
    found = find_series(folder)
    # the series that could be meant first: a long study listing stays readable
    listing = "; ".join(s.summary() for s in sorted(found, key=lambda s: _unusable(s, modality) is not None))
    if series_uid:
        match = [s for s in found if s.uid == str(series_uid)]
        if not match:
            raise DicomSeriesError(folder, f"{CT_SERIES_KEY} {series_uid} is not in this folder; series here: {listing}")
        chosen = match[0]
    else:
        usable = [s for s in found if _unusable(s, modality) is None]
        if len(usable) > 1:
            raise DicomSeriesError(
                folder, f"mixed series: {len(usable)} series could be the {modality or 'volume'}; name one in the "
                        f"datalist as \"{CT_SERIES_KEY}\". Series here: {listing}")
        if not usable:
            if len(found) == 1:
                raise DicomSeriesError(folder, _unusable(found[0], modality))
            raise DicomSeriesError(folder, f"no usable {modality or 'image'} series: {listing}")
        chosen = usable[0]
    reason = _unusable(chosen, modality)
    if reason:
        raise DicomSeriesError(folder, reason)
    return chosen


def _decode_hu(folder: Path, path: Path, ds: Dataset) -> np.ndarray:
    """Decode pixels (compressed transfer syntaxes through the pinned pylibjpeg plugins) and
    apply the modality LUT (RescaleSlope/Intercept -> HU)."""
    name = _name(folder, path)
    try:
        raw = ds.pixel_array
    except Exception as exc:  # short PixelData, missing codec, ...
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        syntax = getattr(syntax, "name", syntax)
        raise DicomSeriesError(
            folder, f"{name}: cannot decode pixel data ({syntax}): {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from exc
    expected = (int(ds.Rows), int(ds.Columns))
    if raw.shape != expected:
        raise DicomSeriesError(folder, f"{name}: pixel array {raw.shape} != Rows x Columns {expected}: truncated "
                                       "or not one greyscale slice")
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)


def _check_same(folder: Path, files: list[Path], values: list, what: str, same) -> None:
    """Refuse when ``values`` differ across slices; name a file of each variant."""
    reference = values[0]
    for path, value in zip(files, values):
        if not same(reference, value):
            raise DicomSeriesError(
                folder,
                f"inconsistent {what}: {_name(folder, files[0])} has {reference}, {_name(folder, path)} has {value}",
            )


def read_ct_series(folder, modality: str | None = "CT", series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one CT series under ``folder`` into (HU float32 volume [i, j, k], RAS+ affine).

    The series is found at any depth (see :func:`select_series`; ``series_uid`` picks one
    where several qualify). Slices are ordered by position along the slice normal (row x
    column cosines), ascending, whatever the file names or InstanceNumbers say, and the
    slice step comes from the actual positions. A series that is not exactly one
    contiguous, uniformly spaced, single-orientation greyscale stack of at least two
    slices raises DicomSeriesError, and so does one whose Modality is not ``modality``
    (an MR series in the CT slot would otherwise be windowed as HU; None skips the check).
    """
    folder = Path(folder)
    series = select_series(folder, modality, series_uid)
    files, datasets = series.files, series.datasets
    for path, ds in zip(files, datasets):
        missing = [name for name in _REQUIRED if name not in ds or ds[name].value in (None, "")]
        if missing:
            raise DicomSeriesError(folder, f"{_name(folder, path)} lacks {', '.join(missing)}")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise DicomSeriesError(folder, f"{_name(folder, path)} is multi-frame; one slice per file expected")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise DicomSeriesError(folder, f"{_name(folder, path)} is a colour image "
                                           f"({ds.get('PhotometricInterpretation', '?')}), not a greyscale slice")

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
    _check_slice_spacing(folder, files, along)
    slice_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    # Every slice must sit on the line first + n * step; otherwise slices
    # are shifted in-plane and no single affine describes them.
    expected = positions[0] + np.outer(np.arange(len(positions)), slice_step)
    off = np.linalg.norm(positions - expected, axis=1)
    worst = int(np.argmax(off))
    if off[worst] > _SPACING_ATOL + _SPACING_RTOL * float(np.linalg.norm(slice_step)):
        raise DicomSeriesError(
            folder, f"{_name(folder, files[worst])} is displaced {off[worst]:.3f} mm from the slice stack line"
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
                f"duplicate slice position: {_name(folder, files[n])} and {_name(folder, files[n + 1])} "
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
                f"gap / non-uniform slice spacing between {_name(folder, files[n])} ({along[n]:.3f} mm) and "
                f"{_name(folder, files[n + 1])} ({along[n + 1]:.3f} mm): step {step:.3f} mm, "
                f"expected {expected:.3f} mm{hint}",
            )
