"""Where a site's data and compute settings come from.

A job must never carry hospital paths: the hospital decides where its data lives. The site
script resolves its settings, first found wins:

1. ``datalist`` given by a caller in the library (tests, tools); never by a job: the site
   script takes no path argument;
2. environment ``FEDBRAIN_DATALIST`` (``{site}`` is replaced by the site name), with optional
   ``FEDBRAIN_DATA_ROOT``, ``FEDBRAIN_NUM_THREADS`` and ``FEDBRAIN_DEVICE``;
3. ``<site workspace>/local/fedbrain_site.json``, written by the hospital IT team next to
   FLARE's own ``local/resources.json``::

       {"datalist": "/data/brats/datalist.json", "data_root": "/data/brats",
        "num_threads": 4, "device": "auto",
        "dp_budget": {"epsilon": 10.0, "delta": 1e-6}, "require_dp": true}

   A hospital taking part in several studies names one datalist per task instead of (or beside)
   ``datalist``: ``"datalists": {"segmentation": "/data/brats/datalist.json", "classification":
   "/data/grades/datalist.json"}``; a task without its own entry reads ``datalist``.

The privacy keys (the site's lifetime DP budget for its data, and whether it refuses jobs
without DP: :mod:`fedbrain.privacy.budget`) are read from that file whichever way the data
was found: they are the hospital's to decide, never a job's or a caller's environment.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fedbrain.privacy.budget import SiteBudget

log = logging.getLogger("fedbrain")

SITE_CONFIG_NAME = "fedbrain_site.json"


class SiteConfigError(RuntimeError):
    """A site has no usable data settings; the message says where we looked."""


@dataclass
class SiteSettings:
    site: str
    datalist: Path
    data_root: Path | None = None
    num_threads: int | None = None
    device: str | None = None  # None: the job's setting
    source: str = ""
    budget: SiteBudget = SiteBudget()  # lifetime DP budget and require_dp (local/fedbrain_site.json)
    workspace: Path | None = None  # the FLARE site workspace, when in one (where the privacy ledger lives)


def site_workspace(start: Path | None = None) -> Path | None:
    """The FLARE site workspace a job runs in: the first ancestor holding ``startup/`` and ``local/``.

    The one walk every site-side store uses (site settings, personal parts); None outside FLARE.
    """
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "startup").is_dir() and (folder / "local").is_dir():
            return folder
    return None


def resolve_site_settings(site: str, datalist: str | None = None, cwd: Path | None = None,
                          task: str | None = None) -> SiteSettings:
    """Find this site's datalist (for ``task``, when the site names one per task) and privacy
    settings; raise SiteConfigError naming every place looked at."""
    workspace = site_workspace(cwd)
    cfg = workspace / "local" / SITE_CONFIG_NAME if workspace else None
    local = _read_site_json(site, cfg) if cfg is not None and cfg.is_file() else {}
    try:
        privacy = dict(budget=SiteBudget.from_site_json(local), workspace=workspace)
    except (ValueError, TypeError) as e:
        raise SiteConfigError(f"site {site}: {cfg}: {e}") from None
    looked = []
    if datalist:
        return SiteSettings(site=site, datalist=Path(datalist.format(site=site)), source="caller", **privacy)
    env = os.environ.get("FEDBRAIN_DATALIST")
    if env:
        root = os.environ.get("FEDBRAIN_DATA_ROOT")
        return SiteSettings(
            site=site,
            datalist=Path(env.format(site=site)),
            data_root=Path(root.format(site=site)) if root else None,
            num_threads=int(os.environ["FEDBRAIN_NUM_THREADS"]) if os.environ.get("FEDBRAIN_NUM_THREADS") else None,
            device=os.environ.get("FEDBRAIN_DEVICE") or None,
            source="FEDBRAIN_DATALIST",
            **privacy,
        )
    looked.append("FEDBRAIN_DATALIST (unset)")
    looked.append(str(cfg) if cfg else f"local/{SITE_CONFIG_NAME} of a site workspace (a folder with startup/ and "
                                      f"local/) at or above {(cwd or Path.cwd()).resolve()}: none found")
    if local:
        per_task = local.get("datalists") or {}
        try:
            if not isinstance(per_task, dict):
                raise TypeError(f"datalists must map a task to a datalist, got {per_task!r}")
            return SiteSettings(
                site=site,
                datalist=Path(per_task[task] if task in per_task else local["datalist"]),
                data_root=Path(local["data_root"]) if local.get("data_root") else None,
                num_threads=local.get("num_threads"),
                device=local.get("device"),
                source=str(cfg),
                **privacy,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise SiteConfigError(f"site {site}: {cfg} is not valid ({e!r}); expected keys: datalist or "
                                  f"datalists.{task or '<task>'}[, data_root]") from None
    raise SiteConfigError(f"site {site}: no datalist configured; looked at: " + "; ".join(looked))


def _read_site_json(site: str, cfg: Path) -> dict:
    try:
        data = json.loads(cfg.read_text())
    except ValueError as e:
        raise SiteConfigError(f"site {site}: {cfg} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SiteConfigError(f"site {site}: {cfg} must hold a JSON object")
    return data


def write_site_config(workspace: Path, datalist: Path, data_root: Path | None = None, **extra) -> Path:
    """What a hospital IT team does once per site (and what `fedbrain poc up` does for each POC site)."""
    path = Path(workspace) / "local" / SITE_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"datalist": str(datalist), **({"data_root": str(data_root)} if data_root else {}), **extra}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def load_site_cases(site: str, datalist: str | None = None, task: str | None = None) -> tuple[SiteSettings, dict, str]:
    """This site's settings and cases; on a configuration or datalist error, no cases and the error.

    A misconfigured site stays in the federation with zero-weight, empty updates instead of
    failing the whole job; the error is logged here and reported as the ``site_error`` metric.
    """
    from fedbrain.data.datalist import DatalistError, load_datalist

    try:
        settings = resolve_site_settings(site, datalist, task=task)
        return settings, load_datalist(settings.datalist, root=settings.data_root), ""
    except (SiteConfigError, DatalistError, OSError) as e:
        log.error("site %s cannot use its data and will send empty updates: %s", site, e)
        unusable = SiteSettings(site=site, datalist=Path("<unusable: see the error above>"), source="error")
        return unusable, {"training": [], "validation": []}, str(e)


def kept_at_site(workspace: Path | None) -> str:
    """The pattern of parameter names this site's final check never lets leave (its ``local/privacy.json``),
    or "" outside a provisioned site.

    Why the site loop reads it: a job may ask to federate a part this site's scope keeps (the classifier's
    grade head under algorithm ``fedavg``). The server would then hand back its untrained copy every round;
    the site instead keeps and trains that part as its own, and tells the admin.
    """
    if workspace is None:
        return ""
    path = Path(workspace) / "local" / "privacy.json"
    try:
        policy = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""  # no policy or an unreadable one: FLARE itself refuses to start such a site
    for component in policy.get("components") or []:
        if str(component.get("path", "")).endswith(".FinalPayloadCheck"):
            return str((component.get("args") or {}).get("personal_parts") or "")
    return ""
