"""A job interrupted by a server restart continues by itself, from the last round the server saved.

FLARE 2.9 does not run an interrupted job again: after a restart its entry in the job store keeps
saying RUNNING and nothing runs (component snapshots were removed from FLARE). What survives on the
server's disk is the job's run folder: the global model saved after each round and fedbrain's note of
which round that was (``fedbrain_checkpoint.json``, :class:`fedbrain.fl.resilient.ResilientFedAvg`).

:class:`ResumeInterruptedJobs`, a component of the server kit (``local/resources.json``), runs once as
the server starts. For each job the store still calls RUNNING or DISPATCHED (nothing runs yet at
start, so each was interrupted):

- with a saved round and rounds left: FLARE's own clone of the job (the same job data, so every app is byte
  for byte what was submitted; the clone keeps the submitter), plus a note in
  ``<server workspace>/fedbrain_resume/<new job id>.json`` that the clone's controller reads at start: it
  loads the saved global model and runs the rounds left (:meth:`ResilientFedAvg.load_model`). No
  completed round is trained again;
- the clone is made once the sites the interrupted job asked have reconnected (at most ``wait_for_sites``
  seconds after the start; FLARE deploys a job to the sites connected when it starts and cannot add one later);
- the interrupted job is marked FINISHED:ABNORMAL either way, and the server log says in one line what
  happened to it (resumed as which job, from which round; or why not).

``fedbrain job resume`` stays for what this cannot do: a job whose run folder was moved, or a server
kit without this component.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext

from fedbrain.contracts import CHECKPOINT_NOTE, ROUND_FILE

#: Folder of the server's workspace holding one note per resumed job.
RESUME_FOLDER = "fedbrain_resume"
#: Job meta key naming the job a clone resumes (shown by `list_jobs -d`).
RESUMED_FROM_META = "fedbrain_resumed_from"


def resume_note_path(workspace_root: Path, job_id: str) -> Path:
    return Path(workspace_root) / RESUME_FOLDER / f"{job_id}.json"


def read_resume_note(workspace_root: Path, job_id: str) -> dict | None:
    """What a resumed job's controller needs: ``{"from_job", "round", "checkpoint", "total_rounds"}``, or None."""
    path = resume_note_path(workspace_root, job_id)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def sites_of(run_dir: Path) -> list[str]:
    """The sites the interrupted job asked in its rounds (its ``round_contributions.jsonl``)."""
    path = Path(run_dir) / ROUND_FILE
    sites: set[str] = set()
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                sites.update(json.loads(line).get("asked") or [])
    except (OSError, ValueError):
        pass
    return sorted(sites)


def plan_resume(run_dir: Path) -> tuple[dict | None, str]:
    """(note for the clone, or None; why) for an interrupted run folder."""
    note = Path(run_dir) / CHECKPOINT_NOTE
    if not note.is_file():
        return None, "no round was saved (it stopped before its first round closed, or is not a fedbrain FedAvg job)"
    try:
        found = json.loads(note.read_text())
        last, total = int(found["round"]), int(found["total_rounds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{note} is unreadable ({e})"
    if not found.get("checkpoint") or not Path(found["checkpoint"]).is_file():
        return None, f"its saved global model {found.get('checkpoint')} is not there"
    if last + 1 >= total:
        return None, f"all {total} rounds had closed (only the final evaluation was lost)"
    return {"round": last, "checkpoint": found["checkpoint"], "total_rounds": total}, ""


class ResumeInterruptedJobs(FLComponent):
    """At server start: clone every interrupted fedbrain FedAvg job to continue after its last saved round.

    The clone is made once the sites the interrupted job asked have reconnected, or after ``wait_for_sites``
    seconds with whoever is back: FLARE deploys a job to the sites connected when it starts and cannot add one
    later, so a clone made at once would run without every hospital still reconnecting to the restarted server."""

    def __init__(self, enabled: bool = True, wait_for_sites: float = 120.0):
        super().__init__()
        self.enabled = bool(enabled)
        self.wait_for_sites = float(wait_for_sites)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.SYSTEM_START and self.enabled:
            import threading

            engine = fl_ctx.get_engine()

            def resume():
                try:
                    with engine.new_context() as ctx:
                        self.resume_all(ctx)
                except Exception as e:  # noqa: BLE001 - the server runs on whatever happens here
                    self.logger.error(f"fedbrain: could not resume interrupted jobs: {e!r}")

            threading.Thread(target=resume, name="fedbrain-resume", daemon=True).start()

    def _wait_for(self, engine, sites: list[str]) -> list[str]:
        """Block until every one of ``sites`` is connected or the wait is over; the ones still missing."""
        import time

        deadline = time.time() + self.wait_for_sites
        while True:
            connected = {c.name for c in (engine.get_clients() or [])}
            missing = [s for s in sites if s not in connected]
            if not missing or time.time() >= deadline:
                return missing
            time.sleep(1.0)

    def resume_all(self, fl_ctx: FLContext) -> list[tuple[str, str | None]]:
        from nvflare.apis.fl_constant import SystemComponents
        from nvflare.apis.job_def import JobMetaKey, RunStatus, new_job_id

        engine = fl_ctx.get_engine()
        jobs = engine.get_component(SystemComponents.JOB_MANAGER)
        root = Path(engine.get_workspace().get_root_dir())
        done = []
        for job in jobs.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx):
            old = job.job_id
            plan, why = plan_resume(root / old)
            if plan is None:  # a resumed job interrupted again before it saved a round: its own start still holds
                earlier = read_resume_note(root, old)
                if earlier and Path(earlier.get("checkpoint") or "").is_file():
                    plan = {k: earlier[k] for k in ("round", "checkpoint", "total_rounds")}
            new = None
            if plan is not None:
                # The note first, under the id the clone will get: the job runner may schedule the clone at once.
                new = new_job_id()
                path = resume_note_path(root, new)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"from_job": old, **plan}) + "\n")
            jobs.set_status(old, RunStatus.FINISHED_ABNORMAL, fl_ctx)
            missing = self._wait_for(engine, sites_of(root / old)) if new else []
            if new:
                keep = {k: job.meta[k] for k in job.meta if k in _cloned_keys()}
                keep[JobMetaKey.CLONED_FROM.value] = old
                keep[JobMetaKey.JOB_ID.value] = new
                keep[RESUMED_FROM_META] = {"job": old, "after_round": plan["round"]}
                new = jobs.clone(from_jid=old, meta=keep, fl_ctx=fl_ctx)[JobMetaKey.JOB_ID.value]
            if new and missing:
                self.log_warning(fl_ctx, f"fedbrain: job {new} continues job {old} without {', '.join(missing)}: "
                                         f"not reconnected {self.wait_for_sites:.0f} s after the restart")
            if new:
                self.log_warning(fl_ctx, f"fedbrain: job {old} was interrupted by a server restart after round "
                                         f"{plan['round']}; it continues as job {new} from round {plan['round'] + 1} "
                                         f"({plan['total_rounds'] - plan['round'] - 1} rounds left, the saved global "
                                         f"model); {old} is marked FINISHED:ABNORMAL")
            else:
                self.log_warning(fl_ctx, f"fedbrain: job {old} was interrupted by a server restart and is not "
                                         f"resumed: {why}; it is marked FINISHED:ABNORMAL (submit it again)")
            done.append((old, new))
        return done


def _cloned_keys() -> set[str]:
    """The job meta FLARE's own clone_job keeps (its deploy map, resources, minimum sites, name, study...),
    and the submitter: a resumed job is still the submitter's job."""
    from nvflare.apis.job_def import JobMetaKey
    from nvflare.private.fed.server.job_cmds import CLONED_META_KEYS

    return set(CLONED_META_KEYS) | {JobMetaKey.SUBMITTER_NAME.value, JobMetaKey.SUBMITTER_ORG.value,
                                    JobMetaKey.SUBMITTER_ROLE.value}
