"""Submit a job through the admin API and watch it, with a live progress bar per round and site.

Progress is what `fedbrain watch` reads: the running job's own record through ``show_stats``
(fedbrain.fl.progress), the server's job log where a job has no record.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedbrain.ops.status import job_round  # what `fedbrain watch` reads
from fedbrain import terminal



def watch_job(
    session,
    job_id: str,
    *,
    rounds: int,
    sites: list[str],
    console: Console | None = None,
    poll: float = 3.0,
    timeout: float = 3600,
    on_poll: Callable[[], None] | None = None,
) -> dict:
    """Block until the job finishes; show round i of N and each site's state. Returns the job meta."""
    console = console or terminal.console()
    started = time.time()
    meta = {}
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        bar = progress.add_task(f"job {job_id[:8]}", total=rounds, detail="submitted")
        while True:
            meta = session.get_job_meta(job_id)
            status = meta.get("status", "?")
            detail = status
            if status == "RUNNING":
                found = job_round(session, job_id)
                current, done = found.get("round"), set(found.get("aggregated") or ())
                if current is not None:
                    states = " ".join(f"{s}:{'✓' if s in done else '…'}" for s in sites)
                    detail = f"round {current + 1}/{rounds}  {states}"
                    progress.update(bar, completed=current + len(done) / max(len(sites), 1))
            progress.update(bar, detail=detail)
            if on_poll:
                on_poll()
            if status.startswith("FINISHED") or status in ("FAILED", "ABORTED"):
                if status == "FINISHED:COMPLETED":
                    progress.update(bar, completed=rounds)
                break
            if time.time() - started > timeout:
                session.abort_job(job_id)
                raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s; aborted")
            time.sleep(poll)
    return meta


def submit_and_wait(consortium, job_folder: Path, *, rounds: int, result_dir: Path, console=None, on_poll=None):
    """Submit an exported job folder as the project admin, wait, download the result. Returns (meta, path)."""
    session = consortium.session()
    try:
        job_id = session.submit_job(str(Path(job_folder).resolve()))
        (console or terminal.console()).print(f"submitted [bold]{Path(job_folder).name}[/] as job {job_id}")
        meta = watch_job(session, job_id, rounds=rounds, sites=consortium.sites, console=console, on_poll=on_poll)
        result_dir.mkdir(parents=True, exist_ok=True)
        path = session.download_job_result(job_id, str(result_dir))
        return meta, Path(path)
    finally:
        session.close()


def run_jobs_side_by_side(consortium, jobs: dict, result_dir: Path, *, max_active: int = 3, timeout: float = 1800,
                          console=None) -> dict:
    """Submit exported jobs (name -> folder), at most ``max_active`` running at once (the POC server
    runs up to 4), wait for all, download each. Returns name -> (meta, result path, seconds from
    submission to finish). Same results as one after another, in less wall time: FLARE's per-job
    start, round and end latencies overlap."""
    console = console or terminal.console()
    session = consortium.session()
    try:
        pending, running, done = list(jobs.items()), {}, {}
        deadline = time.time() + timeout
        while (pending or running) and time.time() < deadline:
            while pending and len(running) < max_active:
                name, folder = pending.pop(0)
                running[name] = (session.submit_job(str(Path(folder).resolve())), time.time())
                console.print(f"submitted {name} as job {running[name][0]}")
            for name, (job_id, started) in list(running.items()):
                meta = session.get_job_meta(job_id)
                if meta.get("status", "").startswith("FINISHED"):
                    target = Path(result_dir) / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)  # a plain folder name
                    target.mkdir(parents=True, exist_ok=True)
                    try:
                        path = Path(session.download_job_result(job_id, str(target)))
                    except Exception as e:  # noqa: BLE001 - a job refused before it ran has no result to download
                        meta, path = {**meta, "download_error": f"{type(e).__name__}: {e}"}, None
                    done[name] = (meta, path, time.time() - started)
                    del running[name]
                    console.print(f"{name}: {meta.get('status')} in {done[name][2]:.0f} s")
            time.sleep(3)
        for name, (job_id, started) in running.items():
            done[name] = ({"job_id": job_id, "status": "TIMEOUT"}, None, time.time() - started)
        return done
    finally:
        session.close()
