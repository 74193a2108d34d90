"""A site's privacy ledger and lifetime budget, under the hospital's control.

The accountant's history lives in the site workspace (``<workspace>/privacy/<data key>/
accountant.json``), keyed by the data (the datalist's resolved path), not by the job: it
survives rounds, site restarts and later jobs on the same patients, and every job's steps
compose into one epsilon. The budget (``dp_budget``) and ``require_dp`` come from the
hospital's ``local/fedbrain_site.json``; a job cannot change them.

Steps are written before the update they produced leaves the site: a crash in between
over-counts (safe), never under-counts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fedbrain.contracts import DP_DELTA, DP_EPSILON_SPENT, DP_NOISE_MULTIPLIER, DP_WITHHELD, DP_WITHHELD_REASONS
from fedbrain.privacy.accounting import ACCOUNTANT, epsilon_of

log = logging.getLogger("fedbrain")

#: Reason codes of the ``dp_withheld`` metric (contracts.DP_WITHHELD_REASONS).
BUDGET_EXHAUSTED, DP_REQUIRED = 1, 2
assert set(DP_WITHHELD_REASONS) == {BUDGET_EXHAUSTED, DP_REQUIRED}


@dataclass(frozen=True)
class SiteBudget:
    """The hospital's lifetime (epsilon, delta) for its data; None: no limit."""

    epsilon: float | None = None
    delta: float | None = None
    require_dp: bool = False

    @classmethod
    def from_site_json(cls, data: dict) -> "SiteBudget":
        """From ``fedbrain_site.json``'s ``"dp_budget": {"epsilon", "delta"}`` and ``"require_dp"`` (default:
        on when a budget epsilon is set, off otherwise)."""
        budget = data.get("dp_budget") or {}
        if not isinstance(budget, dict) or set(budget) - {"epsilon", "delta"}:
            raise ValueError(f'dp_budget must be {{"epsilon": <float>, "delta": <float>}}, got {budget!r}')
        eps, delta = budget.get("epsilon"), budget.get("delta")
        if eps is not None and not float(eps) > 0:
            raise ValueError(f"dp_budget epsilon must be > 0, got {eps}")
        if delta is not None and not 0 < float(delta) < 1:
            raise ValueError(f"dp_budget delta must be in (0, 1), got {delta}")
        # A budget without require_dp would leave every job without DP unbounded: with a budget set, a site
        # requires DP unless its hospital turns it off explicitly ("require_dp": false).
        require = data.get("require_dp", eps is not None)
        if not isinstance(require, bool):
            raise ValueError(f"require_dp must be true or false, got {require!r}")
        return cls(float(eps) if eps is not None else None, float(delta) if delta is not None else None, require)


class AccountantStore:
    """The RDP accountant history of one site's data, on the site's disk (one JSON file)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def for_data(cls, workspace: Path, datalist: Path) -> "AccountantStore":
        resolved = str(Path(datalist).resolve())
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(resolved).parent.name + "-" + Path(resolved).stem)[:60]
        key = f"{stem}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"
        return cls(Path(workspace) / "privacy" / key / "accountant.json")

    def load(self) -> dict:
        if not self.path.is_file():
            return {"accountant": ACCOUNTANT, "history": [], "jobs": {}}
        data = json.loads(self.path.read_text())
        if data.get("accountant") != ACCOUNTANT:
            raise ValueError(f"{self.path}: accountant {data.get('accountant')!r}, expected {ACCOUNTANT!r}")
        return data

    def history(self) -> list[tuple]:
        return [tuple(h) for h in self.load()["history"]]

    def commit(self, steps: list[tuple], *, job_id: str = "", round_no: int | None = None, **info) -> list[tuple]:
        """Append ``steps`` (an accountant history) under a file lock; returns the whole history.

        The lock and re-read make two jobs training on the same data at once both count.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.load()
            hist = [list(h) for h in data["history"]]
            for noise, q, n in steps:
                if hist and hist[-1][:2] == [noise, q]:
                    hist[-1][2] += n
                else:
                    hist.append([noise, q, n])
            data["history"] = hist
            if job_id:
                job = data["jobs"].setdefault(job_id, {"steps": 0})
                job.update(steps=job["steps"] + sum(n for *_, n in steps), last_round=round_no, **info)
            data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, self.path)
        return [tuple(h) for h in hist]

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history(), delta)


class SitePrivacy:
    """The site loop's privacy side for one job: the DP-SGD hook fed from the site's ledger,
    the check before each round, and the ledger update after it.

    Epsilon is reported at the site budget's delta when the hospital set one, else at the job's.
    """

    def __init__(self, trainer, settings, site: str):
        from fedbrain.privacy.dpsgd import DPSGD

        self.trainer, self.site, self.budget = trainer, site, settings.budget
        self.config = trainer.config
        self.dp = self.store = None
        self._told = False
        if self.config.dp:
            self.store = AccountantStore.for_data(settings.workspace or Path.cwd(), settings.datalist)
            self.dp = DPSGD.attach(trainer, history=self.store.history())
        self.delta = self.budget.delta or (self.dp.delta if self.dp else None)
        if self.budget.epsilon is not None and not self.config.dp and not self.budget.require_dp:
            log.warning("site %s: this job has no DP: its updates are not covered by the site's privacy budget "
                        "(set require_dp in local/fedbrain_site.json to refuse such jobs)", site)

    def describe(self) -> str:
        if self.dp is None:
            return "no DP-SGD"
        return (f"DP-SGD noise {self.dp.noise_multiplier:.3f}, clip {self.dp.max_grad_norm:g}, q {self.dp.sample_rate:.3f}, "
                f"delta {self.delta:.2e}; spent so far epsilon {self.spent():.3f}; budget "
                f"{self.budget.epsilon if self.budget.epsilon is not None else 'none'}; ledger {self.store.path}")

    def spent(self) -> float:
        return self.dp.epsilon(self.delta) if self.dp else 0.0

    def withhold(self) -> int:
        """0 to train this round, else the reason code (logged once per job) for withholding the update."""
        code, why = 0, ""
        steps = self.trainer.round_steps()
        if self.budget.require_dp and not self.config.dp:
            code, why = DP_REQUIRED, ("this site requires DP (require_dp in local/fedbrain_site.json) and the job "
                                      "has none: it will not train")
        elif self.dp is not None and self.dp.n_train and self.budget.epsilon is not None and \
                self.dp.epsilon(self.delta, extra_steps=steps) > self.budget.epsilon:
            code, why = BUDGET_EXHAUSTED, (
                f"privacy budget exhausted: the next round ({steps} steps) would bring epsilon from "
                f"{self.spent():.3f} to {self.dp.epsilon(self.delta, extra_steps=steps):.3f} > the site budget "
                f"{self.budget.epsilon:g} (delta {self.delta:.2e}); no more updates from this site's data")
        elif self.dp is not None and self.dp.n_train and self.dp.would_exceed_job_epsilon(steps):
            code, why = BUDGET_EXHAUSTED, (
                f"the job's dp_epsilon {self.dp.target_epsilon:g} is spent; no more updates in this job")
        if code and not self._told:
            log.error("site %s: %s; sending empty, zero-weight updates", self.site, why)
            self._told = True
        return code

    def after_round(self, job_id: str, round_no: int, withheld: int = 0) -> dict:
        """Record this round's steps in the site's ledger (before the update leaves); the round's metrics."""
        out = {DP_WITHHELD: withheld} if withheld else {}
        if self.dp is None:
            return out
        steps = self.dp.drain()
        if steps:
            self.dp.history = self.store.commit(steps, job_id=job_id, round_no=round_no,
                                                noise_multiplier=self.dp.noise_multiplier)
        return {**out, DP_EPSILON_SPENT: self.spent(), DP_DELTA: self.delta,
                DP_NOISE_MULTIPLIER: self.dp.noise_multiplier}
