"""How the server screens and combines a round's updates (issue 14).

- :mod:`fedbrain.aggregation.robust`: the update guard's rules and the combining methods
  (FedAvg, coordinate-wise median, trimmed mean, multi-Krum), plain numpy;
- :mod:`fedbrain.aggregation.aggregator`: :class:`GuardedAggregator`, the FLARE ``ModelAggregator``
  every plaintext FedAvg/FedProx/personal job uses (settings from the task config: ``aggregation``,
  ``trim_fraction``, ``krum_byzantine``, ``guard``, ``guard_z``, ``guard_flag_after``).

Not used by encrypted jobs (the server holds ciphertext: nothing to screen or sort) nor by SCAFFOLD
(FLARE's ScaffoldRecipe takes no aggregator): those keep FLARE's weighted sum, unguarded.
"""
