"""Pre-flight validation of a site's data (``fedbrain data check``).

A site joining the federation should learn that case 17's FLAIR is truncated
before the server waits on it, and should learn about *every* bad case in one
pass. So each check turns failures into problem strings that name the file and
the reason, and checking never raises for a bad case.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from fedbrain.contracts import AFFINE_ATOL_MM, case_id_of
from fedbrain.data.dataset import label_values_problem, non_brats_label_values
from fedbrain.data.datalist import MODALITIES, DatalistError, load_datalist
from fedbrain.data.dicom import DicomSeriesError, read_ct_series

__all__ = [
    "CaseCheck",
    "check_case",
    "check_datalist",
    "render_check_table",
    "run_data_check",
    "summarize",
]

#: Label values allowed by the BraTS convention (3 is unused on purpose).
# Affines are stored as float32 in NIfTI; 1e-3 (mm, or unitless for direction
# terms) absorbs that rounding and nothing a resampling would ignore.


@dataclass
class CaseCheck:
    """Outcome of checking one case; ``problems`` is empty when ``ok``."""

    case_id: str
    section: str
    ok: bool
    problems: list[str] = field(default_factory=list)


@dataclass
class _Volume:
    role: str  # "T1", ..., "label"
    name: str  # how problems refer to the file
    shape: tuple
    affine: np.ndarray


def _display_name(path: Path, case_dir: Path | None) -> str:
    """Path relative to the case folder when inside it, else the full path: short but unambiguous."""
    if case_dir is not None:
        try:
            return str(path.relative_to(case_dir))
        except ValueError:
            pass
    return str(path)


def _verify_gzip(path: Path) -> None:
    """Stream the whole gzip member: nibabel reads only what it needs, so a
    file cut inside its trailer (CRC, length) would otherwise pass."""
    with gzip.open(path, "rb") as stream:
        while stream.read(1 << 20):
            pass


def _load_nifti(path: Path, role: str, name: str, problems: list[str]):
    """Load header and data fully; on failure record why and return None."""
    label = f"{role} {name}"
    if not path.exists():
        problems.append(f"{label}: file missing ({path})")
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
        problems.append(f"{label}: truncated or corrupt gzip ({type(exc).__name__}: {exc})")
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


def _check_geometry(volumes: list[_Volume], problems: list[str]) -> None:
    """All modalities must share the label's grid; report each file that does not."""
    if len(volumes) < 2:
        return
    # The label defines the grid the network is trained on.
    reference = next((v for v in volumes if v.role == "label"), volumes[0])
    for volume in volumes:
        if volume is reference:
            continue
        where = f"{volume.role} {volume.name}"
        if volume.shape != reference.shape:
            problems.append(
                f"{where}: shape {volume.shape} differs from {reference.role} {reference.name} {reference.shape}"
            )
        elif not np.allclose(volume.affine, reference.affine, rtol=0, atol=AFFINE_ATOL_MM):
            problems.append(
                f"{where}: affine differs from {reference.role} {reference.name}: "
                f"{_describe_affine_difference(volume.affine, reference.affine)}"
            )


def _check_case_files(case: dict, problems: list[str]) -> None:
    label_path = Path(case["label"])
    case_dir = label_path.parent
    volumes: list[_Volume] = []

    entries = [(MODALITIES[n] if n < len(MODALITIES) else f"image[{n}]", Path(p))
               for n, p in enumerate(case["image"])]
    entries.append(("label", label_path))
    for role, path in entries:
        name = _display_name(path, case_dir)
        loaded = _load_nifti(path, role, name, problems)
        if loaded is None:
            continue
        image, data = loaded
        if len(image.shape) != 3:  # training skips such a case ("not a 3D volume"): say so here too
            problems.append(f"{role} {name}: not a 3D volume (shape {tuple(image.shape)})")
            continue
        volumes.append(_Volume(role, name, tuple(image.shape), np.asarray(image.affine, dtype=np.float64)))
        if role == "label":
            bad = non_brats_label_values(data)
            if bad.size:
                problems.append(label_values_problem(bad, name))
        elif np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
            n_nan = int(np.count_nonzero(np.isnan(data)))
            n_inf = int(np.count_nonzero(np.isinf(data)))
            if n_nan or n_inf:
                problems.append(f"{role} {name}: non-finite voxels ({n_nan} NaN, {n_inf} Inf)")
        del data

    _check_geometry(volumes, problems)

    ct = case.get("ct")
    if ct:
        try:
            read_ct_series(ct)
        except DicomSeriesError as exc:
            problems.append(f"CT {_display_name(Path(ct), case_dir)}: {exc.reason}")


def check_case(case: dict, section: str | None = None) -> CaseCheck:
    """Check one datalist item (as returned by ``load_datalist``) on disk.

    Never raises: a malformed item or an unexpected error becomes a problem
    string too, so one odd case cannot hide the others.
    """
    item = case if isinstance(case, dict) else {}
    case_id = case_id_of(item)
    section = section if section is not None else str(item.get("section", ""))
    problems: list[str] = []
    if not isinstance(item.get("image"), list) or not item.get("label"):
        problems.append("malformed item: needs an 'image' list and a 'label' path")
    else:
        try:
            _check_case_files(case, problems)
        except Exception as exc:  # a bug or an exotic file must not abort the whole check
            problems.append(f"unexpected error while checking: {type(exc).__name__}: {exc}")
    return CaseCheck(case_id=case_id, section=section, ok=not problems, problems=problems)


def check_datalist(path, root=None, progress: bool = False) -> list[CaseCheck]:
    """Check every case of a datalist; raises only DatalistError for the file itself."""
    sections = load_datalist(path, root=root)
    jobs = [(section, case) for section, cases in sections.items() for case in cases]
    if not progress:
        return [check_case(case, section) for section, case in jobs]

    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    columns = (TextColumn("[bold]checking[/] {task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("", total=len(jobs))
        for section, case in jobs:
            bar.update(task, description=escape(str(case.get("case_id", ""))))
            results.append(check_case(case, section))
            bar.advance(task)
    return results


def summarize(results: list[CaseCheck]) -> dict:
    """Counts for logs and reports: ``{"cases", "ok", "problems", "sections": {name: {...}}}``."""
    summary = {"cases": 0, "ok": 0, "problems": 0, "sections": {}}
    for result in results:
        per_section = summary["sections"].setdefault(result.section, {"cases": 0, "ok": 0, "problems": 0})
        for counts in (summary, per_section):
            counts["cases"] += 1
            counts["ok" if result.ok else "problems"] += 1
    return summary


def render_check_table(results: list[CaseCheck], console=None) -> None:
    """Print one row per case: green ok, red problem with every reason listed."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    counts = summarize(results)
    table = Table(
        title="Data check",
        caption=f"{counts['cases']} cases: {counts['ok']} ok, {counts['problems']} with problems",
        show_lines=True,
    )
    table.add_column("case", no_wrap=True)
    table.add_column("section", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("problems", overflow="fold")
    for result in results:
        status = "[green]ok[/]" if result.ok else "[red]problem[/]"
        problems = "\n".join(escape(problem) for problem in result.problems)
        table.add_row(escape(result.case_id), escape(result.section), status, problems)
    console.print(table)


def run_data_check(datalist, root=None, console=None) -> int:
    """``fedbrain data check``: table of every case, exit code 1 if anything is wrong."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    try:
        results = check_datalist(datalist, root=root, progress=console.is_terminal)
    except DatalistError as exc:
        console.print(f"[red]datalist error:[/] {escape(str(exc))}")
        return 1
    render_check_table(results, console=console)
    return 0 if all(result.ok for result in results) else 1
