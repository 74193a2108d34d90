"""``fedbrain data build-datalist``: a datalist written from a folder of cases, not by hand.

Hospitals export BraTS-style trees (``BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz``,
``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz``, ``P0001/{t1,t1ce,t2,flair,seg}.nii.gz``)
and CT folders from PACS. Writing the JSON by hand invites swapped contrasts and typos, so this
guesses each file's slot from its name, the CT series from the DICOM headers, the label
convention from the label values, and prints every guess and everything it could not place.
It never guesses silently into the datalist: a case with a missing or doubled contrast is left
out and said so. The result is meant to be read, then checked with ``fedbrain data check``.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from fedbrain.contracts import (
    CT_SERIES_KEY,
    DEFAULT_LABEL_CONVENTION,
    GRADES,
    LABEL_CONVENTION_KEY,
    LABEL_CONVENTIONS,
    MRI_CONTRAST_LABELS,
    MRI_CONTRASTS,
)
from fedbrain.data.dicom import DicomSeriesError, find_series, select_series
from fedbrain import terminal

__all__ = ["BuildResult", "build_datalist", "guess_slot"]

LABEL = "label"
#: Name tokens of each slot, tried in this order (FLAIR before T2, T1ce before T1: "t2_flair", "t1_gd").
#: BraTS 2023 spells the contrasts t1n, t1c, t2w, t2f.
_SLOT_TOKENS = (
    (LABEL, {"seg", "label", "labels", "gt", "segmentation", "tumor", "tumour"}),
    ("flair", {"flair", "t2f", "t2flair", "fl"}),
    ("t1ce", {"t1ce", "t1c", "t1gd", "gd", "ce", "t1post", "post", "contrast", "t1contrast", "mprage_gd"}),
    ("t2", {"t2", "t2w"}),
    ("t1", {"t1", "t1n", "t1w", "t1pre", "pre", "mprage"}),
)
_SLOT_NAMES = {**dict(zip(MRI_CONTRASTS, MRI_CONTRAST_LABELS)), LABEL: "label"}
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]


def guess_slot(name: str) -> str | None:
    """The datalist slot (``t1``, ``t1ce``, ``t2``, ``flair`` or ``label``) a file or series name
    suggests, or None. Whole tokens only: ``t1ce`` is not ``t1``, ``FLAIR_T2`` is FLAIR."""
    tokens = _tokens(_NIFTI.sub("", name))
    words = {*tokens, *(a + b for a, b in zip(tokens, tokens[1:]))}  # "T1_C" -> "t1c" too
    for slot, names in _SLOT_TOKENS:
        if words & names:
            return slot
    return None


@dataclass
class BuildResult:
    """What was written and what was not: each entry of ``unplaced`` names a file or case and why."""

    datalist: dict
    cases: list[dict] = field(default_factory=list)  # one row per placed case, for the table
    unplaced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _case_key(path: Path) -> tuple[Path, str]:
    """Files of one case: same folder, same name once the slot token is removed
    (``BraTS2021_00000_t1.nii.gz`` and ``..._seg.nii.gz`` -> ``BraTS2021_00000``)."""
    stem = _NIFTI.sub("", path.name)
    parts = [p for p in re.split(r"([^A-Za-z0-9]+)", stem)]
    kept = [p for p in parts if not guess_slot(p) or not re.fullmatch(r"[A-Za-z0-9]+", p)]
    rest = re.sub(r"[^A-Za-z0-9]+$", "", "".join(kept).strip("-_. "))
    return path.parent, rest


def _label_convention(labels: list[Path]) -> tuple[str, str]:
    """The convention the label values show, and why: 4 and never 3 -> brats2021, 3 and never 4 -> brats2023."""
    seen: set[float] = set()
    for path in labels:
        try:
            seen |= set(np.unique(np.asanyarray(nib.load(path).dataobj)).tolist())
        except Exception:  # noqa: BLE001 - an unreadable label is data check's to report
            continue
    has3, has4 = 3 in seen, 4 in seen
    if has3 and not has4:
        return "brats2023", "labels use 3 and never 4 (BraTS 2023: enhancing tumour 3)"
    if has4 and not has3:
        return "brats2021", "labels use 4 and never 3 (BraTS 2018-2021: enhancing tumour 4)"
    if has3 and has4:
        return DEFAULT_LABEL_CONVENTION, "labels use both 3 and 4: mixed conventions; data check will name the files"
    return DEFAULT_LABEL_CONVENTION, "no enhancing-tumour label found; default convention"


def _grade_of(case_folder: Path, root: Path) -> str | None:
    """BraTS 2018/2019 trees keep cases under HGG/ and LGG/ folders."""
    for part in case_folder.relative_to(root).parts:
        for grade in GRADES:
            if part.lower() == grade.lower():
                return grade
    return None


def _ct_of(folder: Path | None, case_id: str, ct_dir: Path | None, unplaced: list[str]) -> Path | None:
    """The case's CT folder: ``ct_dir/<case_id>``, else a DICOM subfolder of the case's own folder
    (``folder``, None when several cases share it). None where there is none, and where one
    holds several CT volumes: that choice is the user's (``ct_series_uid``), and is reported."""
    candidates = [ct_dir / case_id] if ct_dir is not None and (ct_dir / case_id).is_dir() else []
    candidates += [p for p in sorted(folder.iterdir()) if p.is_dir()] if folder is not None else []
    for candidate in candidates:
        try:
            series = find_series(candidate)
        except DicomSeriesError:
            continue
        mr = [s for s in series if s.modality == "MR"]
        for s in mr:
            slot = guess_slot(s.description)
            unplaced.append(f"{case_id}: MR DICOM series {s.summary()} in {candidate}: looks like "
                            f"{slot.upper() if slot else 'an unknown contrast'}; convert it to NIfTI on the "
                            "T1 grid (e.g. dcm2niix, then register) to use it")
        if not any(s.modality == "CT" for s in series):
            continue
        try:
            select_series(candidate)
            return candidate
        except DicomSeriesError as exc:
            unplaced.append(f"{case_id}: CT {candidate}: {exc.reason}")
            return None
    return None


def build_datalist(folder, out, *, val_fraction: float = 0.2, seed: int = 0, ct_dir=None,
                   label_convention: str = "auto") -> BuildResult:
    """Scan ``folder`` for cases and write the datalist ``out`` (paths relative to its folder
    when inside it). Raises ValueError for unusable arguments or when no case could be placed."""
    root = Path(folder).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if label_convention != "auto" and label_convention not in LABEL_CONVENTIONS:
        raise ValueError(f"--label-convention must be auto or one of {', '.join(LABEL_CONVENTIONS)}")
    ct_dir = Path(ct_dir).expanduser().resolve() if ct_dir else None
    result = BuildResult(datalist={})

    groups: dict[tuple[Path, str], dict[str, list[Path]]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not _NIFTI.search(path.name) or path.name.startswith("."):
            continue
        slot = guess_slot(path.name)
        if slot is None:
            result.unplaced.append(f"{path.relative_to(root)}: no contrast or label in its name")
            continue
        groups.setdefault(_case_key(path), {}).setdefault(slot, []).append(path)

    items = []
    ids: set[str] = set()
    for (case_folder, stem), slots in sorted(groups.items()):
        case_id = stem or case_folder.name
        if case_id in ids or not stem:
            case_id = case_folder.name if case_folder.name not in ids else f"{case_folder.name}-{stem}"
        doubled = {s: p for s, p in slots.items() if len(p) > 1}
        missing = [name for slot, name in _SLOT_NAMES.items() if slot not in slots]
        if doubled or missing:
            why = "; ".join([*(f"{_SLOT_NAMES[s]} could be any of {', '.join(p.name for p in paths)}"
                               for s, paths in doubled.items()),
                             *([f"no {', '.join(missing)} file"] if missing else [])])
            result.unplaced.append(f"{case_id} ({case_folder.relative_to(root) or '.'}): left out: {why}")
            continue
        ids.add(case_id)
        item = {"case_id": case_id, "image": [slots[s][0] for s in MRI_CONTRASTS], "label": slots[LABEL][0]}
        own_folder = case_folder if sum(folder == case_folder for folder, _ in groups) == 1 else None
        ct = _ct_of(own_folder, case_id, ct_dir, result.unplaced)
        if ct is not None:
            item["ct"] = ct
        grade = _grade_of(case_folder, root)
        if grade:
            item["grade"] = grade
        items.append(item)
    if not items:
        raise ValueError(f"{root}: no case with all of {', '.join(MRI_CONTRAST_LABELS)} and a label found"
                         + (f" ({len(result.unplaced)} files or cases not placed: {result.unplaced[0]} ...)"
                            if result.unplaced else ""))

    if label_convention == "auto":
        label_convention, why = _label_convention([item["label"] for item in items])
        result.notes.append(f"{LABEL_CONVENTION_KEY} {label_convention}: {why}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = int(round(val_fraction * len(items))) if len(items) > 1 else 0
    n_val = max(n_val, 1) if val_fraction > 0 and len(items) > 1 else n_val
    validation = set(order[:n_val])

    def written(item: dict) -> dict:
        def rel(path: Path) -> str:
            return os.path.relpath(path, out.parent) if path.is_relative_to(out.parent) else str(path)
        row = {"case_id": item["case_id"], "image": [rel(p) for p in item["image"]], "label": rel(item["label"])}
        if "ct" in item:
            row["ct"] = rel(item["ct"])
        if "grade" in item:
            row["grade"] = item["grade"]
        return row

    result.datalist = {
        "description": f"written by fedbrain data build-datalist from {root}",
        LABEL_CONVENTION_KEY: label_convention,
        "training": [written(item) for n, item in enumerate(items) if n not in validation],
        "validation": [written(item) for n, item in enumerate(items) if n in validation],
    }
    for n, item in enumerate(items):
        folder = item["label"].parent
        ct = item.get("ct")
        result.cases.append({
            "case_id": item["case_id"], "section": "validation" if n in validation else "training",
            "folder": str(folder.relative_to(root)),
            **{name: p.name if p.parent == folder else str(p) for name, p in zip(_SLOT_NAMES.values(),
                                                                               (*item["image"], item["label"]))},
            "CT": "" if ct is None else str(ct.relative_to(folder)) if ct.is_relative_to(folder) else str(ct),
            "grade": item.get("grade", "")})
    if any(CT_SERIES_KEY in u for u in result.unplaced):
        result.notes.append(f"a CT folder holds several series: add \"{CT_SERIES_KEY}\" to that case by hand")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.datalist, indent=2) + "\n")
    return result


def run_build_datalist(folder, out, console=None, **options) -> int:
    """The CLI: build, print the guesses (a table) and what could not be placed; exit 1 on nothing built."""
    from rich.markup import escape
    from rich.table import Table

    console = console or terminal.console()
    try:
        result = build_datalist(folder, out, **options)
    except ValueError as exc:
        console.print(f"[red]cannot build a datalist:[/] {escape(str(exc))}")
        return 1
    columns = ["case_id", "section", "folder", *_SLOT_NAMES.values(), "CT", "grade"]
    table = Table(title=f"Guessed from {Path(folder)}", caption=f"{len(result.cases)} cases placed")
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column in ("case_id", "section"))
    for case in result.cases:
        table.add_row(*(escape(str(case.get(c, ""))) for c in columns))
    console.print(table)
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    if result.unplaced:
        console.print(f"[yellow]could not place {len(result.unplaced)}:[/]")
        for line in result.unplaced:
            console.print(f"  {escape(line)}")
    console.print(f"wrote {escape(str(out))}; check it with: fedbrain data check {escape(str(out))}")
    return 0
