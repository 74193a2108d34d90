"""FedAvg that survives a site failing mid-job: FLARE's FedAvg controller with a round policy.

FLARE 2.9's FedAvg asks ``num_clients`` sites (a random subset when fewer than connected) each
round and waits, with no timeout, until every one of them has answered or FLARE has deemed the
missing ones dead. :class:`ResilientFedAvg` keeps FLARE's loop, aggregation (built-in or a
custom ``aggregator``), persistence and events, and changes only who is asked and how long a
round waits (the *timeout policy*, settings in :class:`fedbrain.tasks.config.TaskConfig`):

- each round is sent to every site of the job that FLARE does not consider disconnected;
- the round closes when all of them answered, or ``round_timeout`` seconds after it was sent,
  or when the only sites still missing are ones FLARE deemed dead (``dead_site_grace`` after
  their job process disappeared);
- it is accepted with at least ``min_responses`` updates, otherwise the job ends with a one-line
  reason naming the sites that did not answer. An error reply from one site is tolerated while
  ``min_responses`` remain reachable (FLARE's dynamic error mode, told the same minimum);
- a late update (a straggler answering a closed round) is recorded by the server's audit and
  dropped; the straggler is asked again in the next round.

Privacy (``min_trained_sites``, at least 2): a round with fewer *trained* updates (a step count above
zero) is **not published**: the global model stays as it was, the record says why, and the job goes on
(a later round may have enough). Every global model carries how many sites trained it
(``fedbrain_trained_sites`` in its meta), so a site can refuse to build on one made from too few.

Each closed round is appended to ``round_contributions.jsonl`` in the server's run folder (so it
travels with the job result) and logged as one ``fedbrain-round`` line for ``fedbrain watch``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_common.workflows.scaffold import Scaffold

from fedbrain.contracts import CHECKPOINT_NOTE, NUM_STEPS_META, ROUND_FILE, ROUND_LOG_TAG, TRAINED_SITES_META
from fedbrain.fl.flare_private import client_name, tell_round_minimum
from fedbrain.fl.housekeeping import collect_round_garbage
from fedbrain.fl.progress import ProgressStats



class RoundFailed(RuntimeError):
    """A round closed with fewer than ``min_responses`` updates: the job ends with this message."""


def trained(result) -> bool:
    """Whether a site's result carries training (a step count above zero), not an empty update."""
    try:
        return float((getattr(result, "meta", None) or {}).get(NUM_STEPS_META) or 0) > 0
    except (TypeError, ValueError):
        return False


class ResilientFedAvg(ProgressStats, FedAvg):
    def __init__(self, *args, round_timeout: float = 0, min_responses: int | None = None,
                 fetch_grace: float = 60.0, min_trained_sites: int = 3, **kwargs):
        """``round_timeout``: seconds a round waits for all sites (0: no limit); ``min_responses``:
        updates a round needs to be accepted (None: ``num_clients``); ``fetch_grace``: seconds after
        which a site that has not even fetched the round's task is not waited for (0: always wait);
        ``min_trained_sites``: trained updates a round needs to be published (>= 2)."""
        super().__init__(*args, **kwargs)
        if int(min_trained_sites) < 2:
            raise ValueError(f"min_trained_sites must be >= 2, got {min_trained_sites}")
        self.min_trained_sites = int(min_trained_sites)
        self._trained: list[str] = []
        self._published_trained: int | None = None
        if round_timeout < 0 or fetch_grace < 0:
            raise ValueError(f"round_timeout and fetch_grace must be >= 0, got {round_timeout}, {fetch_grace}")
        self.round_timeout = int(round_timeout)
        self.min_responses = int(min_responses or self.num_clients)
        self.fetch_grace = float(fetch_grace)
        self._round_task = None
        self._unfetched_skipped: list[str] = []
        self._asked: list[str] = []
        self._answered: list[str] = []
        self._round_started = 0.0

    # ---- who is asked -------------------------------------------------------------------------
    def sample_clients(self, num_clients: int = None) -> list[str]:
        """Every site of the job FLARE does not deem disconnected (not a random ``num_clients`` subset)."""
        names = [c.name for c in self.engine.get_clients()]
        comm = getattr(self, "communicator", None)
        gone = [n for n in names if comm is not None and comm.get_client_disconnect_time(n)]
        alive = [n for n in names if n not in gone]
        if gone:
            self.warning(f"round {self.current_round}: not asking {gone}: FLARE deems them disconnected "
                         f"(their job process is gone); asking {alive}")
        if len(alive) < self.min_responses:
            raise RoundFailed(f"round {self.current_round}: only {len(alive)} site(s) alive ({', '.join(alive) or 'none'}), "
                              f"fewer than min_responses {self.min_responses}; disconnected: {', '.join(gone)}")
        return alive

    # ---- how long a round waits -----------------------------------------------------------------
    def send_model(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0, callback=None):
        if task_name == self.task_name:
            self._asked, self._answered, self._round_started = list(targets or []), [], time.time()
            self._trained = []
            timeout = self.round_timeout
        super().send_model(task_name=task_name, data=data, targets=targets, min_responses=min_responses,
                           timeout=timeout, callback=callback)

    def _prepare_task(self, data, task_name, timeout, callback):
        # broadcast_model has just set the error tolerance to "every target": tell it the real minimum.
        if task_name == self.task_name:
            tell_round_minimum(self, self.min_responses)
        task = super()._prepare_task(data=data, task_name=task_name, timeout=timeout, callback=callback)
        if task_name == self.task_name:
            self._round_task, self._unfetched_skipped = task, []
        return task

    def get_num_standing_tasks(self) -> int:
        """FedAvg waits while this is non-zero: also stop waiting for sites that never fetched the round."""
        n = super().get_num_standing_tasks()
        task = self._round_task
        if n == 1 and task is not None and task.completion_status is None:
            try:
                skip = self._never_fetched(task)
            except Exception as e:  # noqa: BLE001 - the policy is an optimisation; FLARE's own waiting still holds
                self.warning(f"fetch check failed ({e}); waiting as FLARE does")
                skip = []
            if skip:
                self._unfetched_skipped = skip
                self.warning(f"round {self.current_round}: {skip} did not fetch the task within {self.fetch_grace:.0f} s "
                             f"(job process gone, e.g. the site restarted) and every site that did has answered: "
                             f"closing the round without them")
                self._round_task = None
                self.cancel_task(task)
                return 0
        return n

    def _never_fetched(self, task) -> list[str]:
        """Sites asked this round that never fetched the task, once ``fetch_grace`` has passed, when every
        site that fetched it has answered and ``min_responses`` is reached; else []."""
        if not self.fetch_grace or time.time() - self._round_started < self.fetch_grace:
            return []
        fetched = {ct.client.name: ct for ct in list(task.client_tasks)}
        if any(ct.result_received_time is None for ct in fetched.values()):
            return []
        if len(self._answered) < self.min_responses:
            return []
        return [s for s in self._asked if s not in fetched]

    def _aggregate_one_result(self, result) -> bool:
        accepted = super()._aggregate_one_result(result)
        if accepted:
            self._answered.append(client_name(result))
            if trained(result):
                self._trained.append(client_name(result))
        return accepted

    def _publishable(self) -> bool:
        """Whether the round just closed is published: enough updates (``min_responses``), enough trained."""
        return len(self._answered) >= self.min_responses and len(self._trained) >= self.min_trained_sites

    def _get_aggregated_result(self):
        waited = time.time() - self._round_started
        missing = [s for s in self._asked if s not in self._answered]
        comm = getattr(self, "communicator", None)
        dead = [s for s in missing if comm is not None and comm.get_client_disconnect_time(s)]
        if not missing:
            closed_by = "all answered"
        elif self._unfetched_skipped and set(missing) <= set(self._unfetched_skipped) | set(dead):
            closed_by = f"missing sites never fetched the task in {self.fetch_grace:.0f} s"
        elif dead and len(dead) == len(missing):
            closed_by = "missing sites deemed dead"
        elif self.round_timeout and waited >= self.round_timeout - 1:
            closed_by = f"round_timeout {self.round_timeout} s"
        else:
            closed_by = "error replies"
        entry = {"round": self.current_round, "asked": self._asked, "aggregated": self._answered,
                 "missing": missing, "closed_by": closed_by, "seconds": round(waited, 1),
                 "min_responses": self.min_responses, "accepted": len(self._answered) >= self.min_responses,
                 "trained": list(self._trained), "min_trained_sites": self.min_trained_sites, "time": time.time()}
        entry["published"] = self._publishable()
        if entry["accepted"] and not entry["published"]:
            entry["why_unpublished"] = (f"{len(self._trained)} trained site(s) ({', '.join(sorted(self._trained)) or 'none'}), "
                                        f"fewer than min_trained_sites {self.min_trained_sites}: the global model "
                                        f"stays as it was")
        self._record(entry)
        if not entry["accepted"]:
            raise RoundFailed(f"round {self.current_round}: {len(self._answered)} of {len(self._asked)} sites answered "
                              f"({closed_by}), fewer than min_responses {self.min_responses}; "
                              f"no update from {', '.join(missing)}: the job ends here")
        if missing:
            self.warning(f"round {self.current_round} closed without {missing} ({closed_by}): "
                         f"aggregated {len(self._answered)} of {len(self._asked)} updates")
        if not entry["published"]:
            self.warning(f"round {self.current_round} not published: {entry['why_unpublished']}")
            return FLModel(params={}, params_type=ParamsType.DIFF, meta={TRAINED_SITES_META: self._published_trained})
        result = super()._get_aggregated_result()
        self._published_trained = len(self._trained)
        result.meta = {**(result.meta or {}), TRAINED_SITES_META: self._published_trained}
        return result

    def load_model(self):
        """FLARE's initial model; for a job the server cloned to resume an interrupted one
        (:mod:`fedbrain.fl.autoresume`), the interrupted job's last saved global model instead, and the rounds left."""
        from fedbrain.fl.autoresume import read_resume_note

        try:
            note = read_resume_note(Path(self.get_run_dir()).parent, self.fl_ctx.get_job_id())
        except (OSError, ValueError) as e:
            note = None
            self.warning(f"could not read this job's resume note ({e!r}); starting from its initial model")
        if note:
            self.start_round = int(note["round"]) + 1
            self.num_rounds = int(note["total_rounds"]) - self.start_round
            self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
            if hasattr(self.persistor, "source_ckpt_file_full_name"):
                self.persistor.source_ckpt_file_full_name = note["checkpoint"]
            self.info(f"resuming job {note['from_job']}: rounds {self.start_round}..{note['total_rounds'] - 1} from "
                      f"its global model after round {note['round']} ({note['checkpoint']})")
        return super().load_model()

    def save_model(self, model) -> None:
        """FLARE's persistence, then a note of which round the saved global model is (for a resume)."""
        super().save_model(model)
        try:
            run_dir = Path(self.get_run_dir())
            saved = sorted(run_dir.rglob("FL_global_model.pt"), key=lambda p: p.stat().st_mtime)
            note = {"round": self.current_round, "checkpoint": str(saved[-1]) if saved else None,
                    "total_rounds": self.start_round + self.num_rounds, "time": time.time()}
            (run_dir / CHECKPOINT_NOTE).write_text(json.dumps(note) + "\n")
        except OSError as e:
            self.warning(f"could not write {CHECKPOINT_NOTE}: {e}")

    def _record(self, entry: dict) -> None:
        """The closed round, for people (log line, round file); then the round's garbage is collected."""
        collect_round_garbage()  # fedbrain.fl.housekeeping
        self.info(f"{ROUND_LOG_TAG} " + json.dumps({k: v for k, v in entry.items() if k != "time"}, sort_keys=True))
        try:
            with open(Path(self.get_run_dir()) / ROUND_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as e:  # the record is for people; the round itself goes on
            self.warning(f"could not write {ROUND_FILE}: {e}")


class ResilientScaffold(ProgressStats, Scaffold):
    """FLARE's SCAFFOLD controller with the same round policy settings as :class:`ResilientFedAvg`:
    a round waits at most ``round_timeout`` seconds and needs ``min_responses`` updates (FLARE's own
    waits for every site with no limit). SCAFFOLD aggregates after the round's results are in, so the
    policy is applied around FLARE's ``send_model_and_wait``; each round is recorded the same way."""

    def __init__(self, *args, round_timeout: float = 0, min_responses: int | None = None, min_trained_sites: int = 3,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if round_timeout < 0:
            raise ValueError(f"round_timeout must be >= 0, got {round_timeout}")
        if int(min_trained_sites) < 2:
            raise ValueError(f"min_trained_sites must be >= 2, got {min_trained_sites}")
        self.round_timeout = int(round_timeout)
        self.min_responses = int(min_responses or self.num_clients)
        self.min_trained_sites = int(min_trained_sites)
        self._published_trained: int | None = None

    def send_model_and_wait(self, task_name: str = "train", data=None, targets=None, min_responses=None, timeout=0):
        started = time.time()
        if task_name == "train" and data is not None:
            data.meta = {**(data.meta or {}), TRAINED_SITES_META: self._published_trained}
        results = super().send_model_and_wait(task_name=task_name, data=data, targets=targets,
                                              min_responses=min_responses, timeout=timeout or self.round_timeout)
        if task_name != "train":
            return results
        asked = list(targets or [])
        answered = [client_name(r) for r in results]
        missing = [s for s in asked if s not in answered]
        trained_sites = [client_name(r) for r in results if trained(r)]
        entry = {"round": self.current_round, "asked": asked, "aggregated": answered, "missing": missing,
                 "closed_by": "all answered" if not missing else f"round_timeout {self.round_timeout} s",
                 "seconds": round(time.time() - started, 1), "min_responses": self.min_responses,
                 "accepted": len(answered) >= self.min_responses, "trained": trained_sites,
                 "min_trained_sites": self.min_trained_sites, "time": time.time()}
        entry["published"] = entry["accepted"] and len(trained_sites) >= self.min_trained_sites
        if entry["accepted"] and not entry["published"]:
            entry["why_unpublished"] = (f"{len(trained_sites)} trained site(s) ({', '.join(sorted(trained_sites)) or 'none'}), "
                                        f"fewer than min_trained_sites {self.min_trained_sites}")
        ResilientFedAvg._record(self, entry)
        if not entry["accepted"]:
            raise RoundFailed(f"round {self.current_round}: {len(answered)} of {len(asked)} sites answered "
                              f"({entry['closed_by']}), fewer than min_responses {self.min_responses}; "
                              f"no update from {', '.join(missing)}: the job ends here")
        if not entry["published"]:  # SCAFFOLD's controls move with the model: no round to skip, the job ends
            raise RoundFailed(f"round {self.current_round} not published: {entry['why_unpublished']}; "
                              f"SCAFFOLD cannot skip a round: the job ends here")
        self._published_trained = len(trained_sites)
        return results
