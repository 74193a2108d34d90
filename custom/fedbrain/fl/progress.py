"""A running job's progress, kept by the server's job process and answered through FLARE's ``show_stats``.

`fedbrain watch`, `fedbrain status` and the POC runner's progress bar used to download the server's
whole job log at every poll and parse it: a reply that grows with every round (megabytes after a few
hundred rounds), and every admin reply leaves the server's parent process larger (docs/maintainers.md,
the soak benchmark). The parse is the same here, line by line as the server writes its log: a logging
handler in the job process feeds :class:`ProgressParser`, and the round controller (or the HE
aggregator) answers FLARE's ``show_stats`` with the snapshot, a few hundred bytes whatever the job's
length. A finished job (``show_stats`` needs a running one) is still read from its log, with the
same parser (:func:`parse_log`).
"""

from __future__ import annotations

import json
import logging
import re
import threading

from fedbrain.contracts import GUARD_LOG_TAG, ROUND_LOG_TAG, SITE_METRICS_LOG_TAG, epsilon_from_wire

#: The ``show_stats`` group the snapshot is filed under.
STATS_GROUP = "fedbrain_progress"
#: FedAvg's server log lines: a round starts; one site's update aggregated.
ROUND_RE = re.compile(r"Round (\d+) started")
PEER_RE = re.compile(r"peer=([^,\]]+).*Aggregated \d+/\d+ results")
_GUARD_REFUSED = re.compile(re.escape(GUARD_LOG_TAG) + r": round (\d+): refused ([^:]+): (.*)$")
_GUARD_FLAGGED = re.compile(re.escape(GUARD_LOG_TAG) + r": (\S+) flagged: (.*)$")


def _tagged_json(line: str, tag: str):
    at = line.find(tag + " ")
    if at < 0:
        return None
    try:
        return json.loads(line[at + len(tag) + 1:])
    except ValueError:
        return None


class ProgressParser:
    """The round in progress, the sites aggregated in it, each site's latest metrics, the update
    guard's latest word per site and the last closed round, from server job log lines fed in order."""

    def __init__(self):
        self.round: int | None = None
        self.aggregated: set[str] = set()
        self.site_metrics: dict[str, dict] = {}
        self.guard: dict[str, dict] = {}
        self.closed: dict | None = None

    def feed(self, line: str) -> None:
        m = ROUND_RE.search(line)
        if m:
            self.round, self.aggregated = int(m.group(1)), set()
            return
        m = PEER_RE.search(line)
        if m:
            if self.round is not None:
                self.aggregated.add(m.group(1))
            return
        if SITE_METRICS_LOG_TAG in line:
            record = _tagged_json(line, SITE_METRICS_LOG_TAG)
            if isinstance(record, dict):
                self.site_metrics[str(record.get("site"))] = {"round": record.get("round"),
                                                              **epsilon_from_wire(record.get("metrics") or {})}
            return
        if ROUND_LOG_TAG in line:
            record = _tagged_json(line, ROUND_LOG_TAG)
            if isinstance(record, dict):
                self.closed = record
            return
        if GUARD_LOG_TAG in line:
            m = _GUARD_REFUSED.search(line)
            if m:
                self.guard.setdefault(m.group(2), {}).update(round=int(m.group(1)), reason=m.group(3).strip())
                return
            m = _GUARD_FLAGGED.search(line)
            if m:
                self.guard.setdefault(m.group(1), {})["flagged"] = m.group(2).strip()

    def snapshot(self) -> dict:
        """What `fedbrain watch` shows of a job (JSON-safe: infinite epsilon stays a float)."""
        return {"round": self.round, "aggregated": sorted(self.aggregated),
                "site_metrics": {k: dict(v) for k, v in self.site_metrics.items()},
                "guard": {k: dict(v) for k, v in self.guard.items()},
                "closed": dict(self.closed) if self.closed is not None else None}


def parse_log(text: str) -> dict:
    """A whole server job log (a finished job, or a server without the recorder) read as the recorder reads it."""
    parser = ProgressParser()
    for line in text.splitlines():
        parser.feed(line)
    return parser.snapshot()


class ProgressRecorder(logging.Handler):
    """Feeds every log record of the job process to one parser (root logger, as FLARE's log file is written)."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.parser = ProgressParser()
        self._parse_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a badly formatted record is FLARE's log handler's business
            return
        with self._parse_lock:
            for line in message.splitlines() or [""]:
                self.parser.feed(line)

    def snapshot(self) -> dict:
        with self._parse_lock:
            return self.parser.snapshot()


#: The job process's recorder (one job per process); installed by whichever component starts first.
_recorder: ProgressRecorder | None = None
_recorder_lock = threading.Lock()


def _attached() -> ProgressRecorder:
    """The recorder, (re)attached to the root logger: FLARE's ``configure_job_log`` replaces the root's
    handlers, and a recorder lost that way is put back (lines in between are missed, the next round's
    line puts the round right)."""
    global _recorder
    with _recorder_lock:
        if _recorder is None:
            _recorder = ProgressRecorder()
        root = logging.getLogger()
        if _recorder not in root.handlers:
            root.addHandler(_recorder)
        return _recorder


def _detach() -> None:
    global _recorder
    with _recorder_lock:
        if _recorder is not None:
            logging.getLogger().removeHandler(_recorder)
            _recorder = None


class ProgressStats:
    """Mixed into the server's round controllers and the HE aggregator (a FLARE component each job has):
    starts the recorder with the run, answers ``show_stats``, stops with the run."""

    def handle_event(self, event_type: str, fl_ctx) -> None:
        from nvflare.apis.event_type import EventType
        from nvflare.widgets.info_collector import InfoCollector

        if event_type == EventType.START_RUN:
            _attached()
        elif event_type == InfoCollector.EVENT_TYPE_GET_STATS:
            collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
            if collector is not None:
                collector.set_info(group_name=STATS_GROUP, info=_attached().snapshot())
        elif event_type == EventType.END_RUN:
            _detach()
        super().handle_event(event_type, fl_ctx)


def progress_from_stats(stats: dict) -> dict | None:
    """The snapshot in a ``show_stats(job, "server")`` reply, or None when the job's server app has no recorder."""
    if not isinstance(stats, dict):
        return None
    server = stats.get("server", stats)
    found = server.get(STATS_GROUP) if isinstance(server, dict) else None
    return found if isinstance(found, dict) else None
