"""Datalist loading and the per-case data check, on cases derived from a real
(big-endian) scanner NIfTI shipped with nibabel, then deliberately damaged."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from rich.console import Console

from fedbrain.data.check import (
    CaseCheck,
    check_case,
    check_datalist,
    render_check_table,
    run_data_check,
    summarize,
)
from fedbrain.data.datalist import DatalistError, load_datalist
from fedbrain.data.dicom import read_ct_series, write_ct_series

ANATOMICAL = Path(data_path) / "anatomical.nii"  # (33, 41, 25) big-endian int16
MODALITY_FILES = ("t1.nii", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz")


def _make_case(root: Path, case_id: str, with_ct: bool = False) -> dict:
    """A case whose 4 images and label are derived from anatomical.nii.

    T1 is a byte copy (keeps the big-endian on-disk layout); the others are
    rescaled float copies; the label thresholds intensity into BraTS classes.
    """
    case_dir = root / "cases" / case_id
    case_dir.mkdir(parents=True)
    source = nib.load(ANATOMICAL)
    data = np.asanyarray(source.dataobj).astype(np.float32)
    shutil.copy(ANATOMICAL, case_dir / MODALITY_FILES[0])
    for n, name in enumerate(MODALITY_FILES[1:], start=1):
        nib.save(nib.Nifti1Image(data * (1.0 + 0.5 * n), source.affine), case_dir / name)
    label = np.zeros(data.shape, np.uint8)
    label[data > np.percentile(data, 80)] = 2
    label[data > np.percentile(data, 90)] = 1
    label[data > np.percentile(data, 95)] = 4
    nib.save(nib.Nifti1Image(label, source.affine), case_dir / "seg.nii.gz")
    item = {
        "case_id": case_id,
        "image": [f"cases/{case_id}/{name}" for name in MODALITY_FILES],
        "label": f"cases/{case_id}/seg.nii.gz",
        "grade": "HGG",
    }
    if with_ct:
        _write_ct_over(source, case_dir / "ct", patient_id=case_id)
        item["ct"] = f"cases/{case_id}/ct"
    return item


CT_SPACING = (1.7, 1.7, 3.0)


def _write_ct_over(mri, folder: Path, patient_id: str, shift_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A CT on its own grid (1.7 x 1.7 x 3 mm, i running right to left) covering the MRI with a
    5 mm margin, moved by ``shift_mm``; HU = 20 + i, linear in world x, so resampling by world
    coordinates can be checked exactly. Returns the CT affine."""
    corners = np.array([[i, j, k, 1] for i in (0, mri.shape[0] - 1) for j in (0, mri.shape[1] - 1)
                        for k in (0, mri.shape[2] - 1)]) @ mri.affine.T
    lo, hi = corners[:, :3].min(0) - 5 + shift_mm, corners[:, :3].max(0) + 5 + shift_mm
    affine = np.diag([-CT_SPACING[0], CT_SPACING[1], CT_SPACING[2], 1.0])
    affine[:3, 3] = [hi[0], lo[1], lo[2]]
    shape = tuple(int(np.ceil((b - a) / s)) + 1 for a, b, s in zip(lo, hi, CT_SPACING))
    hu = 20.0 + np.broadcast_to(np.arange(shape[0], dtype=np.float32)[:, None, None], shape)
    write_ct_series(hu, affine, folder, patient_id=patient_id)
    return affine


def _write_datalist(root: Path, training: list, validation: list | None = None, name="datalist.json") -> Path:
    content = {"site": "test-site", "training": training}
    if validation is not None:
        content["validation"] = validation
    path = root / name
    path.write_text(json.dumps(content, indent=1))
    return path


def _case_dir(root: Path, case_id: str) -> Path:
    return root / "cases" / case_id


# --------------------------------------------------------------------------- load_datalist


def test_load_datalist_resolves_paths_and_defaults(tmp_path):
    item = _make_case(tmp_path, "A-0001", with_ct=True)
    no_id = {k: v for k, v in _make_case(tmp_path, "A-0002").items() if k not in ("case_id", "grade")}
    path = _write_datalist(tmp_path, [item], [no_id])
    loaded = load_datalist(path)
    assert set(loaded) == {"training", "validation"}
    first = loaded["training"][0]
    assert first["case_id"] == "A-0001" and first["grade"] == "HGG"
    assert first["image"] == [str(tmp_path / "cases" / "A-0001" / name) for name in MODALITY_FILES]
    assert first["label"] == str(tmp_path / "cases" / "A-0001" / "seg.nii.gz")
    assert first["ct"] == str(tmp_path / "cases" / "A-0001" / "ct")
    second = loaded["validation"][0]
    assert second["case_id"] == "A-0002"  # from the label's folder
    assert "ct" not in second and "grade" not in second


def test_load_datalist_missing_section_and_root_override(tmp_path):
    item = _make_case(tmp_path / "data", "B-0001")
    item["ct"] = "cases/B-0001/ct-not-there"
    path = _write_datalist(tmp_path, [item])  # datalist outside the data root
    loaded = load_datalist(path, root=tmp_path / "data")
    assert loaded["validation"] == []
    assert loaded["training"][0]["label"] == str(tmp_path / "data" / "cases" / "B-0001" / "seg.nii.gz")
    # A missing folder is still resolved (MONAI's loader would leave it relative).
    assert loaded["training"][0]["ct"] == str(tmp_path / "data" / "cases" / "B-0001" / "ct-not-there")


def test_load_datalist_malformed_json(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text('{"training": [ {"image": ["a", "b"], }')
    with pytest.raises(DatalistError, match="malformed JSON") as info:
        load_datalist(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda item: item.pop("label"), r"training\[1\]: 'label' is missing"),
        (lambda item: item.update(image=item["image"][:3]), r"training\[1\]: 'image' must list exactly 4 files.*got 3"),
        (lambda item: item.update(grade="GBM"), r"training\[1\]: grade 'GBM' is not one of"),
        (lambda item: item.update(case_id="C-0001"), r"training\[1\]: case_id 'C-0001' already used by training\[0\]"),
        (lambda item: item.update(image="one.nii.gz"), r"training\[1\]: 'image' must list"),
    ],
)
def test_load_datalist_bad_items_name_file_and_index(tmp_path, mutate, expected):
    good = _make_case(tmp_path, "C-0001")
    bad = _make_case(tmp_path, "C-0002")
    mutate(bad)
    path = _write_datalist(tmp_path, [good, bad])
    with pytest.raises(DatalistError, match=expected) as info:
        load_datalist(path)
    assert str(path) in str(info.value)


def test_load_datalist_without_cases_or_file(tmp_path):
    path = _write_datalist(tmp_path, [], [])
    with pytest.raises(DatalistError, match="no cases"):
        load_datalist(path)
    with pytest.raises(DatalistError, match="not found"):
        load_datalist(tmp_path / "absent.json")
    path.write_text("[1, 2]")
    with pytest.raises(DatalistError, match="JSON object"):
        load_datalist(path)


# --------------------------------------------------------------------------- check_case


def _damage_truncate_gz(case_dir):
    path = case_dir / "t2.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "t2.nii.gz", "truncated"


def _damage_gz_trailer(case_dir):
    # Cut only the gzip trailer: nibabel alone would still read the voxels.
    path = case_dir / "flair.nii.gz"
    path.write_bytes(path.read_bytes()[:-4])
    return "flair.nii.gz", "truncated"


def _damage_short_nii(case_dir):
    path = case_dir / "t1.nii"
    path.write_bytes(path.read_bytes()[:30000])
    return "t1.nii", "unreadable NIfTI"


def _damage_label_value_3(case_dir):
    img = nib.load(case_dir / "seg.nii.gz")
    label = np.asanyarray(img.dataobj).copy()
    label[0, 0, 0] = 3
    label[0, 0, 1] = 7
    nib.save(nib.Nifti1Image(label, img.affine), case_dir / "seg.nii.gz")
    return "seg.nii.gz", "values outside {0, 1, 2, 4}: 3, 7"


def _damage_nan(case_dir):
    img = nib.load(case_dir / "t1ce.nii.gz")
    data = img.get_fdata(dtype=np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 2] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine), case_dir / "t1ce.nii.gz")
    return "t1ce.nii.gz", "1 NaN, 1 Inf"


def _damage_shape(case_dir):
    img = nib.load(case_dir / "t2.nii.gz")
    nib.save(nib.Nifti1Image(img.get_fdata()[:, :, :20], img.affine), case_dir / "t2.nii.gz")
    return "t2.nii.gz", "not on the voxel grid of label seg.nii.gz: shape (33, 41, 20) differs from (33, 41, 25)"


def _damage_affine(case_dir):
    img = nib.load(case_dir / "flair.nii.gz")
    affine = img.affine.copy()
    affine[:3, 3] += [3.0, 4.0, 0.0]
    nib.save(nib.Nifti1Image(img.get_fdata(), affine), case_dir / "flair.nii.gz")
    return "flair.nii.gz", "not on the voxel grid of label seg.nii.gz: affine differs: origin shifted by 5.000 mm"


def _damage_voxel_size(case_dir):
    img = nib.load(case_dir / "t2.nii.gz")
    nib.save(nib.Nifti1Image(img.get_fdata(), img.affine @ np.diag([1, 1, 1.5, 1])), case_dir / "t2.nii.gz")
    return "t2.nii.gz", "voxel size (2.0, 2.0, 3.0) vs (2.0, 2.0, 2.0)"


def _damage_missing(case_dir):
    (case_dir / "t1ce.nii.gz").unlink()
    return "t1ce.nii.gz", "file not found"


def _damage_empty(case_dir):
    (case_dir / "seg.nii.gz").write_bytes(b"")
    return "seg.nii.gz", "empty file"


def _damage_ct_gap(case_dir):
    (case_dir / "ct" / "IM0003.dcm").unlink()
    return "ct", "gap"


def _damage_ct_truncated(case_dir):
    path = case_dir / "ct" / "IM0002.dcm"
    path.write_bytes(path.read_bytes()[:200])
    return "IM0002.dcm", "CT ct:"


def _damage_all_4d(case_dir):
    for f in (*MODALITY_FILES, "seg.nii.gz"):
        img = nib.load(case_dir / f)
        data = np.asanyarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), case_dir / f)
    return "seg.nii.gz", "not a 3D volume"


def _damage_label_fraction(case_dir):
    img = nib.load(case_dir / "seg.nii.gz")
    label = np.asanyarray(img.dataobj).astype(np.float32)
    label[label == 4] = 1.5
    nib.save(nib.Nifti1Image(label, img.affine), case_dir / "seg.nii.gz")
    return "seg.nii.gz", "values outside {0, 1, 2, 4}: 1.5"


def _damage_zero_image(case_dir):
    img = nib.load(case_dir / "t2.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), case_dir / "t2.nii.gz")
    return "t2.nii.gz", "all voxels are zero (no brain)"


def _damage_ct_elsewhere(case_dir):
    """A CT of the same head in its scanner's own space, 400 mm away from the MRI's."""
    shutil.rmtree(case_dir / "ct")
    _write_ct_over(nib.load(case_dir / "seg.nii.gz"), case_dir / "ct", "P", shift_mm=(0.0, 0.0, 400.0))
    return "ct", "covers 0% of the MRI brain (needs 90%)"


def _damage_ct_single_slice(case_dir):
    for extra in sorted((case_dir / "ct").iterdir())[1:]:
        extra.unlink()
    return "ct", "single slice"


def _damage_ct_air(case_dir):
    """The CT grid covers the brain but holds air there: a CT of another region or position."""
    files = sorted((case_dir / "ct").iterdir())
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PixelData = np.zeros_like(ds.pixel_array).tobytes()  # stored 0 = -1024 HU
        ds.save_as(path)
    return "ct", "is air (below -200 HU) in 100% of the MRI brain"


def _damage_ct_two_series(case_dir):
    """A second CT volume (another reconstruction kernel) exported into the same folder."""
    _write_ct_over(nib.load(case_dir / "seg.nii.gz"), case_dir / "ct" / "bone", "P")
    return "ct", 'mixed series: 2 series could be the CT; name one in the datalist as "ct_series_uid"'


def _damage_copied_contrast(case_dir):
    """A missing FLAIR papered over with a copy of the T2 under the FLAIR name."""
    shutil.copy(case_dir / "t2.nii.gz", case_dir / "flair.nii.gz")
    return "flair.nii.gz", "same voxels as T2 t2.nii.gz (a copied contrast?)"


DAMAGES = [
    _damage_truncate_gz, _damage_gz_trailer, _damage_short_nii, _damage_label_value_3, _damage_nan,
    _damage_shape, _damage_affine, _damage_voxel_size, _damage_missing, _damage_empty,
    _damage_ct_gap, _damage_ct_truncated, _damage_all_4d, _damage_label_fraction, _damage_zero_image,
    _damage_ct_elsewhere, _damage_ct_single_slice, _damage_ct_air, _damage_ct_two_series, _damage_copied_contrast,
]


def test_clean_case_passes(tmp_path):
    item = _make_case(tmp_path, "OK-0001", with_ct=True)
    case = load_datalist(_write_datalist(tmp_path, [item]))["training"][0]
    result = check_case(case, "training")
    assert result == CaseCheck("OK-0001", "training", True, [], mri_ok=True)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.removeprefix("_damage_"))
def test_each_damage_is_reported_with_file_and_reason(tmp_path, damage):
    item = _make_case(tmp_path, "BAD-0001", with_ct=True)
    file_name, reason = damage(_case_dir(tmp_path, "BAD-0001"))
    case = load_datalist(_write_datalist(tmp_path, [item]))["training"][0]
    result = check_case(case, "training")
    assert not result.ok
    matching = [p for p in result.problems if file_name in p and reason in p]
    assert matching, result.problems
    # A single damage should not cascade into unrelated complaints (five 4-D files are five).
    assert len(result.problems) == (5 if damage is _damage_all_4d else 1), result.problems


def test_check_case_never_raises_on_malformed_item():
    result = check_case({"case_id": "X", "image": None}, "training")
    assert not result.ok and "expected 4 image files" in result.problems[0]


# --------------------------------------------------------------------------- check_datalist / CLI helpers


@pytest.fixture
def mixed_site(tmp_path):
    """One clean case per section plus every kind of damage, in one datalist."""
    training = [_make_case(tmp_path, "GOOD-T", with_ct=True)]
    validation = [_make_case(tmp_path, "GOOD-V")]
    expected = {}
    for n, damage in enumerate(DAMAGES):
        case_id = f"BAD-{n:02d}"
        training.append(_make_case(tmp_path, case_id, with_ct=True))
        expected[case_id] = damage(_case_dir(tmp_path, case_id))
    return _write_datalist(tmp_path, training, validation), expected


def test_check_datalist_reports_every_bad_case_without_raising(mixed_site):
    path, expected = mixed_site
    results = check_datalist(path, progress=False)
    by_id = {result.case_id: result for result in results}
    assert by_id["GOOD-T"].ok and by_id["GOOD-V"].ok
    assert by_id["GOOD-V"].section == "validation"
    for case_id, (file_name, reason) in expected.items():
        assert not by_id[case_id].ok
        assert any(file_name in p and reason in p for p in by_id[case_id].problems), by_id[case_id].problems
    summary = summarize(results)
    assert summary["cases"] == len(expected) + 2
    assert summary["ok"] == 2 and summary["problems"] == len(expected)
    assert summary["sections"]["validation"] == {"cases": 1, "ok": 1, "problems": 0}


def test_render_and_run_data_check(mixed_site, tmp_path):
    path, expected = mixed_site
    buffer = io.StringIO()
    console = Console(file=buffer, width=300, force_terminal=False, color_system=None)
    assert run_data_check(path, console=console) == 1
    output = buffer.getvalue()
    assert "GOOD-T" in output and "BAD-00" in output
    assert "problem" in output and "values outside {0, 1, 2, 4}" in output
    assert f"{len(expected) + 2} cases: 2 ok, {len(expected)} with problems" in output

    clean_root = tmp_path / "clean"
    clean = _write_datalist(clean_root.mkdir() or clean_root, [_make_case(clean_root, "ONLY-0001")])
    buffer = io.StringIO()
    assert run_data_check(clean, console=Console(file=buffer, width=200, color_system=None)) == 0
    assert "ONLY-0001" in buffer.getvalue() and "1 ok" in buffer.getvalue()

    broken = tmp_path / "broken.json"
    broken.write_text("{")
    buffer = io.StringIO()
    assert run_data_check(broken, console=Console(file=buffer, width=200, color_system=None)) == 1
    assert "malformed JSON" in buffer.getvalue()


def test_progress_bar_mode_gives_same_results(mixed_site):
    """With the bar: every case of the file, in file order, each with the verdict of the quiet path."""
    path, expected = mixed_site
    quiet = check_datalist(path)
    noisy = check_datalist(path, progress=True)
    listed = json.loads(Path(path).read_text())
    in_file = [(section, item["case_id"]) for section in ("training", "validation") for item in listed[section]]
    assert len(in_file) == len(expected) + 2
    assert [(r.section, r.case_id) for r in noisy] == in_file
    assert noisy == quiet
    assert {r.case_id for r in noisy if r.ok} == {"GOOD-T", "GOOD-V"}
    assert all(r.problems for r in noisy if not r.ok)


def test_render_escapes_markup_in_problems():
    buffer = io.StringIO()
    results = [CaseCheck("[bold]x", "training", False, ["image[0] [red]odd[/red] file"])]
    render_check_table(results, console=Console(file=buffer, width=200, color_system=None))
    assert "[red]odd[/red]" in buffer.getvalue() and "[bold]x" in buffer.getvalue()


def test_datalist_paths_independent_of_cwd(tmp_path, monkeypatch):
    item = _make_case(tmp_path, "CWD-0001")
    path = _write_datalist(tmp_path, [item])
    monkeypatch.chdir(tmp_path / "cases")
    results = check_datalist(os.path.relpath(path))
    assert [r.ok for r in results] == [True]


def test_datalist_saved_with_a_byte_order_mark_loads(tmp_path):
    """Windows Notepad writes UTF-8 with a BOM; the datalist is still the same datalist."""
    case = _make_case(tmp_path, "C-0001")
    plain = _write_datalist(tmp_path, [case])
    bom = tmp_path / "datalist-bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_datalist(bom, root=plain.parent) == load_datalist(plain)


def test_two_cases_without_case_id_in_one_folder_are_named_by_what_the_user_wrote(tmp_path):
    a, b = _make_case(tmp_path, "C-0001"), _make_case(tmp_path, "C-0002")
    for item in (a, b):
        item.pop("case_id")
        item["label"] = "labels/common/seg.nii.gz"  # both labels in one folder
    path = _write_datalist(tmp_path, [a, b])
    with pytest.raises(DatalistError, match=r"case_id 'common' already used by training\[0\] \(no case_id given: "
                                            r"derived from the label's folder 'common'"):
        load_datalist(path)


def test_one_file_in_two_contrast_slots_is_refused(tmp_path):
    case = _make_case(tmp_path, "C-0001")
    case["image"] = [case["image"][0]] * 4  # one scan copied into every slot
    path = _write_datalist(tmp_path, [case])
    with pytest.raises(DatalistError, match=r"the same file is listed as T1 and T1ce: .*t1\.nii"):
        load_datalist(path)


def test_data_check_refuses_4d_files_as_training_does(tmp_path):
    """Five 4-D files on one grid once passed `data check` and were then skipped by training."""
    case = _make_case(tmp_path, "C-4D")
    for rel in [*case["image"], case["label"]]:
        f = tmp_path / rel
        img = nib.load(f)
        data = np.asanyarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), f)
    path = _write_datalist(tmp_path, [case])
    result = check_case(load_datalist(path)["training"][0])
    assert not result.ok
    assert any("not a 3D volume" in p for p in result.problems), result.problems


def test_data_check_accepts_a_folder_of_site_datalists_like_train(tmp_path):
    from fedbrain.cli import main as cli_main

    for site in ("site-1", "site-2"):
        folder = tmp_path / "data" / site
        folder.mkdir(parents=True)
        _write_datalist(folder, [_make_case(folder, f"{site}-C1")])
    assert cli_main(["data", "check", str(tmp_path / "data")]) == 0
    bad = tmp_path / "data" / "site-2" / "cases" / "site-2-C1" / "seg.nii.gz"
    bad.unlink()
    assert cli_main(["data", "check", str(tmp_path / "data")]) == 1


# --------------------------------------------------------------------------- one validator: check == training


def _load_for_training(case):
    """What a segmentation and a classification site load from ``[case]``: (loaded?, skip reason) per task."""
    from fedbrain.data.dataset import load_cases
    from fedbrain.data.multimodal import classification_transforms, load_classification_cases
    from fedbrain.data.transforms import segmentation_transforms

    out = {}
    for task, (load, transform) in {
        "segment": (load_cases, segmentation_transforms(False, spacing=4.0)),
        "classify": (load_classification_cases, classification_transforms(False, spatial_size=(8, 8, 8))),
    }.items():
        dataset, skipped = load([case], transform)
        out[task] = (len(dataset) == 1, skipped[0].reason if skipped else None)
    return out


@pytest.mark.parametrize("damage", [None, *DAMAGES], ids=lambda f: f.__name__.removeprefix("_damage_") if f else "clean")
def test_data_check_and_training_decide_alike(tmp_path, damage):
    """Every damaged-case fixture through `data check` and through both tasks' loading:
    a case the check passes is loaded, a case it fails is skipped with exactly its problems."""
    item = _make_case(tmp_path, "CASE", with_ct=True)
    if damage is not None:
        damage(_case_dir(tmp_path, "CASE"))
    case = load_datalist(_write_datalist(tmp_path, [item]))["training"][0]
    checked = check_case(case)
    assert checked.ok == (damage is None), checked.problems
    ct_only = damage is not None and damage.__name__.startswith("_damage_ct_")
    assert checked.mri_ok == (damage is None or ct_only), checked.problems
    for task, (loaded, reason) in _load_for_training(case).items():
        if task == "segment" and ct_only:  # MRI-only segmentation reads no CT: the case is its to use
            assert loaded and reason is None, reason
            continue
        assert loaded == checked.ok, (task, reason)
        assert reason == (None if checked.ok else "; ".join(checked.problems)), task


# --------------------------------------------------------------------------- label conventions


def _relabel(case_dir: Path, mapping: dict) -> np.ndarray:
    img = nib.load(case_dir / "seg.nii.gz")
    label = np.asanyarray(img.dataobj).copy()
    out = label.copy()
    for old, new in mapping.items():
        out[label == old] = new
    nib.save(nib.Nifti1Image(out, img.affine), case_dir / "seg.nii.gz")
    return out


def test_brats2023_labels_are_read_when_the_datalist_says_so(tmp_path):
    """BraTS 2023 writes enhancing tumour as 3: declared at the datalist's top level, the check
    passes and training's ET channel is exactly the voxels labelled 3."""
    from fedbrain.data.dataset import load_cases
    from fedbrain.data.transforms import segmentation_transforms

    item = _make_case(tmp_path, "C-2023")
    label = _relabel(_case_dir(tmp_path, "C-2023"), {4: 3})
    path = _write_datalist(tmp_path, [item])
    content = json.loads(path.read_text())
    content["label_convention"] = "brats2023"
    path.write_text(json.dumps(content))
    case = load_datalist(path)["training"][0]
    assert case["label_convention"] == "brats2023"
    assert check_case(case).ok
    dataset, skipped = load_cases([case], segmentation_transforms(False, spacing=2.0, k_divisible=1))
    assert not skipped
    tc, wt, et = (dataset.items[0]["label"][n].numpy() for n in range(3))
    assert et.sum() == (label == 3).sum() > 0
    assert wt.sum() == (label > 0).sum() and tc.sum() == np.isin(label, (1, 3)).sum()


def test_a_label_outside_the_declared_convention_is_refused_in_both_paths(tmp_path):
    item = _make_case(tmp_path, "C-0001", with_ct=True)  # labels 0/1/2/4 ...
    item["label_convention"] = "brats2023"  # ... declared as BraTS 2023 for this case
    case = load_datalist(_write_datalist(tmp_path, [item]))["training"][0]
    problems = check_case(case).problems
    assert problems == ['label seg.nii.gz: values outside {0, 1, 2, 3}: 4 (label convention brats2023; these are '
                        'brats2021\'s values (enhancing tumour 4): declare "label_convention": "brats2021" in the '
                        'datalist, or relabel 4 -> 3)']
    assert {reason for _, reason in _load_for_training(case).values()} == {problems[0]}


def test_an_unknown_label_convention_is_a_datalist_error(tmp_path):
    path = _write_datalist(tmp_path, [_make_case(tmp_path, "C-0001")])
    path.write_text(json.dumps({**json.loads(path.read_text()), "label_convention": "brats2024"}))
    with pytest.raises(DatalistError, match=r"label_convention 'brats2024' is not one of brats2021, brats2023"):
        load_datalist(path)


# --------------------------------------------------------------------------- CT in the MRI's world


def test_ct_on_another_grid_is_resampled_onto_the_mri_by_world_coordinates(tmp_path):
    """The fixture CT has 1.7 x 1.7 x 3 mm voxels, i running right to left, and HU = 20 + i:
    on the MRI grid every voxel must hold the CT's HU at that voxel's world position."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ResampleToMatchd

    from fedbrain.data.multimodal import LoadCTSeriesd

    item = _make_case(tmp_path, "C-0001", with_ct=True)
    case = load_datalist(_write_datalist(tmp_path, [item]))["training"][0]
    assert check_case(case).ok
    chain = Compose([
        LoadImaged(keys="mri", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="mri"),
        LoadCTSeriesd(keys="ct", ref_key="mri"),
        ResampleToMatchd(keys="ct", key_dst="mri", mode="bilinear", padding_mode="border"),
    ])
    out = chain({"mri": case["image"], "ct": case["ct"]})
    mri = nib.load(case["label"])
    np.testing.assert_allclose(np.asarray(out["ct"].affine), mri.affine, atol=1e-4)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in mri.shape], indexing="ij"), -1).reshape(-1, 3)
    world_x = index @ mri.affine[0, :3] + mri.affine[0, 3]
    _, ct_affine = read_ct_series(case["ct"])
    expected = 20.0 + (world_x - ct_affine[0, 3]) / ct_affine[0, 0]  # HU = 20 + i of the CT
    np.testing.assert_allclose(out["ct"][0].numpy().reshape(-1), expected, atol=1e-3)


def test_a_ct_elsewhere_is_refused_with_the_overlap_and_never_fed_as_zeros(tmp_path):
    item = _make_case(tmp_path, "C-0001", with_ct=True)
    _damage_ct_elsewhere(_case_dir(tmp_path, "C-0001"))
    case = load_datalist(_write_datalist(tmp_path, [item]))["training"][0]
    [problem] = check_case(case).problems
    assert problem.startswith("CT ct: covers 0% of the MRI brain (needs 90%): CT spans x ")
    assert "z 379..439, brain x -32..32 y -40..40 z -16..32 (mm, RAS); CT and MRI must be in one space" in problem
    assert _load_for_training(case) == {"segment": (True, None), "classify": (False, problem)}


def test_ct_series_uid_in_the_datalist_picks_one_of_several_series(tmp_path):
    item = _make_case(tmp_path, "C-0001", with_ct=True)
    case_dir = _case_dir(tmp_path, "C-0001")
    _damage_ct_two_series(case_dir)
    wanted = pydicom.dcmread(next((case_dir / "ct" / "bone").iterdir())).SeriesInstanceUID
    item["ct_series_uid"] = wanted
    case = load_datalist(_write_datalist(tmp_path, [item]))["training"][0]
    assert check_case(case).ok
    assert _load_for_training(case) == {"segment": (True, None), "classify": (True, None)}
    item["ct_series_uid"] = "1.2.3"
    case = load_datalist(_write_datalist(tmp_path, [item]))["training"][0]
    assert "ct_series_uid 1.2.3 is not in this folder; series here: " in check_case(case).problems[0]
    item.pop("ct")
    with pytest.raises(DatalistError, match="ct_series_uid must be a SeriesInstanceUID string next to a 'ct' folder"):
        load_datalist(_write_datalist(tmp_path, [item]))
