"""CT DICOM I/O: round trips through our writer, and real scanner files shipped with pydicom.

pydicom's ``dicomdirtests`` tree holds real (downsampled to 16x16) series:
77654033/CT2 has a gap (z -99.48 then 103.02..105.52 at 1.25 mm), 98892001/CT2N
is a two-plane CT scout, 98892003/MR2 holds three 3-plane localizer series,
MR700 a radial localizer, MR1 three single-slice series, and 98892001/CT5N is
contiguous (2.5 mm) with z descending as InstanceNumber rises.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import CTImageStorage

from fedbrain.data.dicom import DicomSeriesError, find_series, read_ct_series, write_ct_series

DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


def _copy_series(tmp_path: Path, *sources: Path, name: str = "series") -> Path:
    """Copy files (or every file of folders) into one fresh folder."""
    target = tmp_path / name
    target.mkdir()
    for source in sources:
        files = sorted(source.iterdir()) if source.is_dir() else [source]
        for file in files:
            shutil.copy(file, target / f"{source.name}_{file.name}")
    return target


def _flip_slices(affine: np.ndarray, n_slices: int) -> np.ndarray:
    """Affine of the same grid with the k axis reversed."""
    flip = np.eye(4)
    flip[2, 2] = -1
    flip[2, 3] = n_slices - 1
    return affine @ flip


def _synthetic_volume(shape=(20, 24, 9), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 3000, size=shape).astype(np.float32)


# --------------------------------------------------------------------------- writer / round trip


def test_round_trip_z_descending_shuffled_on_disk(tmp_path):
    """3 mm slices, 0.9 mm pixels, z descending with k, file names shuffled."""
    volume = _synthetic_volume()
    affine = np.array([[0.9, 0, 0, -90.0], [0, 0.9, 0, -110.0], [0, 0, -3.0, 40.0], [0, 0, 0, 1]])
    folder = tmp_path / "ct"
    files = write_ct_series(volume, affine, folder, patient_id="SYN-0001", study_uid="1.2.826.0.1.3680043.8.498.1")
    assert [f.name for f in files] == [f"IM{k:04d}.dcm" for k in range(1, 10)]

    # Shuffle which file holds which slice, so only the geometry can order them.
    names = [f.name for f in files]
    shuffled = names[:]
    random.Random(3).shuffle(shuffled)
    for f in files:
        f.rename(f.with_suffix(".tmp"))
    for old, new in zip(names, shuffled):
        (folder / old).with_suffix(".tmp").rename(folder / new)

    read, read_affine = read_ct_series(folder)
    assert read.dtype == np.float32
    # Slices come back ascending along the slice normal (+z here): the k axis is
    # reversed relative to what we wrote, the world geometry is identical.
    np.testing.assert_array_equal(read, volume[:, :, ::-1])
    np.testing.assert_allclose(read_affine, _flip_slices(affine, volume.shape[2]), atol=1e-6)
    written = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    reread = nib.as_closest_canonical(nib.Nifti1Image(read, read_affine))
    np.testing.assert_array_equal(reread.get_fdata(), written.get_fdata())
    np.testing.assert_allclose(reread.affine, written.affine, atol=1e-6)


@pytest.mark.parametrize(
    "affine",
    [
        # radiological-style axial: i runs right-to-left, k follows the normal
        np.array([[-0.9, 0, 0, 90.0], [0, 0.9, 0, -110.0], [0, 0, -3.0, 30.0], [0, 0, 0, 1]]),
        # coronal slices: i -> x, j -> -z, k -> +y (non-diagonal affine)
        np.array([[0.75, 0, 0, -80.0], [0, 0, 2.5, 60.0], [0, -0.75, 0, 50.0], [0, 0, 0, 1]]),
    ],
)
def test_round_trip_exact_when_k_follows_normal(tmp_path, affine):
    volume = _synthetic_volume(shape=(16, 12, 5), seed=1)
    write_ct_series(volume, affine, tmp_path / "ct", patient_id="P")
    read, read_affine = read_ct_series(tmp_path / "ct")
    np.testing.assert_array_equal(read, volume)
    np.testing.assert_allclose(read_affine, affine, atol=1e-6)


def test_written_files_are_valid_ct_image_storage(tmp_path):
    volume = _synthetic_volume(shape=(8, 6, 4))
    affine = np.array([[0.9, 0, 0, -10.0], [0, 0.8, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
    files = write_ct_series(volume, affine, tmp_path / "ct", patient_id="SYN-7", study_uid="1.2.3.4",
                            series_description="CT BRAIN")
    datasets = [pydicom.dcmread(f) for f in files]
    for k, ds in enumerate(datasets):
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT" and ds.PatientID == "SYN-7" and ds.SeriesDescription == "CT BRAIN"
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (6, 8)  # rows run along j, columns along i
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.8, 0.9])
        assert float(ds.SliceThickness) == pytest.approx(3.0)
        # LPS: RAS (x, y, z) -> (-x, -y, z)
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([10.0, 20.0, 5.0 + 3.0 * k])
        assert [float(v) for v in ds.ImageOrientationPatient] == pytest.approx([-1, 0, 0, 0, -1, 0])
        assert ds.pixel_array.dtype == np.uint16
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, volume[:, :, k].T)
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.3.4"}
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)

    # Same inputs -> same UIDs (reproducible synthetic data).
    again = write_ct_series(volume, affine, tmp_path / "again", patient_id="SYN-7", study_uid="1.2.3.4",
                            series_description="CT BRAIN")
    assert pydicom.dcmread(again[0]).SeriesInstanceUID == datasets[0].SeriesInstanceUID


def test_writer_uses_signed_pixels_below_intercept(tmp_path):
    volume = np.full((4, 4, 2), -2000.0)
    volume[0, 0, 0] = 500.0
    files = write_ct_series(volume, np.eye(4), tmp_path / "ct", patient_id="P")
    assert pydicom.dcmread(files[0]).pixel_array.dtype == np.int16
    read, _ = read_ct_series(tmp_path / "ct")
    np.testing.assert_array_equal(read, volume)


def test_writer_refuses_non_orthogonal_in_plane_axes(tmp_path):
    affine = np.array([[1.0, 0.5, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="orthogonal"):
        write_ct_series(np.zeros((2, 2, 2)), affine, tmp_path / "ct", patient_id="P")


# --------------------------------------------------------------------------- real files, stacked


def _stack(source: Path, folder: Path, n: int = 2) -> Path:
    """``n`` slices from one real file: same pixels (compressed as shipped), positions one
    SliceThickness apart along the normal, own SOPInstanceUIDs: a minimal real series."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        ds = pydicom.dcmread(source)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        position = np.asarray(ds.ImagePositionPatient, dtype=float) + k * float(ds.SliceThickness) * np.cross(iop[:3], iop[3:])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.{k + 1}"
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"IM{k + 1:04d}", enforce_file_format=True)
    return folder


def test_ct_small_reads_to_hu_with_rescale(tmp_path):
    source = Path(get_testdata_file("CT_small.dcm"))
    volume, affine = read_ct_series(_stack(source, tmp_path / "series"))

    ds = pydicom.dcmread(source)
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert volume.shape == (128, 128, 2)
    np.testing.assert_array_equal(volume[:, :, 0], expected.T)
    # Raw stored values are 128..2191: the rescale moved them into the HU range.
    assert volume.min() == -896.0 and volume.max() == 1167.0
    assert ds.pixel_array.min() == 128
    # Geometry: 0.661468 mm pixels, slices 5 mm apart, LPS -> RAS origin.
    np.testing.assert_allclose(np.diag(affine)[:3], [-0.661468, -0.661468, 5.0], atol=1e-6)
    np.testing.assert_allclose(affine[:3, 3], [158.135803, 179.035797, -75.699997], atol=1e-5)


def test_a_single_slice_is_refused(tmp_path):
    """One image is not a CT volume: its thickness would be guessed and the brain missed."""
    folder = _copy_series(tmp_path, Path(get_testdata_file("CT_small.dcm")))
    with pytest.raises(DicomSeriesError, match=r"single slice: series .*CT, 1 slice\) has one image") as info:
        read_ct_series(folder)
    assert str(folder) in str(info.value)


def test_mr_small_series_reads_but_not_as_ct(tmp_path):
    source = Path(get_testdata_file("MR_small.dcm"))
    folder = _stack(source, tmp_path / "series")
    with pytest.raises(DicomSeriesError, match="Modality is MR, expected CT") as info:
        read_ct_series(folder)  # an MR series in the CT slot is refused, naming the folder
    assert str(folder) in str(info.value)
    volume, affine = read_ct_series(folder, modality=None)  # the geometry reader itself handles MR
    ds = pydicom.dcmread(source)
    assert volume.shape == (64, 64, 2)
    np.testing.assert_array_equal(volume[:, :, 1], ds.pixel_array.T)  # no rescale tags: raw values
    assert np.linalg.norm(affine[:3, 2]) == pytest.approx(float(ds.SliceThickness))  # 0.8 mm


# --------------------------------------------------------------------------- compressed transfer syntaxes


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_series_decode_to_the_uncompressed_pixels(tmp_path, name):
    """RLE, JPEG 2000 and JPEG-LS as shipped by pydicom: the same MR image as MR_small.dcm, compressed."""
    source = Path(get_testdata_file(name))
    syntax = pydicom.dcmread(source).file_meta.TransferSyntaxUID
    assert syntax.is_compressed
    volume, affine = read_ct_series(_stack(source, tmp_path / "compressed"), modality=None)
    reference, reference_affine = read_ct_series(_stack(Path(get_testdata_file("MR_small.dcm")), tmp_path / "plain"),
                                                 modality=None)
    np.testing.assert_array_equal(volume, reference)
    np.testing.assert_allclose(affine, reference_affine)


def test_jpeg_lossless_ct_series_as_pacs_exports_it():
    """JPEG Lossless SV1, the usual PACS export, of a real CT series (tests/data/ct_jpeg_lossless/README.md)."""
    folder = Path(__file__).parent / "data" / "ct_jpeg_lossless"
    syntaxes = {pydicom.dcmread(f).file_meta.TransferSyntaxUID for f in folder.glob("*.dcm")}
    assert syntaxes == {pydicom.uid.JPEGLosslessSV1}
    volume, affine = read_ct_series(folder)
    reference, reference_affine = read_ct_series(DICOMDIR_TESTS / "98892001" / "CT5N")
    np.testing.assert_array_equal(volume, reference)
    np.testing.assert_allclose(affine, reference_affine)


def test_a_colour_image_is_refused(tmp_path):
    """JPEG Lossless RGB (a secondary capture, e.g. a screenshot) is decodable but no CT slice."""
    source = Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    folder = tmp_path / "sc"
    for k in range(2):
        ds = pydicom.dcmread(source)
        ds.Modality = "CT"
        ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, k], [1, 0, 0, 0, 1, 0], [1, 1]
        ds.SOPInstanceUID = f"1.2.3.{k}"
        folder.mkdir(exist_ok=True)
        ds.save_as(folder / f"IM{k}", enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match=r"IM0 is a colour image \(RGB\), not a greyscale slice"):
        read_ct_series(folder)


# --------------------------------------------------------------------------- PACS export layouts


def test_series_in_nested_folders_with_a_readme_is_found(tmp_path):
    """PACS exports nest patient/study/series folders and add read-me files."""
    export = tmp_path / "export"
    shutil.copytree(DICOMDIR_TESTS / "98892001" / "CT5N", export / "PAT1" / "STUDY1" / "SER5")
    (export / "README.TXT").write_text("exported by a PACS\n")
    volume, affine = read_ct_series(export)
    reference, reference_affine = read_ct_series(DICOMDIR_TESTS / "98892001" / "CT5N")
    np.testing.assert_array_equal(volume, reference)
    np.testing.assert_allclose(affine, reference_affine)


def test_dicomdir_file_set_export_is_read(tmp_path):
    """A DICOM File-set (DICOMDIR + PT000000/ST000000/SE000000/IM...) as written to CD or USB."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    for path in sorted((DICOMDIR_TESTS / "98892001" / "CT5N").iterdir()):
        fs.add(pydicom.dcmread(path))
    fs.write(tmp_path / "cd")
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    assert len(find_series(tmp_path / "cd")) == 1
    volume, _ = read_ct_series(tmp_path / "cd")
    np.testing.assert_array_equal(volume, read_ct_series(DICOMDIR_TESTS / "98892001" / "CT5N")[0])


def test_several_series_are_listed_and_the_datalist_can_pick_one(tmp_path):
    """pydicom's DICOMDIR export of three patients: two CT volumes, a CT scout, CR and MR series."""
    export = tmp_path / "export"
    for name in ("77654033", "98892001", "98892003"):
        shutil.copytree(DICOMDIR_TESTS / name, export / name)
    shutil.copy(DICOMDIR_TESTS / "DICOMDIR", export / "DICOMDIR")
    shutil.copy(DICOMDIR_TESTS / "README.txt", export / "README.txt")
    with pytest.raises(DicomSeriesError, match=r'mixed series: 2 series could be the CT; name one in the datalist as '
                                               r'"ct_series_uid"') as info:
        read_ct_series(export)
    message = str(info.value)
    ct5n = pydicom.dcmread(next((DICOMDIR_TESTS / "98892001" / "CT5N").iterdir())).SeriesInstanceUID
    assert f"Series here: {ct5n} 'SmartScore - Gated 0.5 sec' (CT, 5 slices) in 98892001/CT5N; " in message
    assert "'Routine Brain' (CT, 4 slices)" in message and "'Scout' (CT, 2 slices, localizer)" in message
    assert "'Cervical LAT' (CR, 1 slice)" in message

    volume, _ = read_ct_series(export, series_uid=ct5n)
    np.testing.assert_array_equal(volume, read_ct_series(DICOMDIR_TESTS / "98892001" / "CT5N")[0])
    with pytest.raises(DicomSeriesError, match=r"ct_series_uid 1\.2\.3 is not in this folder; series here: .*Scout"):
        read_ct_series(export, series_uid="1.2.3")
    scout = pydicom.dcmread(next((DICOMDIR_TESTS / "98892001" / "CT2N").iterdir())).SeriesInstanceUID
    with pytest.raises(DicomSeriesError, match="is a scout / localizer"):
        read_ct_series(export, series_uid=scout)


def test_a_scout_only_folder_is_refused():
    with pytest.raises(DicomSeriesError, match=r"'Scout' \(CT, 2 slices, localizer\) is a scout / localizer "
                                               r"\(ImageType LOCALIZER\), not a volume"):
        read_ct_series(DICOMDIR_TESTS / "98892001" / "CT2N")


# --------------------------------------------------------------------------- real series


def test_contiguous_z_descending_series_is_ordered_along_normal():
    folder = DICOMDIR_TESTS / "98892001" / "CT5N"
    datasets = sorted((pydicom.dcmread(f) for f in folder.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    z_by_instance = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z_by_instance == sorted(z_by_instance, reverse=True)  # the scanner stored them descending

    volume, affine = read_ct_series(folder)
    assert volume.shape == (16, 16, 5)
    # Normal of IOP [1,0,0, 0,1,0] is +z: slice 0 is the lowest z = the last instance.
    for k, ds in enumerate(reversed(datasets)):
        np.testing.assert_array_equal(volume[:, :, k], pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).T)
    world_z = [(affine @ [0, 0, k, 1])[2] for k in range(5)]
    assert np.all(np.diff(world_z) > 0)
    np.testing.assert_allclose(affine[:3, 2], [0, 0, 2.5], atol=1e-5)
    np.testing.assert_allclose(world_z, sorted(z_by_instance), atol=1e-5)


def test_series_with_gap_is_refused():
    folder = DICOMDIR_TESTS / "77654033" / "CT2"
    with pytest.raises(DicomSeriesError, match=r"gap") as info:
        read_ct_series(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "17106" in message and "17136" in message  # names where the gap is
    assert "missing slice" in message


def test_projection_series_is_refused_as_mixed_orientation():
    with pytest.raises(DicomSeriesError, match="mixed orientations"):
        read_ct_series(DICOMDIR_TESTS / "98892003" / "MR700", modality=None)  # geometry checks on MR too


def test_three_plane_localizer_is_refused(tmp_path):
    """MR2 mixes three series; one of them alone is a sagittal/coronal/axial localizer."""
    with pytest.raises(DicomSeriesError, match="mixed series: 2 series could be the volume"):
        read_ct_series(DICOMDIR_TESTS / "98892003" / "MR2", modality=None)
    with pytest.raises(DicomSeriesError, match="no usable CT series: .*FAST LOCALIZER' \\(MR, 1 slice\\)"):
        read_ct_series(DICOMDIR_TESTS / "98892003" / "MR2")
    mr2 = DICOMDIR_TESTS / "98892003" / "MR2"
    folder = _copy_series(tmp_path, *(mr2 / name for name in ("4950", "4981", "5011")))
    with pytest.raises(DicomSeriesError, match="mixed orientations"):
        read_ct_series(folder, modality=None)


def test_projection_image_without_geometry_is_refused(tmp_path):
    with pytest.raises(DicomSeriesError, match="Modality is CR, expected CT"):
        read_ct_series(DICOMDIR_TESTS / "77654033" / "CR1")
    (tmp_path / "cr").mkdir()
    for k in range(2):  # two radiographs of one series: still no slice positions
        ds = pydicom.dcmread(next((DICOMDIR_TESTS / "77654033" / "CR1").iterdir()))
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k}"
        ds.save_as(tmp_path / "cr" / f"IM{k}")
    with pytest.raises(DicomSeriesError, match="IM0 lacks ImagePositionPatient"):
        read_ct_series(tmp_path / "cr", modality=None)


# --------------------------------------------------------------------------- damaged folders


def test_mixed_series_names_the_folder(tmp_path):
    ct_small = _stack(Path(get_testdata_file("CT_small.dcm")), tmp_path / "ct_small", n=3)
    folder = _copy_series(tmp_path, DICOMDIR_TESTS / "98892001" / "CT5N", ct_small)
    with pytest.raises(DicomSeriesError, match="mixed series") as info:
        read_ct_series(folder)
    assert info.value.folder == folder
    assert str(folder) in str(info.value)
    assert "(CT, 5 slices)" in str(info.value) and "(no description) (CT, 3 slices)" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_stray_single_image_beside_a_series_is_left_out(tmp_path):
    """A lone image of another series (a key image, a dose report screenshot) is not part of the CT."""
    folder = _copy_series(tmp_path, DICOMDIR_TESTS / "98892001" / "CT5N", Path(get_testdata_file("CT_small.dcm")))
    assert read_ct_series(folder)[0].shape == (16, 16, 5)


@pytest.mark.parametrize("keep_fraction", [0.02, 0.5])
def test_truncated_file_is_named(tmp_path, keep_fraction):
    folder = _copy_series(tmp_path, DICOMDIR_TESTS / "98892001" / "CT5N")
    victim = sorted(folder.iterdir())[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(DicomSeriesError) as info:
        read_ct_series(folder)
    assert victim.name in str(info.value)
    assert "truncated" in str(info.value) or "decode" in str(info.value)


def test_truncated_pixel_data_is_named(tmp_path):
    folder = _stack(Path(get_testdata_file("CT_small.dcm")), tmp_path / "series")
    victim = folder / "IM0002"
    victim.write_bytes(victim.read_bytes()[:-8000])  # cut inside Pixel Data
    with pytest.raises(DicomSeriesError, match="cannot decode pixel data") as info:
        read_ct_series(folder)
    assert victim.name in str(info.value)


def test_empty_and_missing_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomSeriesError, match="empty folder"):
        read_ct_series(tmp_path / "empty")
    with pytest.raises(DicomSeriesError, match="does not exist"):
        read_ct_series(tmp_path / "nowhere")
    (tmp_path / "junk" / "sub").mkdir(parents=True)
    (tmp_path / "junk" / "sub" / "notes.txt").write_text("not an image\n" * 20)
    with pytest.raises(DicomSeriesError, match=r"empty folder: no DICOM image files \(skipped: sub/notes.txt\)"):
        read_ct_series(tmp_path / "junk")
    (tmp_path / "junk" / "sub" / "IM0001").write_text("not an image either\n" * 20)
    with pytest.raises(DicomSeriesError, match=r"sub/IM0001 is not a DICOM file"):
        read_ct_series(tmp_path / "junk")


def test_missing_slice_in_written_series_names_neighbours(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    files = write_ct_series(_synthetic_volume(shape=(6, 6, 8)), affine, tmp_path / "ct", patient_id="P")
    files[4].unlink()
    with pytest.raises(DicomSeriesError, match=r"IM0004.*IM0006.*about 1 missing slice\)"):
        read_ct_series(tmp_path / "ct")


def test_duplicate_position_is_refused(tmp_path):
    folder = _copy_series(tmp_path, DICOMDIR_TESTS / "98892001" / "CT5N")
    first = sorted(folder.iterdir())[0]
    shutil.copy(first, folder / "copy_of_first")
    with pytest.raises(DicomSeriesError, match="duplicate slice position"):
        read_ct_series(folder)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]), "inconsistent PixelSpacing"),
        (lambda ds: ds.set_pixel_data(np.zeros((5, 6), np.uint16), "MONOCHROME2", 16,
                                      generate_instance_uid=False), "inconsistent Rows x Columns"),
        (lambda ds: setattr(ds, "ImagePositionPatient", [-3.0, 0.0, 4.0]), "displaced"),
    ],
)
def test_inconsistent_slices_are_refused(tmp_path, edit, expected):
    files = write_ct_series(_synthetic_volume(shape=(6, 6, 4)), np.diag([1.0, 1.0, 2.0, 1.0]),
                            tmp_path / "ct", patient_id="P")
    ds = pydicom.dcmread(files[2])
    edit(ds)
    ds.save_as(files[2], enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match=expected):
        read_ct_series(tmp_path / "ct")
