"""A site's lifetime privacy budget, under the hospital's control, and the site loop's privacy side.

What the site's patients have spent lives in the site's tamper-evident ledger
(:mod:`fedbrain.privacy.ledger`, keyed by the patients, not by a datalist's path or a job): it
survives rounds, site restarts and later jobs on the same patients, and every job's steps
compose into one epsilon. The budget (``dp_budget``) and ``require_dp`` come from the
hospital's ``local/fedbrain_site.json``; a job cannot change them.

Steps are written before the update they produced leaves the site: a crash in between
over-counts (safe), never under-counts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from fedbrain.contracts import DP_DELTA, DP_EPSILON_SPENT, DP_NOISE_MULTIPLIER, DP_WITHHELD, DP_WITHHELD_REASONS
from fedbrain.privacy.ledger import LedgerError, PrivacyLedger, epsilon_or_inf

log = logging.getLogger("fedbrain")

#: Reason codes of the ``dp_withheld`` metric (contracts.DP_WITHHELD_REASONS).
BUDGET_EXHAUSTED, DP_REQUIRED, LEDGER_BROKEN, TOO_FEW_TRAINED = 1, 2, 3, 4
assert set(DP_WITHHELD_REASONS) == {BUDGET_EXHAUSTED, DP_REQUIRED, LEDGER_BROKEN, TOO_FEW_TRAINED}


@dataclass(frozen=True)
class SiteBudget:
    """The hospital's lifetime (epsilon, delta) for its data; None: no limit."""

    epsilon: float | None = None
    delta: float | None = None
    require_dp: bool = False
    #: The fewest trained sites a global model may come from for this site to train on it (>= 2).
    min_trained_sites: int = 2
    #: Below this many validation cases, no per-site validation metric leaves the site (one patient's Dice is
    #: that patient's); the site's own log keeps them.
    min_validation_cases: int = 5
    #: Which metrics leave: "all" (within the rules above) or "minimal" (only what the federation needs to run:
    #: site_error, train_steps, dp_withheld and the site's privacy accounting).
    share_metrics: str = "all"

    def shared_metrics(self, metrics: dict, *, n_val: int, dp_sgd: bool) -> dict:
        """What of ``metrics`` leaves the site. Under DP-SGD the training loss never does: it is computed on the
        training patients without noise (a membership signal) and is not part of the DP release."""
        from fedbrain.contracts import DP_DELTA, DP_EPSILON_SPENT, DP_EPSILON_UNBOUNDED, DP_NOISE_MULTIPLIER, \
            DP_WITHHELD, SITE_ERROR, TRAIN_LOSS, TRAIN_STEPS, epsilon_to_wire

        metrics = epsilon_to_wire(metrics)  # FLARE drops non-finite numbers on the way
        if self.share_metrics == "minimal":
            keep = (SITE_ERROR, TRAIN_STEPS, DP_WITHHELD, DP_EPSILON_SPENT, DP_EPSILON_UNBOUNDED, DP_DELTA,
                    DP_NOISE_MULTIPLIER)
            return {k: v for k, v in metrics.items() if k in keep}
        out = metrics
        if dp_sgd:
            out.pop(TRAIN_LOSS, None)
        if n_val < self.min_validation_cases:
            out = {k: v for k, v in out.items() if not k.startswith("val_")}
        return out

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
        fewest = data.get("min_trained_sites", 2)
        if isinstance(fewest, bool) or not isinstance(fewest, int) or fewest < 2:
            raise ValueError(f"min_trained_sites must be an integer >= 2, got {fewest!r}")
        min_val = data.get("min_validation_cases", 5)
        if isinstance(min_val, bool) or not isinstance(min_val, int) or min_val < 1:
            raise ValueError(f"min_validation_cases must be an integer >= 1, got {min_val!r}")
        share = data.get("share_metrics", "all")
        if share not in ("all", "minimal"):
            raise ValueError(f'share_metrics must be "all" or "minimal", got {share!r}')
        return cls(float(eps) if eps is not None else None, float(delta) if delta is not None else None, require,
                   fewest, min_val, share)


class SitePrivacy:
    """The site loop's privacy side for one job: the DP-SGD hook fed from the site's ledger,
    the check before each round (the ledger re-read under its lock), and the ledger update after it.

    The ledger is used when the job has DP or the hospital set a budget. Epsilon is reported at the
    site budget's delta when the hospital set one, else at the job's; infinite once these patients
    were released without DP.
    """

    def __init__(self, trainer, settings, site: str):
        from fedbrain.privacy.dpsgd import DPSGD

        self.trainer, self.site, self.budget = trainer, site, settings.budget
        self.config = trainer.config
        self.dp = self.ledger = None
        self.patients: list[str] = []
        self.history: list[tuple] | None = []
        self.ledger_error = ""
        self._told = False
        if self.config.dp or self.budget.epsilon is not None:
            self.ledger = PrivacyLedger(settings.workspace or Path.cwd())
            try:
                self.ledger.import_legacy()
                self.patients = self.ledger.patients(trainer.training_case_ids())
                self.history = self.ledger.read(self.patients)
            except (LedgerError, OSError, ValueError) as e:
                self.ledger_error = str(e)
        if self.config.dp:
            self.dp = DPSGD.attach(trainer, history=self.history or ())
        self.delta = self.budget.delta or (self.dp.delta if self.dp else None)
        if self.budget.epsilon is not None and not self.config.dp and not self.budget.require_dp:
            log.warning("site %s: this job has no DP: its updates are recorded in the site's privacy ledger as "
                        "unbounded (epsilon infinite from now on for these patients); set require_dp in "
                        "local/fedbrain_site.json to refuse such jobs", site)

    def describe(self) -> str:
        if self.dp is None:
            return "no DP-SGD"
        start = f", from the public start {self.config.start_model[:19]}..." if self.config.start_model else ""
        return (f"DP-SGD on part '{self.config.trained_part}'{start}: "
                f"noise {self.dp.noise_multiplier:.3f}, clip {self.dp.max_grad_norm:g}, q {self.dp.sample_rate:.3f}, "
                f"delta {self.delta:.2e}; spent so far epsilon {self.spent():.3f}; budget "
                f"{self.budget.epsilon if self.budget.epsilon is not None else 'none'}; ledger {self.ledger.path}")

    def spent(self, extra_steps: int = 0) -> float:
        if self.history is None:
            return math.inf
        if self.dp is None:
            return epsilon_or_inf(self.history, self.delta) if self.history and self.delta else 0.0
        return self.dp.epsilon(self.delta, extra_steps=extra_steps)

    def _reread(self) -> None:
        """What every job has spent on these patients, from the ledger under its lock (concurrent jobs)."""
        if self.ledger is None or self.ledger_error:
            return
        try:
            self.history = self.ledger.read(self.patients)
        except (LedgerError, OSError, ValueError) as e:
            self.ledger_error = str(e)
            return
        if self.dp is not None:
            self.dp.history = list(self.history or [])

    def withhold(self, trained_sites: int | None = None) -> int:
        """0 to train this round, else the reason code (logged once per job) for withholding the update.

        ``trained_sites``: how many sites trained the global model just received (None: the initial model)."""
        code, why = 0, ""
        steps = self.trainer.round_steps()
        self._reread()
        if trained_sites is not None and trained_sites < self.budget.min_trained_sites:
            code, why = TOO_FEW_TRAINED, (
                f"the global model comes from {trained_sites} trained site(s), fewer than this site's minimum "
                f"{self.budget.min_trained_sites} (min_trained_sites in local/fedbrain_site.json): it will not train "
                f"on it or release an update")
        elif self.ledger_error:
            code, why = LEDGER_BROKEN, f"{self.ledger_error}: no job may use this site's privacy budget until it is restored"
        elif self.budget.require_dp and not self.config.dp:
            code, why = DP_REQUIRED, ("this site requires DP (require_dp in local/fedbrain_site.json) and the job "
                                      "has none: it will not train")
        elif self.budget.epsilon is not None and self.history is None:
            code, why = BUDGET_EXHAUSTED, ("privacy budget exhausted: these patients were released without DP "
                                           "before (epsilon infinite in the site's ledger)")
        elif self.dp is not None and self.dp.n_train and self.budget.epsilon is not None and \
                self.spent(steps) > self.budget.epsilon:
            code, why = BUDGET_EXHAUSTED, (
                f"privacy budget exhausted: the next round ({steps} steps) would bring epsilon from "
                f"{self.spent():.3f} to {self.spent(steps):.3f} > the site budget "
                f"{self.budget.epsilon:g} (delta {self.delta:.2e}); no more updates from this site's data")
        elif self.dp is not None and self.dp.n_train and self.dp.would_exceed_job_epsilon(steps):
            code, why = BUDGET_EXHAUSTED, (
                f"the job's dp_epsilon {self.dp.target_epsilon:g} is spent; no more updates in this job")
        if code and not self._told:
            log.error("site %s: %s; sending empty, zero-weight updates", self.site, why)
            self._told = True
        return code

    def after_round(self, job_id: str, round_no: int, withheld: int = 0) -> dict:
        """Record this round's release in the site's ledger (before the update leaves); the round's metrics."""
        out = {DP_WITHHELD: withheld} if withheld else {}
        if self.ledger is None or self.ledger_error:
            return out
        if self.dp is None:
            if not withheld and self.trainer.round_steps():  # a budgeted site released without DP
                self.history = self.ledger.record(self.patients, None, job_id=job_id, round_no=round_no)
            return {**out, DP_EPSILON_SPENT: self.spent()} if self.budget.epsilon is not None else out
        steps = self.dp.drain()
        if steps:
            self.history = self.ledger.record(self.patients, steps, job_id=job_id, round_no=round_no,
                                              noise_multiplier=self.dp.noise_multiplier)
            self.dp.history = list(self.history or [])
        return {**out, DP_EPSILON_SPENT: self.spent(), DP_DELTA: self.delta,
                DP_NOISE_MULTIPLIER: self.dp.noise_multiplier}
