"""A job interrupted by a server restart continues by itself (fedbrain.fl.autoresume): which jobs are continued,
from which round, as whose job, and what the clone's controller starts from. The whole path with real FLARE
processes (the server killed mid-job, restarted by its kit's start script) is the `faults` benchmark's
server_restart scenario (bench/faults.py, docs/reliability.md)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey, RunStatus
from nvflare.app_common.app_constant import AppConstants

from fedbrain.contracts import CHECKPOINT_NOTE, ROUND_FILE
from fedbrain.fl.autoresume import RESUMED_FROM_META, ResumeInterruptedJobs, plan_resume, read_resume_note


def _run(root: Path, job_id: str, last_round: int | None, total: int = 5) -> Path:
    run = root / job_id
    (run / "app_server").mkdir(parents=True)
    (run / ROUND_FILE).write_text(json.dumps({"round": 0, "asked": ["hospital-a", "hospital-b"]}) + "\n")
    if last_round is not None:
        model = run / "app_server" / "FL_global_model.pt"
        model.write_bytes(b"model")
        (run / CHECKPOINT_NOTE).write_text(json.dumps({"round": last_round, "checkpoint": str(model),
                                                       "total_rounds": total}))
    return run


def test_plan_resume_continues_after_the_last_saved_round_only(tmp_path):
    assert plan_resume(_run(tmp_path, "none", None))[0] is None
    plan, _ = plan_resume(_run(tmp_path, "mid", 2))
    assert (plan["round"], plan["total_rounds"]) == (2, 5)
    plan, why = plan_resume(_run(tmp_path, "done", 4))
    assert plan is None and "all 5 rounds" in why
    gone = _run(tmp_path, "gone", 1)
    Path(json.loads((gone / CHECKPOINT_NOTE).read_text())["checkpoint"]).unlink()
    plan, why = plan_resume(gone)
    assert plan is None and "not there" in why


class _Jobs:
    """The server's job store as the component uses it (FLARE's JobDefManager API)."""

    def __init__(self, jobs, root: Path):
        self.root = root
        self.jobs = {j.job_id: j for j in jobs}
        self.status, self.cloned = {}, []

    def get_jobs_by_status(self, statuses, fl_ctx):
        assert set(statuses) == {RunStatus.RUNNING, RunStatus.DISPATCHED}
        return list(self.jobs.values())

    def clone(self, from_jid, meta, fl_ctx):
        new = meta[JobMetaKey.JOB_ID.value]  # FLARE's clone keeps a job id the meta gives
        assert read_resume_note(self.root, new)["from_job"] == from_jid  # the note is there before the clone is
        self.cloned.append((from_jid, meta))
        return {**meta}

    def set_status(self, jid, status, fl_ctx):
        self.status[jid] = status


def _ctx(root: Path, jobs: _Jobs | None = None, job_id: str | None = None, connected=("hospital-a", "hospital-b")
         ) -> FLContext:
    ctx = FLContext()
    engine = SimpleNamespace(get_component=lambda name: jobs, fire_event=lambda *a, **k: None,
                             get_workspace=lambda: SimpleNamespace(get_root_dir=lambda: str(root)),
                             get_clients=lambda: [SimpleNamespace(name=n) for n in connected])
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    if job_id:
        ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=True, sticky=False)
    return ctx


def test_the_restarted_server_clones_each_interrupted_job_as_its_submitter(tmp_path, monkeypatch):
    _run(tmp_path, "a", 2)
    _run(tmp_path, "b", None)
    submitter = {JobMetaKey.SUBMITTER_NAME.value: "lead@hospital-b.org", JobMetaKey.SUBMITTER_ORG.value: "hospital_b",
                 JobMetaKey.SUBMITTER_ROLE.value: "lead", JobMetaKey.JOB_NAME.value: "seg",
                 JobMetaKey.DEPLOY_MAP.value: {"app": ["@ALL"]}, JobMetaKey.STATUS.value: "RUNNING",
                 JobMetaKey.JOB_ID.value: "a"}
    jobs = _Jobs([SimpleNamespace(job_id="a", meta=submitter), SimpleNamespace(job_id="b", meta={})], tmp_path)
    said = []
    component = ResumeInterruptedJobs()
    monkeypatch.setattr(component, "log_warning", lambda ctx, msg: said.append(msg))
    done = component.resume_all(_ctx(tmp_path, jobs))
    (_, clone), second = done
    assert done[0][0] == "a" and second == ("b", None)
    (origin, meta), = jobs.cloned
    assert origin == "a" and meta[JobMetaKey.SUBMITTER_NAME.value] == "lead@hospital-b.org"
    assert meta[JobMetaKey.SUBMITTER_ROLE.value] == "lead" and meta[JobMetaKey.DEPLOY_MAP.value] == {"app": ["@ALL"]}
    assert meta[RESUMED_FROM_META] == {"job": "a", "after_round": 2} and JobMetaKey.STATUS.value not in meta
    note = read_resume_note(tmp_path, clone)
    assert (note["from_job"], note["round"], note["total_rounds"]) == ("a", 2, 5)
    assert jobs.status == {"a": RunStatus.FINISHED_ABNORMAL, "b": RunStatus.FINISHED_ABNORMAL}
    assert f"continues as job {clone} from round 3 (2 rounds left" in said[0]
    assert "b was interrupted by a server restart and is not resumed: no round was saved" in said[1]


def test_a_resumed_job_interrupted_before_its_first_saved_round_resumes_from_the_same_model(tmp_path):
    run = _run(tmp_path, "a", 1)
    jobs = _Jobs([SimpleNamespace(job_id="a", meta={})], tmp_path)
    (_, clone), = ResumeInterruptedJobs().resume_all(_ctx(tmp_path, jobs))
    (tmp_path / clone).mkdir()  # the clone started, then the server went down before it closed a round
    again = _Jobs([SimpleNamespace(job_id=clone, meta={})], tmp_path)
    (_, second), = ResumeInterruptedJobs().resume_all(_ctx(tmp_path, again))
    note = read_resume_note(tmp_path, second)
    assert note["round"] == 1 and note["checkpoint"] == str(run / "app_server" / "FL_global_model.pt")


def test_the_clone_s_controller_starts_from_the_saved_model_and_runs_the_rounds_left(tmp_path, monkeypatch):
    from nvflare.app_common.workflows.fedavg import FedAvg

    from fedbrain.fl.resilient import ResilientFedAvg

    _run(tmp_path, "a", 2)
    jobs = _Jobs([SimpleNamespace(job_id="a", meta={})], tmp_path)
    (_, clone), = ResumeInterruptedJobs().resume_all(_ctx(tmp_path, jobs))
    controller = ResilientFedAvg(num_clients=2, num_rounds=5, min_trained_sites=2)
    controller.fl_ctx = _ctx(tmp_path, job_id=clone)
    controller.persistor = SimpleNamespace(source_ckpt_file_full_name=None)
    monkeypatch.setattr(controller, "get_run_dir", lambda: str(tmp_path / clone))
    monkeypatch.setattr(FedAvg, "load_model", lambda self: "the model FLARE's persistor loads")
    assert controller.load_model() == "the model FLARE's persistor loads"
    assert (controller.start_round, controller.num_rounds) == (3, 2)
    assert controller.fl_ctx.get_prop(AppConstants.NUM_ROUNDS) == 2
    assert controller.persistor.source_ckpt_file_full_name == str(tmp_path / "a" / "app_server" / "FL_global_model.pt")
    # a job that is not a resume starts as configured
    fresh = ResilientFedAvg(num_clients=2, num_rounds=5, min_trained_sites=2)
    fresh.fl_ctx = _ctx(tmp_path, job_id="other")
    fresh.persistor = SimpleNamespace(source_ckpt_file_full_name=None)
    monkeypatch.setattr(fresh, "get_run_dir", lambda: str(tmp_path / "other"))
    fresh.load_model()
    assert (fresh.start_round, fresh.num_rounds) == (0, 5) and fresh.persistor.source_ckpt_file_full_name is None


def test_the_clone_waits_for_the_job_s_sites_to_reconnect_then_goes_on_without_the_missing(tmp_path, monkeypatch):
    """FLARE deploys a job to the sites connected when it starts: a clone made before the hospitals reconnect to
    the restarted server would run without them (seen in a clean-clone run: round 1 asked 2 of 4 sites)."""
    import time

    _run(tmp_path, "a", 1)
    jobs = _Jobs([SimpleNamespace(job_id="a", meta={})], tmp_path)
    said = []
    component = ResumeInterruptedJobs(wait_for_sites=1.5)
    monkeypatch.setattr(component, "log_warning", lambda ctx, msg: said.append(msg))
    t = time.time()
    (_, clone), = component.resume_all(_ctx(tmp_path, jobs, connected=("hospital-a",)))
    assert time.time() - t >= 1.5 and jobs.cloned  # waited for hospital-b, then went on with who is back
    assert f"job {clone} continues job a without hospital-b" in said[0]
    jobs2 = _Jobs([SimpleNamespace(job_id="b", meta={})], tmp_path)
    _run(tmp_path, "b", 1)
    t = time.time()
    component.resume_all(_ctx(tmp_path, jobs2))  # everyone back: no wait
    assert time.time() - t < 1.0
