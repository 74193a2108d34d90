"""A site's privacy ledger: every release of its patients' data, append-only and tamper-evident.

One file per site, ``<workspace>/privacy/ledger.jsonl``; each line is one entry and carries the
SHA-256 of the line before it (``prev``), so an edited or removed line breaks the chain. The
number of entries and the hash of the last one are also kept in the site's ``local/`` folder
(``privacy_ledger_head.json``), so a truncated or deleted ledger is noticed too. A ledger that
fails these checks refuses every job that needs the budget, with one line saying what was found.

Entries are keyed by **patients**, not by a datalist's path: a ``cohort`` entry lists the
site's training cases as salted hashes of their case IDs (the IDs themselves never enter the
ledger), and each release names its cohort. The history that bounds a job is every release whose
cohort shares at least one patient with the job's training cases (a conservative composition:
each current patient is counted in all of them), so moving or rebuilding a datalist does not
restart the same patients at epsilon 0, while a disjoint set of patients starts fresh.

A release without DP (the site set a budget and turned ``require_dp`` off) is recorded as an
unbounded release: epsilon is infinite from then on for those patients.

Writers hold an exclusive lock (``ledger.lock``) while they verify, read and append; a job reads
the ledger under the same lock before each release.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

from fedbrain.privacy.accounting import ACCOUNTANT

LEDGER_FILE = "ledger.jsonl"
HEAD_FILE = "privacy_ledger_head.json"  # in local/: the chain's length and last hash


def head_record_path(workspace: Path) -> Path:
    """Where the ledger's head record lives: the site's ``local/``, apart from ``privacy/``. Where ``local/`` is a
    link into a kit copied afresh at every start (FLARE's NVFL_WORKSPACE mode, which fedbrain's Docker and
    Kubernetes images run), a record there would vanish with each restart and the site would refuse every DP
    job: it then sits in the workspace folder itself."""
    local = Path(workspace) / "local"
    return (Path(workspace) if local.is_symlink() else local) / HEAD_FILE
GENESIS = "0" * 64
UNBOUNDED = "no_dp"  # an entry kind: a release without DP (epsilon infinite)


class LedgerError(RuntimeError):
    """The ledger failed verification (edited, truncated, deleted): no job may use the budget."""


def _hash(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


class PrivacyLedger:
    def __init__(self, workspace: str | Path):
        self.workspace = Path(workspace)
        self.path = self.workspace / "privacy" / LEDGER_FILE
        self.head_path = head_record_path(self.workspace)

    # ---- patients ---------------------------------------------------------------------------------
    def _salt(self) -> str:
        """A per-site random salt (kept with the ledger), so a patient hash means nothing elsewhere."""
        salt = self.workspace / "privacy" / "ledger.salt"
        if not salt.is_file():
            salt.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(salt, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(16).hex())
        return salt.read_text().strip()

    def patients(self, case_ids) -> list[str]:
        salt = self._salt()
        return sorted({hashlib.sha256(f"{salt}:{cid}".encode()).hexdigest()[:24] for cid in case_ids})

    @staticmethod
    def cohort_of(patients: list[str]) -> str:
        return hashlib.sha256(",".join(patients).encode()).hexdigest()[:16]

    # ---- reading and verifying ----------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """Every entry after verifying the chain against the head in local/; raises LedgerError."""
        head = json.loads(self.head_path.read_text()) if self.head_path.is_file() else None
        if not self.path.is_file():
            if head and head.get("entries"):
                raise LedgerError(f"privacy ledger {self.path} is missing, but {self.head_path} records "
                                  f"{head['entries']} entries (deleted?)")
            return []
        lines = self.path.read_text().splitlines()
        entries, prev = [], GENESIS
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise LedgerError(f"privacy ledger {self.path}: entry {i + 1} is not valid JSON (edited?)") from None
            if entry.get("prev") != prev or entry.get("seq") != i:
                raise LedgerError(f"privacy ledger {self.path}: entry {i + 1} does not follow the one before "
                                  f"(edited or removed entries)")
            prev = entry["_hash"] = _hash(line)  # its own hash, kept in memory only (the next entry's prev)
            entries.append(entry)
        if head is None:
            raise LedgerError(f"privacy ledger {self.path} has {len(lines)} entries but its head record "
                              f"{self.head_path} is missing (deleted?)")
        if head.get("entries") != len(lines) or head.get("last") != (prev if lines else None):
            what = "truncated" if len(lines) < int(head.get("entries") or 0) else "edited"
            raise LedgerError(f"privacy ledger {self.path} has {len(lines)} entries, its head record "
                              f"{self.head_path} says {head.get('entries')} ({what}?)")
        return entries

    def history_for(self, patients: list[str], entries: list[dict] | None = None) -> list[tuple] | None:
        """The accountant history bounding these patients: every release whose cohort shares one of them
        (and every legacy release); None when one of those was a release without DP (unbounded)."""
        entries = self.entries() if entries is None else entries
        mine = set(patients)
        cohorts = {e["cohort"]: set(e["patients"]) for e in entries if e.get("kind") == "cohort"}
        hist: list[list] = []
        for e in entries:
            if e.get("kind") not in ("release", "legacy", UNBOUNDED):
                continue
            if e.get("kind") != "legacy" and not (cohorts.get(e.get("cohort"), set()) & mine):
                continue
            if e["kind"] == UNBOUNDED:
                return None
            for noise, q, n in e["steps"]:
                if hist and hist[-1][:2] == [noise, q]:
                    hist[-1][2] += n
                else:
                    hist.append([noise, q, n])
        return [tuple(h) for h in hist]

    def jobs(self) -> dict[str, int]:
        """job id -> DP steps recorded (for people and tests)."""
        out: dict[str, int] = {}
        for e in self.entries():
            if e.get("kind") == "release":
                out[e["job_id"]] = out.get(e["job_id"], 0) + sum(n for *_, n in e["steps"])
        return out

    # ---- writing ----------------------------------------------------------------------------------
    @contextmanager
    def locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _append(self, entries: list[dict], new: dict) -> list[dict]:
        """Append one entry (caller holds the lock and has verified ``entries``)."""
        prev = entries[-1]["_hash"] if entries else GENESIS
        line = json.dumps({"seq": len(entries), "prev": prev, **new,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, sort_keys=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.head_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.head_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"entries": len(entries) + 1, "last": _hash(line), "ledger": str(self.path)}) + "\n")
        os.replace(tmp, self.head_path)
        return entries + [{**json.loads(line), "_hash": _hash(line)}]

    def record(self, patients: list[str], steps: list[tuple] | None, *, job_id: str, round_no: int | None,
               **info) -> list[tuple] | None:
        """Append one release of these patients (``steps``: accountant history; None: without DP) under
        the lock; returns the history now bounding them (None: unbounded)."""
        with self.locked():
            entries = self.entries()
            cohort = self.cohort_of(patients)
            if not any(e.get("kind") == "cohort" and e.get("cohort") == cohort for e in entries):
                entries = self._append(entries, {"kind": "cohort", "cohort": cohort, "patients": patients})
            kind = UNBOUNDED if steps is None else "release"
            entries = self._append(entries, {"kind": kind, "cohort": cohort, "job_id": job_id, "round": round_no,
                                             "accountant": ACCOUNTANT,
                                             "steps": [list(s) for s in (steps or [])], **info})
            return self.history_for(patients, entries)

    def read(self, patients: list[str]) -> list[tuple] | None:
        """The history bounding these patients, read and verified under the lock."""
        with self.locked():
            return self.history_for(patients)

    def import_legacy(self) -> int:
        """Bring fedbrain's earlier per-datalist accountant files (``privacy/*/accountant.json``) into the
        ledger once, as releases that bound every patient (their patients are unknown); returns how many."""
        old = sorted((self.workspace / "privacy").glob("*/accountant.json"))
        if not old or self.path.is_file():
            return 0
        with self.locked():
            entries = self.entries()
            for path in old:
                data = json.loads(path.read_text())
                entries = self._append(entries, {"kind": "legacy", "source": str(path.relative_to(self.workspace)),
                                                 "steps": data.get("history", []), "accountant": data.get("accountant")})
        return len(old)


def epsilon_or_inf(history: list[tuple] | None, delta: float) -> float:
    from fedbrain.privacy.accounting import epsilon_of

    return math.inf if history is None else epsilon_of(history, delta)
