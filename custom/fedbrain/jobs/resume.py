"""Resume a job after the server went down, from the last global model the server saved.

FLARE 2.9 does not restore a running job after a server restart: component snapshots were removed
(``private/fed/server/server_engine.py`` ``persist_components`` is a no-op and
``job_runner.restore_running_job`` has no caller), so the interrupted job is not run again. What
survives on the server's disk is the job's run folder: the global model saved after every round
and fedbrain's note of which round that was (``fedbrain_checkpoint.json``, written by
:class:`fedbrain.fl.resilient.ResilientFedAvg`). :func:`resume_job` makes, from the job that was
submitted, a job that starts from that model at the next round and runs the rounds left; no
completed round is trained again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedbrain.contracts import CHECKPOINT_NOTE


class ResumeError(ValueError):
    """The job cannot be resumed; the message says why in one line."""


def checkpoint_of(server_run_dir: Path) -> dict:
    """``{"round", "checkpoint", "total_rounds"}`` of an interrupted run folder on the server."""
    note = Path(server_run_dir) / CHECKPOINT_NOTE
    if not note.is_file():
        raise ResumeError(f"{note}: no saved round (the job never completed a round, or was not a fedbrain FedAvg job)")
    found = json.loads(note.read_text())
    if not found.get("checkpoint") or not Path(found["checkpoint"]).is_file():
        raise ResumeError(f"{note}: the saved global model {found.get('checkpoint')} is not there")
    return found


def resume_job(job_folder: Path, out_dir: Path, server_run_dir: Path) -> tuple[Path, dict]:
    """A copy of the exported ``job_folder`` that continues the interrupted run in ``server_run_dir``
    (the server's ``<workspace>/<job id>``); returns (folder, checkpoint note)."""
    found = checkpoint_of(server_run_dir)
    start = int(found["round"]) + 1
    left = int(found["total_rounds"]) - start
    if left < 1:
        raise ResumeError(f"the interrupted job had completed all {found['total_rounds']} rounds: nothing to resume")
    job_folder, out_dir = Path(job_folder), Path(out_dir)
    target = out_dir / f"{job_folder.name}_resumed"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(job_folder, target)
    changed = 0
    for conf_path in target.glob("*/config/config_fed_server.json"):
        conf = json.loads(conf_path.read_text())
        for wf in conf.get("workflows", []):
            if wf.get("path", "").endswith("ResilientFedAvg"):
                wf["args"]["start_round"], wf["args"]["num_rounds"] = start, left
                changed += 1
        for comp in conf.get("components", []):
            if comp.get("id") == "persistor":
                comp["args"]["source_ckpt_file_full_name"] = found["checkpoint"]
        conf_path.write_text(json.dumps(conf, indent=2) + "\n")
    if not changed:
        raise ResumeError(f"{job_folder}: no fedbrain FedAvg controller (ResilientFedAvg) to resume")
    meta_path = target / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["name"] = f"{meta.get('name', job_folder.name)}_resumed"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return target, found
