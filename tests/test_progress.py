"""The server job's own progress record (fedbrain.fl.progress): the same reading as the server's log,
kept as the log is written and answered through FLARE's show_stats machinery."""

import logging
import math

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

from fedbrain.contracts import GUARD_LOG_TAG, ROUND_LOG_TAG, SITE_METRICS_LOG_TAG
from fedbrain.fl import progress
from fedbrain.fl.progress import STATS_GROUP, ProgressStats, parse_log, progress_from_stats

CTX = "[identity=server, run=abc, wf=controller, peer={peer}, task_name=train]"
LINES = [
    "FedAvg - INFO - [identity=server, run=abc, wf=controller] - ------ Round 0 started. ------",
    f"FedAvg - INFO - {CTX.format(peer='hospital-a')}: Aggregated 1/3 results",
    f'ReceivedUpdateAudit - INFO - {SITE_METRICS_LOG_TAG} {{"site": "hospital-a", "round": 0, '
    f'"metrics": {{"val_dice": 0.41, "dp_epsilon_unbounded": 1}}}}',
    f"GuardedAggregator - WARNING - {GUARD_LOG_TAG}: round 0: refused hospital-b: update norm 4075 is 91.7x the median",
    f'ResilientFedAvg - INFO - {ROUND_LOG_TAG} {{"aggregated": ["hospital-a"], "missing": ["hospital-c"], "round": 0}}',
    "FedAvg - INFO - [identity=server, run=abc, wf=controller] - ------ Round 1 started. ------",
    f"FedAvg - INFO - {CTX.format(peer='hospital-c')}: Aggregated 1/3 results",
    f"GuardedAggregator - ERROR - {GUARD_LOG_TAG}: hospital-b flagged: refused in 2 consecutive rounds",
]


def test_the_log_reading_names_round_sites_metrics_guard_and_closed_round():
    got = parse_log("\n".join(LINES))
    assert got["round"] == 1 and got["aggregated"] == ["hospital-c"]  # a new round forgets the last one's sites
    assert got["site_metrics"]["hospital-a"]["round"] == 0
    assert got["site_metrics"]["hospital-a"]["dp_epsilon_spent"] == math.inf
    assert got["guard"]["hospital-b"]["round"] == 0 and "91.7x" in got["guard"]["hospital-b"]["reason"]
    assert "2 consecutive" in got["guard"]["hospital-b"]["flagged"]
    assert got["closed"] == {"aggregated": ["hospital-a"], "missing": ["hospital-c"], "round": 0}
    assert parse_log("") == {"round": None, "aggregated": [], "site_metrics": {}, "guard": {}, "closed": None}


class _Controller(ProgressStats, FLComponent):
    """Stands in for a round controller: a FLARE component with the mixin."""


def _stats(component, fl_ctx) -> dict:
    collector = GroupInfoCollector()
    fl_ctx.set_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, collector, private=True, sticky=False)
    component.handle_event(InfoCollector.EVENT_TYPE_GET_STATS, fl_ctx)
    return {"server": collector.info}


def test_the_recorder_reads_what_is_logged_and_answers_show_stats():
    """Lines logged through any logger of the job process (as FLARE's components log them) end in the
    show_stats reply exactly as the log reading would read them; the recorder leaves with the run."""
    component, fl_ctx = _Controller(), FLContext()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    try:
        component.handle_event(EventType.START_RUN, fl_ctx)
        assert progress_from_stats(_stats(component, fl_ctx))["round"] is None
        for i, line in enumerate(LINES):
            logging.getLogger(f"nvflare.somewhere.C{i % 3}").info(line)
        reply = _stats(component, fl_ctx)
        assert reply["server"][STATS_GROUP] == parse_log("\n".join(LINES))
        assert progress_from_stats(reply) == parse_log("\n".join(LINES))
        # FLARE's configure_job_log replaces the root's handlers: the next question puts the recorder back
        recorder = progress._recorder
        root.removeHandler(recorder)
        logging.getLogger("x").info("------ Round 7 started. ------")  # missed while detached
        assert progress_from_stats(_stats(component, fl_ctx))["round"] == 1
        logging.getLogger("x").info("------ Round 8 started. ------")
        assert progress_from_stats(_stats(component, fl_ctx))["round"] == 8
        component.handle_event(EventType.END_RUN, fl_ctx)
        assert recorder not in root.handlers and progress._recorder is None
    finally:
        root.setLevel(level)
        progress._detach()


def test_a_reply_without_the_record_is_not_progress():
    """A job whose server app has no fedbrain controller (or FLARE's own reply shape) falls back to the log."""
    assert progress_from_stats({"server": {"ServerRunner": {"status": "started"}}}) is None
    assert progress_from_stats({}) is None and progress_from_stats(None) is None
