"""``fedbrain status --admin-kit DIR``: what the consortium is doing, seen from any admin kit.

Monitoring used to exist only inside ``fedbrain demo``; a hospital's IT or the consortium's
admin needs it from their own kit, with their own role (FLARE decides what that role may see).
It goes through FLARE's admin API as the admin console does: ``check_status`` (sites and their
last contact), ``list_jobs``, the sites' job status and the round in progress: a running job's
server answers ``show_stats`` with its own record (fedbrain.fl.progress); a finished one is read from
the server's job log, where the role may read it.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import sys
import time
from pathlib import Path

from fedbrain.contracts import DP_EPSILON_SPENT, DP_WITHHELD, DP_WITHHELD_REASONS, SITE_ERROR
from fedbrain.ops.kit import KitError, kit_identity, server_address
from fedbrain import terminal

#: Job states whose round is worth looking up.
ACTIVE = ("RUNNING", "DISPATCHED")


class StatusError(RuntimeError):
    """The admin kit cannot be used, or the server cannot be reached; the message says which."""


def admin_username(kit: Path) -> str:
    """FLARE logs an admin in by name: the CN of the kit's client.crt (the kit folder's name as fallback)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    kit = Path(kit)
    try:
        role, cert, _ = kit_identity(kit)
    except KitError as e:
        raise StatusError(str(e)) from None
    if role != "admin":
        raise StatusError(f"{kit} is a {role} kit; `fedbrain status` needs an admin's kit (it holds fed_admin.json)")
    try:
        names = x509.load_pem_x509_certificate((kit / "startup" / cert).read_bytes()).subject \
            .get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else kit.name
    except (OSError, ValueError):
        return kit.name


def confine_config_search(kit: Path) -> None:
    """Make FLARE's admin client look for its optional comm config in the admin's kit only.

    FLARE 2.9's admin client never sets a config folder, so its cell looks for ``comm_config.*``
    (15 lookups, every config format) by walking the *current working folder* recursively: 3-5 s from
    a checkout with a virtual environment, more from a home folder (issue 29: `fedbrain status` took
    11-19 s). The kit is where an admin's comm config belongs; FLARE keeps the first folders it is given.
    """
    from nvflare.fuel.utils.config_service import ConfigService

    folders = [str(Path(kit).resolve() / sub) for sub in ("local", "startup") if (Path(kit) / sub).is_dir()]
    if folders:
        ConfigService.initialize(section_files={}, config_path=folders)


def open_session(kit: Path, username: str, timeout: float):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    confine_config_search(kit)
    return new_secure_session(username, str(Path(kit).resolve()), timeout=timeout)


def _when(value) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError):
        return str(value or "")


def job_round(session, job_id: str, running: bool = True) -> dict:
    """The round in progress, the sites aggregated in it, each site's latest metrics, the guard's word
    and the last closed round: from the server job's own record through ``show_stats`` (a few hundred
    bytes), or, for a finished job or a job without the record, from the server's job log (the same
    parse); a note instead when this admin's role may read neither."""
    from fedbrain.fl.progress import parse_log, progress_from_stats

    if running:
        try:
            found = progress_from_stats(session.show_stats(job_id, "server"))
            if found is not None:
                return found
        except Exception:  # noqa: BLE001 - not running any more, or not authorized: the log says the rest
            pass
    try:
        logs = session.get_job_logs(job_id, "server").get("logs", {})
    except Exception as e:  # noqa: BLE001 - FLARE raises its own types for "not authorized"
        return {"round": None, "note": f"server job log not readable with this kit ({type(e).__name__})"}
    return parse_log(next(iter(logs.values()), "") if logs else "")


#: Per-site columns `fedbrain watch` shows, the first present of each group (segmentation or classification).
WATCH_COLUMNS = (("val_dice", "val_bacc"), ("train_loss",), (DP_EPSILON_SPENT,), (DP_WITHHELD,), (SITE_ERROR,))


def _flag(m: dict) -> str:
    if m.get(SITE_ERROR):
        return "site error (its data could not be used)"
    if m.get(DP_WITHHELD):
        return DP_WITHHELD_REASONS.get(int(m[DP_WITHHELD]), "withheld")
    return ""


@contextlib.contextmanager
def admin_session(kit: Path, timeout: float = 10.0, session_factory=open_session):
    """An admin API session as the kit's own user; yields (session, "host:port", username)."""
    kit = Path(kit).resolve()
    username = admin_username(kit)
    try:
        host, port = server_address(kit)
    except KitError as e:
        raise StatusError(str(e)) from None
    # FLARE prints "Connecting to FLARE ..." on stdout, where --json promises only JSON.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            session = session_factory(kit, username, timeout)
        except Exception as e:  # noqa: BLE001 - FLARE's connection errors have no common base class
            raise StatusError(f"cannot log in to the admin server {host}:{port} as {username} within {timeout:g} s "
                              f"({type(e).__name__}: {e}); is the server up, and is port {port} open to you?") from None
    try:
        yield session, f"{host}:{port}", username
    finally:
        with contextlib.suppress(Exception):
            session.close()


def consortium_status(kit: Path, timeout: float = 10.0, session_factory=open_session) -> dict:
    """Sites connected (and last contact), jobs with their status, rounds where available."""
    with admin_session(kit, timeout, session_factory) as (session, address, username):
        return collect(session, address, username)


def collect(session, address: str, username: str, job: str | None = None) -> dict:
    """One snapshot through an open session; ``job`` (an id prefix) keeps only that job."""
    with contextlib.redirect_stdout(sys.stderr):
        info = session.get_system_info()
        jobs = []
        for entry in session.list_jobs() or []:
            entry = {k: entry.get(k) for k in ("job_id", "job_name", "status", "submit_time", "duration")}
            if job and not str(entry["job_id"]).startswith(job):
                continue
            active = str(entry.get("status", "")).upper() in ACTIVE
            if active or job:  # a watched job keeps its last metrics
                entry.update(job_round(session, entry["job_id"], running=active))
            jobs.append(entry)
        try:
            site_jobs = session.get_client_job_status() or []
        except Exception:  # noqa: BLE001 - a role that may not ask the sites still sees the rest
            site_jobs = []
    return {
        "server": {"address": address, "engine": info.server_info.status,
                   "start_time": _when(info.server_info.start_time)},
        "user": username,
        "sites": [{"name": c.name, "last_contact": _when(c.last_connect_time)} for c in info.client_info],
        "running_jobs": [{"job_id": j.job_id, "app": j.app_name} for j in info.job_info],
        "jobs": jobs,
        "site_jobs": site_jobs,
    }


def watch(kit: Path, job: str | None = None, interval: float = 5.0, console=None, timeout: float = 10.0,
          session_factory=open_session, polls: int | None = None, sleep=time.sleep) -> dict:
    """``fedbrain watch``: the status, refreshed every ``interval`` s over one session, until Ctrl-C,
    or until the watched ``job`` ends (``polls`` bounds the loop in tests). Returns the last snapshot."""
    from rich.live import Live

    console = console or terminal.console()
    status, n = {}, 0
    with admin_session(kit, timeout, session_factory) as (session, address, username), \
            Live(console=console, auto_refresh=False) as live:
        try:
            while polls is None or n < polls:
                status = collect(session, address, username, job)
                live.update(status_view(status), refresh=True)
                n += 1
                if job and status["jobs"] and all(str(j["status"]).upper() not in ACTIVE + ("SUBMITTED",)
                                                  for j in status["jobs"]):
                    break
                sleep(interval)
        except KeyboardInterrupt:
            pass
    return status


def status_view(status: dict):
    """The status as one rich renderable: a server line, the sites, the jobs with their round."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    server = status["server"]
    head = (f"server {server['address']} (job engine {server['engine']}, up since {server['start_time']}); "
            f"you are {escape(status['user'])}")
    sites = Table(title=f"{len(status['sites'])} sites connected")
    sites.add_column("site")
    sites.add_column("last contact")
    for s in status["sites"]:
        sites.add_row(escape(str(s["name"])), s["last_contact"])
    jobs = Table(title=f"{len(status['jobs'])} jobs")
    # Rounds count from 0 everywhere (FLARE's log, the round records, the report, the metrics table below).
    for col in ("job", "name", "status", "submitted", "duration", "round (from 0)"):
        jobs.add_column(col)
    for j in status["jobs"]:
        rnd = "" if "round" not in j else (str(j["round"]) if j["round"] is not None else j.get("note", "not started"))
        if j.get("aggregated"):
            rnd += f" (aggregated: {', '.join(j['aggregated'])})"
        closed = j.get("closed") or {}
        if closed.get("missing"):
            rnd += (f"; round {closed['round']} closed without {', '.join(closed['missing'])} "
                    f"({closed.get('closed_by')})")
        if closed.get("published") is False and closed.get("why_unpublished"):
            rnd += f"; round {closed['round']} not published: {closed['why_unpublished']}"
        jobs.add_row(str(j["job_id"]), escape(str(j.get("job_name") or "")), str(j["status"]),
                     str(j.get("submit_time") or ""), str(j.get("duration") or ""), escape(rnd))
    parts = [head, sites, jobs]
    for j in status["jobs"]:
        if j.get("site_metrics"):
            parts.append(_metrics_table(j))
    return Group(*parts)


def _metrics_table(job: dict):
    """A job's per-site metrics of the latest round each site sent, with the reason a site is flagged."""
    from rich.markup import escape
    from rich.table import Table

    rows = job["site_metrics"]
    present = [next(k for k in group if any(k in m for m in rows.values()))
               for group in WATCH_COLUMNS if any(k in m for m in rows.values() for k in group)]
    table = Table(title=f"job {str(job['job_id'])[:8]}: per site, latest round received")
    for col in ("site", "round", *present, "flag"):
        table.add_column(col)
    guard = job.get("guard") or {}
    for site, m in sorted(rows.items()):
        cells = [("∞" if math.isinf(m[k]) else f"{m[k]:.3f}") if isinstance(m.get(k), float) else "" for k in present]
        g = guard.get(site, {})
        refusal = (("FLAGGED; " if g.get("flagged") else "") + f"update refused in round {g['round']}: {g['reason']}"
                   if "round" in g else "")
        table.add_row(escape(site), str(m.get("round", "")), *cells, escape("; ".join(x for x in (_flag(m), refusal) if x)))
    return table


def render_status(status: dict, console) -> None:
    console.print(status_view(status))
