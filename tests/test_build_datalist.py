"""`fedbrain data build-datalist`: datalists guessed from BraTS 2021, BraTS 2023 and per-case
folder trees (cases derived from nibabel's real scanner NIfTI), passing `data check`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from rich.console import Console
from test_datalist_check import MODALITY_FILES, _make_case, _write_ct_over

from fedbrain.cli import main as cli_main
from fedbrain.data.build import build_datalist, guess_slot, run_build_datalist
from fedbrain.data.check import check_datalist

BRATS2021 = ("t1", "t1ce", "t2", "flair", "seg")
BRATS2023 = ("t1n", "t1c", "t2w", "t2f", "seg")


def _tree(root: Path, names: list[str], suffixes, relabel=None, sub="") -> None:
    """One case per name, files ``<name>/<name><sep><suffix>.nii.gz`` (BraTS spelling)."""
    scratch = root.parent / f"{root.name}-scratch"
    for name in names:
        _make_case(scratch, name)
        source = scratch / "cases" / name
        folder = root / sub / name
        folder.mkdir(parents=True)
        sep = "-" if "-" in name else "_"
        for file, suffix in zip((*MODALITY_FILES, "seg.nii.gz"), suffixes):
            img = nib.load(source / file)
            data = np.asanyarray(img.dataobj)
            if suffix == "seg" and relabel:
                data = np.where(data == relabel[0], relabel[1], data).astype(data.dtype)
            nib.save(nib.Nifti1Image(data, img.affine), folder / f"{name}{sep}{suffix}.nii.gz")
    shutil.rmtree(scratch)


@pytest.mark.parametrize(
    "name, slot",
    [("BraTS2021_00000_t1.nii.gz", "t1"), ("BraTS2021_00000_t1ce.nii.gz", "t1ce"), ("BraTS2021_00000_seg.nii.gz", "label"),
     ("BraTS-GLI-00000-000-t1n.nii.gz", "t1"), ("BraTS-GLI-00000-000-t1c.nii.gz", "t1ce"),
     ("BraTS-GLI-00000-000-t2w.nii.gz", "t2"), ("BraTS-GLI-00000-000-t2f.nii.gz", "flair"),
     ("AX_T2_FLAIR.nii", "flair"), ("T1_GD.nii.gz", "t1ce"), ("t1_post.nii", "t1ce"), ("T2W_TSE", "t2"),
     ("sag_MPRAGE", "t1"), ("dwi_b1000.nii.gz", None), ("notes.nii.gz", None)],
)
def test_slots_are_guessed_from_whole_name_tokens(name, slot):
    assert guess_slot(name) == slot


def test_brats2021_tree_becomes_a_datalist_that_passes_data_check(tmp_path):
    names = ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    _tree(tmp_path / "data", names, BRATS2021)
    out = tmp_path / "data" / "datalist.json"
    result = build_datalist(tmp_path / "data", out)
    written = json.loads(out.read_text())
    assert written["label_convention"] == "brats2021"
    cases = written["training"] + written["validation"]
    assert sorted(c["case_id"] for c in cases) == names and len(written["validation"]) == 1
    first = next(c for c in cases if c["case_id"] == names[0])
    assert first["image"] == [f"{names[0]}/{names[0]}_{s}.nii.gz" for s in BRATS2021[:4]]
    assert first["label"] == f"{names[0]}/{names[0]}_seg.nii.gz"
    assert not result.unplaced
    assert all(r.ok for r in check_datalist(out)), [r.problems for r in check_datalist(out)]


def test_brats2023_tree_is_read_with_its_label_convention(tmp_path):
    names = ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    _tree(tmp_path / "data", names, BRATS2023, relabel=(4, 3))
    out = tmp_path / "datalist.json"  # outside the data folder: paths are still relative to it
    result = build_datalist(tmp_path / "data", out, val_fraction=0.5)
    written = json.loads(out.read_text())
    assert written["label_convention"] == "brats2023"
    assert "label_convention brats2023: labels use 3 and never 4" in result.notes[0]
    case = (written["training"] + written["validation"])[0]
    assert case["image"][1] == f"data/{case['case_id']}/{case['case_id']}-t1c.nii.gz"
    assert all(r.ok for r in check_datalist(out)), [r.problems for r in check_datalist(out)]


def test_what_cannot_be_placed_is_said_and_left_out(tmp_path):
    """Per-case folders with CT series, BraTS 2019's HGG/LGG folders, and the awkward cases."""
    root = tmp_path / "data"
    for n, grade in enumerate(("HGG", "LGG")):
        _make_case(root / grade, f"P000{n}", with_ct=True)
    _make_case(root / "HGG", "NOFLAIR")
    (root / "HGG" / "cases" / "NOFLAIR" / "flair.nii.gz").unlink()
    _make_case(root / "HGG", "TWOFLAIR")
    shutil.copy(root / "HGG" / "cases" / "TWOFLAIR" / "flair.nii.gz", root / "HGG" / "cases" / "TWOFLAIR" / "t2_flair.nii.gz")
    shutil.copy(root / "HGG" / "cases" / "P0000" / "t1.nii", root / "HGG" / "cases" / "P0000" / "dwi.nii")
    _write_ct_over(nib.load(root / "LGG" / "cases" / "P0001" / "seg.nii.gz"), root / "LGG" / "cases" / "P0001" / "ct" / "bone", "P")

    buffer = io.StringIO()
    out = tmp_path / "datalist.json"
    assert run_build_datalist(root, out, console=Console(file=buffer, width=250, color_system=None)) == 0
    printed = buffer.getvalue()
    cases = {c["case_id"]: c for section in ("training", "validation") for c in json.loads(out.read_text())[section]}
    assert set(cases) == {"P0000", "P0001"}
    assert cases["P0000"]["grade"] == "HGG" and cases["P0001"]["grade"] == "LGG"
    assert cases["P0000"]["ct"] == "data/HGG/cases/P0000/ct"
    assert "ct" not in cases["P0001"]  # two CT volumes: the user picks with ct_series_uid
    assert "HGG/cases/P0000/dwi.nii: no contrast or label in its name" in printed
    assert "NOFLAIR (HGG/cases/NOFLAIR): left out: no FLAIR file" in printed
    assert "TWOFLAIR (HGG/cases/TWOFLAIR): left out: FLAIR could be any of flair.nii.gz, t2_flair.nii.gz" in printed
    assert 'P0001: CT ' in printed and 'name one in the datalist as "ct_series_uid"' in printed
    assert all(r.ok for r in check_datalist(out))


def test_cli_build_then_check(tmp_path, capsys):
    _tree(tmp_path / "data", ["BraTS2021_00000", "BraTS2021_00001"], BRATS2021)
    out = tmp_path / "data" / "datalist.json"
    assert cli_main(["data", "build-datalist", str(tmp_path / "data"), "--out", str(out), "--val-fraction", "0.5"]) == 0
    assert cli_main(["data", "check", str(out)]) == 0
    (tmp_path / "empty").mkdir()
    assert cli_main(["data", "build-datalist", str(tmp_path / "empty"), "--out", str(tmp_path / "x.json")]) == 1
    assert "cannot build a datalist:" in capsys.readouterr().out


def test_data_index_command_with_a_layout_writes_root_datalist(tmp_path, capsys):
    """`fedbrain data index ROOT --layout brats2023`: the issue's spelling; the layout fixes the labels' convention."""
    from fedbrain.cli import main

    names = ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    _tree(tmp_path / "data", names, BRATS2023, relabel=(4, 3))
    assert main(["data", "index", str(tmp_path / "data"), "--layout", "brats2023", "--val-fraction", "0.5"]) == 0
    written = json.loads((tmp_path / "data" / "datalist.json").read_text())
    assert written["label_convention"] == "brats2023"
    assert all(r.ok for r in check_datalist(tmp_path / "data" / "datalist.json"))
