"""The FLARE apps of each task and algorithm (configuration only), and job folders assembled from them.

A FLARE job is a set of apps plus ``meta.json`` saying which app runs where. fedbrain's apps are
exported from the task configs, like the jobs (``make jobs`` writes both)::

    apps/<task>/<variant>/server/config/config_fed_server.json    what the server runs
    apps/<task>/<variant>/site/config/config_fed_client.json      what every hospital runs

``variant`` is the algorithm (``fedavg``, ``personal``, ``scaffold``) or ``he`` (encrypted FedAvg).
:func:`assemble` builds a job folder from one variant's two apps: one app for every participant
(``app``, deployed to ``@ALL``), or a server app and one app per named site. The checked-in
``jobs/<task>/fedbrain_<task>/`` folders are assembled from ``apps/`` this way, and a test checks that
both are exactly what the code exports.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from fedbrain.jobs import DEFAULT_SITES

SERVER_CONFIG = "config_fed_server.json"
CLIENT_CONFIG = "config_fed_client.json"
#: Per task: variant -> the config changes that make it (on the task config's defaults).
VARIANTS: dict[str, dict[str, dict]] = {
    "segmentation": {"fedavg": {}, "he": {"he": True}, "secagg": {"secagg": True}},
    "classification": {"personal": {}, "fedavg": {"algorithm": "fedavg"}, "scaffold": {"algorithm": "scaffold"},
                       "he": {"he": True}, "secagg": {"secagg": True}},
}
#: The variant each checked-in job folder (jobs/<task>/) is assembled from: the task config's default.
DEFAULT_VARIANT = {"segmentation": "fedavg", "classification": "personal"}
#: Tasks whose jobs give every site its own app (per-site filters); the others deploy one app to @ALL.
PER_SITE = {"segmentation": False, "classification": True}


def _task(task: str):
    if task == "classification":
        from fedbrain.jobs import classification as job
        from fedbrain.tasks.classification_config import ClassificationConfig as config_cls
    else:
        from fedbrain.jobs import segmentation as job
        from fedbrain.tasks.segmentation_config import SegmentationConfig as config_cls
    return job, config_cls


def export_apps(out_dir: str | Path, tasks=tuple(VARIANTS)) -> list[Path]:
    """Write ``out_dir/<task>/<variant>/{server,site}`` for every variant; returns the variant folders."""
    out_dir, written = Path(out_dir), []
    for task in tasks:
        job, config_cls = _task(task)
        for variant, changes in VARIANTS[task].items():
            with tempfile.TemporaryDirectory() as tmp:
                folder = job.export(config_cls(**changes), tmp)
                server = next(folder.glob(f"app*/config/{SERVER_CONFIG}"))
                clients = sorted(folder.glob(f"app*/config/{CLIENT_CONFIG}"))
                texts = {c.read_text() for c in clients}
                if len(texts) != 1:  # per-site apps exist for per-site filters; the exported ones are all alike
                    raise ValueError(f"{task}/{variant}: the exported site apps differ; one site app cannot describe them")
                target = out_dir / task / variant
                shutil.rmtree(target, ignore_errors=True)
                for app, source in (("server", server), ("site", clients[0])):
                    (target / app / "config").mkdir(parents=True)
                    (target / app / "config" / source.name).write_text(_stable(source.read_text()))
                written.append(target)
    return written


def _stable(text: str) -> str:
    """FLARE's exporter writes a filter's task list in set order (it differs run to run); sort it."""
    def walk(node):
        if isinstance(node, dict):
            return {k: sorted(v) if k == "tasks" and isinstance(v, list) else walk(v) for k, v in node.items()}
        return [walk(n) for n in node] if isinstance(node, list) else node
    return json.dumps(walk(json.loads(text)), indent=4)


def assemble(app_dir: str | Path, name: str, out_dir: str | Path, *, sites=None, min_clients: int = 3) -> Path:
    """A job folder from one variant's apps: ``out_dir/name`` with meta.json and the app folders.

    ``sites``: one app per named site (plus the server's); None: one app deployed to ``@ALL``."""
    app_dir, job = Path(app_dir), Path(out_dir) / name
    shutil.rmtree(job, ignore_errors=True)
    server = app_dir / "server" / "config" / SERVER_CONFIG
    site = app_dir / "site" / "config" / CLIENT_CONFIG
    if sites:
        deploy = {"app_server": ["server"], **{f"app_{s}": [s] for s in sites}}
        copies = [("app_server", server)] + [(f"app_{s}", site) for s in sites]
    else:
        deploy = {"app": ["@ALL"]}
        copies = [("app", server), ("app", site)]
    for app, source in copies:
        (job / app / "config").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, job / app / "config" / source.name)
    meta = {"name": name, "resource_spec": {}, "min_clients": min_clients, "deploy_map": deploy}
    (job / "meta.json").write_text(json.dumps(meta, indent=4))  # FLARE's exporter writes the same
    return job


def write_repo_apps_and_jobs(root: str | Path) -> list[Path]:
    """What ``make jobs`` does: apps/ from the code, then each jobs/<task>/fedbrain_<task> from apps/."""
    root = Path(root)
    written = export_apps(root / "apps")
    for task, variant in DEFAULT_VARIANT.items():
        _, config_cls = _task(task)
        config = config_cls()
        written.append(assemble(root / "apps" / task / variant, config.name, root / "jobs" / task,
                                sites=list(DEFAULT_SITES) if PER_SITE[task] else None, min_clients=config.min_clients))
    return written


if __name__ == "__main__":
    for path in write_repo_apps_and_jobs(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()):
        print(path)
