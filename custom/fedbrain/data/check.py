"""Pre-flight validation of a site's data (``fedbrain data check``).

A site joining the federation should learn that case 17's FLAIR is truncated
before the server waits on it, and should learn about *every* bad case in one
pass. So each check turns failures into problem strings that name the file and
the reason, and checking never raises for a bad case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedbrain.contracts import case_id_of
from fedbrain.data.datalist import DatalistError, load_datalist
from fedbrain.data.validate import case_problems
from fedbrain import terminal

__all__ = [
    "CaseCheck",
    "check_case",
    "check_datalist",
    "render_check_table",
    "run_data_check",
    "summarize",
]


@dataclass
class CaseCheck:
    """Outcome of checking one case; ``problems`` is empty when ``ok``."""

    case_id: str
    section: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    #: the problems are the CT's only: jobs that read no CT (MRI-only segmentation) still train on the case
    mri_ok: bool = False


def check_case(case: dict, section: str | None = None) -> CaseCheck:
    """Check one datalist item (as returned by ``load_datalist``) on disk, with the validator
    training uses (:func:`fedbrain.data.validate.case_problems`): ok here means loaded there; a case
    whose only problems are its CT's is ``mri_ok``: skipped by jobs that read CT, loaded by the others.

    Never raises: a malformed item or an unexpected error becomes a problem
    string too, so one odd case cannot hide the others.
    """
    item = case if isinstance(case, dict) else {}
    case_id = case_id_of(item)
    section = section if section is not None else str(item.get("section", ""))
    problems = case_problems(item)
    mri_ok = not problems or not case_problems(item, ct=False)
    return CaseCheck(case_id=case_id, section=section, ok=not problems, problems=problems, mri_ok=mri_ok)


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
    from rich.markup import escape
    from rich.table import Table

    console = console or terminal.console()
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
        if not result.ok and result.mri_ok:
            problems += "\n[yellow]CT only: jobs that read CT skip this case; MRI-only segmentation uses it[/]"
        table.add_row(escape(result.case_id), escape(result.section), status, problems)
    console.print(table)


def run_data_check(datalist, root=None, console=None) -> int:
    """``fedbrain data check``: table of every case, exit code 1 if anything is wrong."""
    from rich.markup import escape

    console = console or terminal.console()
    try:
        results = check_datalist(datalist, root=root, progress=console.is_terminal)
    except DatalistError as exc:
        console.print(f"[red]datalist error:[/] {escape(str(exc))}")
        return 1
    render_check_table(results, console=console)
    return 0 if all(result.ok for result in results) else 1
