"""The server's aggregator for plaintext FedAvg jobs: update guard, then the configured combination.

A FLARE ``ModelAggregator`` given to FLARE's FedAvg controller (``FedAvgRecipe(aggregator=...,
aggregator_data_kind=DataKind.WEIGHT_DIFF)``). FedAvg calls ``accept_model`` once per site result
(in arrival order) and ``aggregate_model`` once per round, after every site answered; this
aggregator keeps the round's updates until then, because the guard's norm rule and the robust
methods need all of them at once (:mod:`fedbrain.aggregation.robust`).

What it decides is logged (one WARNING line per refused site per round: site, round, reason) and
written, one JSON line per round, to ``update_guard.jsonl`` in the server's job workspace, so the
downloaded job result carries it (``fedbrain report`` reads it). A site refused ``guard_flag_after``
rounds in a row is flagged (an ERROR line, and ``flagged`` in the record).

Every setting comes from the task config (:meth:`GuardedAggregator.from_config`).
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants

from fedbrain.aggregation.robust import Update, combine, screen
from fedbrain.updates import as_numpy
from fedbrain.contracts import GUARD_FILE, GUARD_LOG_TAG, NUM_STEPS_META

from fedbrain.tasks.config import TaskConfig

#: Prefix of the guard's log lines (``fedbrain watch`` and tests look for it).


class GuardedAggregator(ModelAggregator):
    expected_data_kind = "WEIGHT_DIFF"  # checked by FLARE's recipe against aggregator_data_kind

    # Defaults are the task config's (declared there only; the guard is on for this, the plaintext
    # FedAvg path); a job passes every value from its config.
    def __init__(self, aggregation: str = TaskConfig.aggregation, trim_fraction: float = TaskConfig.trim_fraction,
                 krum_byzantine: int = TaskConfig.krum_byzantine, guard: bool = True,
                 guard_z: float = TaskConfig.guard_z, guard_flag_after: int = TaskConfig.guard_flag_after,
                 file_name: str = GUARD_FILE):
        super().__init__()
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.krum_byzantine = krum_byzantine
        self.guard = guard
        self.guard_z = guard_z
        self.guard_flag_after = guard_flag_after
        self.file_name = file_name
        self._models: list[FLModel] = []
        self._streak: dict[str, int] = {}  # site -> rounds refused in a row
        self._warned_no_reference = False
        self.last_record: dict | None = None  # what the last round decided (the guard file's last line)

    @classmethod
    def from_config(cls, config) -> "GuardedAggregator":
        return cls(aggregation=config.aggregation, trim_fraction=config.trim_fraction,
                   krum_byzantine=config.krum_byzantine, guard=config.update_guard, guard_z=config.guard_z,
                   guard_flag_after=config.guard_flag_after)

    # ------------------------------------------------------------------ FLARE's ModelAggregator
    def reset_stats(self):
        self._models = []

    def accept_model(self, model: FLModel):
        self._models.append(model)

    def aggregate_model(self) -> FLModel:
        models, self._models = self._models, []
        round_no = self._round(models)
        updates, torch_like, refused_kind = [], False, {}
        for m in models:
            site = (m.meta or {}).get("client_name", "?")
            if m.params and m.params_type not in (ParamsType.DIFF, "DIFF"):
                refused_kind[site] = f"params_type {m.params_type}, not a weight difference"
                continue
            params = m.params or {}
            torch_like = torch_like or any(hasattr(v, "detach") for v in params.values())
            steps = (m.meta or {}).get(NUM_STEPS_META)
            steps = float(steps) if isinstance(steps, (int, float)) and not isinstance(steps, bool) else 1.0
            updates.append(Update(site, {k: as_numpy(v) for k, v in params.items()}, steps))
        reference = self._reference()
        if reference is None and self.guard and not self._warned_no_reference:
            self._warned_no_reference = True
            self.warning(f"{GUARD_LOG_TAG}: no global model in FLARE's context: names and shapes are not checked")
        decision = screen(updates, reference, self.guard_z, enabled=self.guard)
        decision.refused.update(refused_kind)
        params, details = combine(decision.accepted, self.aggregation, trim_fraction=self.trim_fraction,
                                  krum_byzantine=self.krum_byzantine)
        if torch_like:
            import torch

            params = {k: torch.from_numpy(v) for k, v in params.items()}
        self._record(round_no, decision, details)
        return FLModel(params=params, params_type=ParamsType.DIFF, metrics=site_metrics_average(models), current_round=round_no,
                       meta={AppConstants.METRICS_AGGREGATION_INFO: {
                           "metric_source": "client_reported_flmodel_metrics",
                           "use_contribution_sites": True,  # per-site metrics in round_metrics.jsonl as with FedAvg
                           "aggregation": {"method": "weighted_average", "weight_key": NUM_STEPS_META,
                                           "model_method": self.aggregation, "update_guard": self.guard}}})

    # ------------------------------------------------------------------ helpers
    def _round(self, models) -> int | None:
        if self.fl_ctx is not None:
            r = self.fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            if r is not None:
                return int(r)
        rounds = [m.current_round for m in models if m.current_round is not None]
        return rounds[0] if rounds else None

    def _reference(self) -> dict | None:
        """Name -> shape of the current global model (sticky in FLARE's context), or None if unknown."""
        if self.fl_ctx is None:
            return None
        try:
            ctx = self.fl_ctx.get_engine().new_context()
            learnable = ctx.get_prop(AppConstants.GLOBAL_MODEL) or self.fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        except Exception:  # no engine (unit tests): no reference
            learnable = None
        weights = learnable.get("weights") if isinstance(learnable, dict) else None
        if not weights:
            return None
        return {k: tuple(as_numpy(v).shape) for k, v in weights.items()}

    def _record(self, round_no, decision, details: dict) -> None:
        for site, reason in sorted(decision.refused.items()):
            self.warning(f"{GUARD_LOG_TAG}: round {round_no}: refused {site}: {reason}")
        seen = {u.site for u in decision.accepted} | set(decision.refused) | set(decision.idle)
        flagged = []
        for site in sorted(seen):
            self._streak[site] = self._streak.get(site, 0) + 1 if site in decision.refused else 0
            if self._streak[site] >= self.guard_flag_after:
                flagged.append(site)
                self.error(f"{GUARD_LOG_TAG}: {site} flagged: refused in {self._streak[site]} consecutive rounds "
                           f"(guard_flag_after {self.guard_flag_after})")
        self.info(f"{GUARD_LOG_TAG}: round {round_no}: {self.aggregation} over "
                  f"{sorted(u.site for u in decision.accepted)}; refused {sorted(decision.refused) or 'none'}"
                  + (f"; no trained update from {sorted(decision.idle)}" if decision.idle else ""))
        entry = {"round": round_no, "method": self.aggregation, "guard": self.guard, "guard_z": self.guard_z,
                 "accepted": sorted(u.site for u in decision.accepted), "refused": decision.refused,
                 "idle": sorted(decision.idle), "norms": {s: (round(n, 6) if n == n else None) for s, n in decision.norms.items()},
                 "z": {s: round(z, 3) for s, z in decision.z.items()},
                 "streak": {s: self._streak[s] for s in sorted(seen)}, "flagged": flagged, **details}
        self.last_record = entry
        path = self._run_dir()
        if path is not None:
            with open(path / self.file_name, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _run_dir(self) -> Path | None:
        if self.fl_ctx is None:
            return None
        try:
            engine = self.fl_ctx.get_engine()
            return Path(engine.get_workspace().get_run_dir(self.fl_ctx.get_prop(FLContextKey.CURRENT_RUN)))
        except Exception:
            return None


def site_metrics_average(models: list[FLModel]) -> dict | None:
    """The round's site metrics, weighted as FLARE's FedAvg weighs them (its own helper)."""
    from nvflare.app_common.workflows.base_fedavg import _aggregate_fl_model_metrics

    try:
        return _aggregate_fl_model_metrics([m for m in models if m.metrics is not None]) or None
    except Exception:
        return None
