"""The server's FLARE components of secure aggregation: FedAvg with the round policy
(:class:`fedbrain.fl.resilient.ResilientFedAvg`) that runs the job's key setup before the first round and an
unmasking exchange after each round's masked updates are in, and the aggregator that adds masked vectors as
they arrive and keeps only their running sum (never one site's update).

A site that does not answer the setup is outside the masking group; a site lost after the setup and before
its masked update costs nothing (the survivors reveal what removes its masks); fewer survivors than the
threshold (a majority of the group) end the job with one line, nothing revealed.
"""

from __future__ import annotations

import json

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants

from fedbrain.aggregation.aggregator import site_metrics_average
from fedbrain.contracts import SECAGG_LAYOUT_META, SECAGG_MASKED, SECAGG_MESSAGE_META, SECAGG_WEIGHT_META
from fedbrain.fl.flare_private import client_name
from fedbrain.fl.resilient import ResilientFedAvg, RoundFailed
from fedbrain.secagg.masking import RING_DTYPE, decode, unflatten
from fedbrain.secagg.protocol import SecAggError, ServerSecAgg

#: Seconds a setup or unmasking exchange waits for the sites (each is a few small messages).
EXCHANGE_TIMEOUT = 120
SECAGG_LOG_TAG = "secure aggregation"


class SecAggSum(ModelAggregator):
    """Adds each site's masked vector into the round's sum (mod 2**32) as it arrives; after the controller has
    unmasked the sum, gives FedAvg the weighted average difference. Weights (step counts) are in the clear."""

    expected_data_kind = "WEIGHT_DIFF"

    def __init__(self):
        super().__init__()
        self.reset_stats()
        self.n_sites = 0  # the masking group's size: the fixed point's scale depends on it

    def reset_stats(self):
        self.masked_sum: np.ndarray | None = None
        self.weights: dict[str, float] = {}
        self.layout: list | None = None
        self.metrics_only: list[FLModel] = []
        self.unmasked: np.ndarray | None = None  # set by the controller once it has unmasked the round's sum

    def accept_model(self, model: FLModel):
        site = client_name(model)
        params, meta = model.params or {}, model.meta or {}
        vector = params.get(SECAGG_MASKED)
        if set(params) != {SECAGG_MASKED} or vector is None:
            raise RoundFailed(f"{SECAGG_LOG_TAG}: {site} sent {sorted(params)[:3]} instead of one masked vector: "
                              f"the job ends here")
        vector = np.asarray(vector, dtype=RING_DTYPE).ravel()
        layout = meta.get(SECAGG_LAYOUT_META)
        if self.layout is not None and (layout != self.layout or vector.size != self.masked_sum.size):
            raise RoundFailed(f"{SECAGG_LOG_TAG}: {site}'s masked update has another layout than the round's first")
        if self.masked_sum is None:
            self.layout, self.masked_sum = layout, np.zeros(vector.size, RING_DTYPE)
        self.masked_sum += vector
        self.weights[site] = float(meta.get(SECAGG_WEIGHT_META) or 0.0)
        self.metrics_only.append(FLModel(metrics=model.metrics, meta=meta))

    def aggregate_model(self) -> FLModel:
        if self.unmasked is None:
            raise RoundFailed(f"{SECAGG_LOG_TAG}: the round's sum was not unmasked")
        average = decode(self.unmasked, sum(self.weights.values()), self.n_sites)
        params = unflatten(average, self.layout)
        return FLModel(params=params, params_type=ParamsType.DIFF, metrics=site_metrics_average(self.metrics_only),
                       meta={AppConstants.METRICS_AGGREGATION_INFO: {
                           "metric_source": "client_reported_flmodel_metrics", "use_contribution_sites": True,
                           "aggregation": {"method": "secure_weighted_sum", "weight_key": SECAGG_WEIGHT_META}}})


class SecAggFedAvg(ResilientFedAvg):
    """FedAvg over pairwise-masked updates (needs :class:`SecAggSum` as its aggregator)."""

    _secagg: ServerSecAgg | None = None  # the job's masking group, once the setup completed

    def run(self) -> None:
        try:
            self._setup()
        except (SecAggError, RoundFailed) as e:
            self.error(f"{SECAGG_LOG_TAG}: setup failed: {e}")
            raise RoundFailed(f"{SECAGG_LOG_TAG}: setup failed: {e}") from None
        super().run()

    def _exchange(self, task: str, payload: dict, targets: list[str]) -> dict[str, dict]:
        """Send ``payload`` to ``targets`` as task ``task``; each answering site's reply. A site that refuses
        says why in one line, which is logged here (the job's server log, what the admin downloads)."""
        data = FLModel(metrics={}, meta={SECAGG_MESSAGE_META: json.dumps(payload)},
                       current_round=getattr(self, "current_round", None) or self.start_round)
        results = self.send_model_and_wait(task_name=task, data=data, targets=targets, timeout=EXCHANGE_TIMEOUT)
        out = {}
        for result in results:
            try:
                answer = json.loads((result.meta or {})[SECAGG_MESSAGE_META])
            except (KeyError, TypeError, ValueError):
                self.warning(f"{SECAGG_LOG_TAG}: {client_name(result)} gave no answer to {task}")
                continue
            if answer.get("error"):
                self.error(f"{SECAGG_LOG_TAG}: {answer['error']}")
                continue
            out[client_name(result)] = answer
        return out

    def _setup(self) -> None:
        sites = self.sample_clients(self.num_clients)
        secagg = ServerSecAgg(self.fl_ctx.get_job_id())
        rounds = list(range(self.start_round, self.start_round + self.num_rounds))
        ads = self._exchange("secagg_advertise", {"rounds": rounds}, sites)
        threshold = secagg.setup([a["advertisement"] for a in ads.values()])
        needed = max(threshold, self.min_responses)
        if len(ads) < needed:
            raise RoundFailed(f"only {len(ads)} of {len(sites)} sites advertised keys ({', '.join(sorted(ads)) or 'none'}),"
                              f" fewer than needed ({needed}): the job ends here")
        shared = self._exchange("secagg_share", {"advertisements": [a["advertisement"] for a in ads.values()],
                                                 "threshold": threshold}, sorted(ads))
        if len(shared) < needed:
            raise RoundFailed(f"only {len(shared)} of {len(ads)} sites shared their keys ({', '.join(sorted(shared)) or 'none'}),"
                              f" fewer than needed ({needed}): the job ends here "
                              f"(a site that refused says why above)")
        routed = secagg.route({s: a["shares"] for s, a in shared.items()})
        delivered = self._exchange("secagg_deliver", {"members": secagg.members, "shares": routed}, secagg.members)
        missing = [s for s in secagg.members if s not in delivered]
        if missing:
            raise RoundFailed(f"{missing} did not take their shares: the job ends here")
        self._secagg, self.aggregator.n_sites = secagg, len(secagg.members)
        self.info(f"{SECAGG_LOG_TAG}: masking group {secagg.members}, threshold {threshold} "
                  f"(a round needs that many of them; fewer and nothing is revealed)")

    def sample_clients(self, num_clients: int = None) -> list[str]:
        """After the setup, only the masking group is asked: a site outside it cannot mask."""
        alive = super().sample_clients(num_clients)
        members = self._secagg.members if self._secagg is not None else []
        return [s for s in alive if s in members] if members else alive

    def _get_aggregated_result(self):
        if self._publishable():  # nothing is unmasked for a round that is not published
            self._unmask()
        return super()._get_aggregated_result()

    def _unmask(self) -> None:
        senders = sorted(self._answered)
        non_senders = [m for m in self._secagg.members if m not in senders]
        answers = self._exchange("secagg_unmask", {"round": self.current_round, "senders": senders,
                                                   "non_senders": non_senders}, senders)
        try:
            unmasked = self._secagg.unmask(self.aggregator.masked_sum, self.current_round, senders,
                                           {s: a["shares"] for s, a in answers.items()})
        except SecAggError as e:
            raise RoundFailed(f"{SECAGG_LOG_TAG}: {e}") from None
        self.aggregator.unmasked = unmasked
        self.info(f"{SECAGG_LOG_TAG}: round {self.current_round}: unmasked the sum of {senders}"
                  + (f"; removed the masks of {non_senders} (no update from them)" if non_senders else ""))
