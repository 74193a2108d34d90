"""fedbrain's thin layer over FLARE's HE filters: timing, and decryption that leaves a site's
personal part alone.

* :class:`SharedPartDecryptor`: FLARE's HEModelDecryptor expects every parameter of the global
  model in the aggregate's encrypted-layer map. With personal heads excluded from every update,
  the aggregate (and so the map) holds only the shared parameters, while the global model still
  carries its initial plaintext head: the stock decryptor then fails on the first head name.
  Parameters missing from the map are plaintext by construction, so they are marked so.
* :class:`TimedEncryptor` puts its encryption time into the update's (unencrypted) meta, where
  the server's audit records it; the decryptor leaves its time for the site loop to report.
* :class:`TimedHEAggregator` records the server's time to add ciphertexts, per round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nvflare.apis.dxo import MetaKey
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor

from fedbrain.filters.timing import record_exchange_time

ENCRYPT_SECONDS = "he_encrypt_seconds"
DECRYPT_SECONDS = "he_decrypt_seconds"
AGGREGATION_FILE = "he_aggregation.jsonl"


class SharedPartDecryptor(HEModelDecryptor):
    def process_dxo(self, dxo, shareable, fl_ctx):
        encrypted = dxo.get_meta_prop(MetaKey.PROCESSED_KEYS, None)
        if encrypted and isinstance(dxo.data, dict):
            dxo.set_meta_prop(MetaKey.PROCESSED_KEYS, {**dict.fromkeys(dxo.data, False), **encrypted})
        start = time.perf_counter()
        out = super().process_dxo(dxo, shareable, fl_ctx)
        if encrypted:
            record_exchange_time(DECRYPT_SECONDS, time.perf_counter() - start)
        return out


class TimedEncryptor(HEModelEncryptor):
    def _process(self, dxo, fl_ctx):
        start = time.perf_counter()
        out = super()._process(dxo, fl_ctx)
        out.set_meta_prop(ENCRYPT_SECONDS, time.perf_counter() - start)
        return out


class TimedHEAggregator(HEInTimeAccumulateWeightedAggregator):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._accept_seconds = 0.0
        self._accepted = 0

    def accept(self, shareable, fl_ctx):
        start = time.perf_counter()
        ok = super().accept(shareable, fl_ctx)
        self._accept_seconds += time.perf_counter() - start
        self._accepted += int(bool(ok))
        return ok

    def aggregate(self, fl_ctx):
        start = time.perf_counter()
        out = super().aggregate(fl_ctx)
        entry = {"round": fl_ctx.get_prop("current_round"), "updates": self._accepted,
                 "add_seconds": self._accept_seconds, "mean_seconds": time.perf_counter() - start}
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_prop(FLContextKey.CURRENT_RUN))
        with open(Path(run_dir) / AGGREGATION_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self._accept_seconds, self._accepted = 0.0, 0
        return out
