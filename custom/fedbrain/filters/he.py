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

TenSEAL works on one core per operation and prints a warning to stdout (from C++) for every
vector longer than one ciphertext (4096 slots here), i.e. for most layers every round. The
encryptor encrypts layers in a process pool sized by the site's ``num_threads`` (at most 4)
and keeps TenSEAL's warning out of the site's console (``ckks.tenseal_quiet``). Measured on
2 cores, a pool of 2 is no faster (0.96x: shipping ciphertexts back costs what the second core
saves), so sites with ``num_threads`` 1 (the POC) stay serial. Decryption is left serial: it is
cheap (about 0.1 s per million values).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from nvflare.apis.dxo import MetaKey
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor

from fedbrain.contracts import HE_AGGREGATION_FILE, NUM_STEPS_META
from fedbrain.filters.ckks import encrypt_serialized, init_worker, tenseal_quiet
from fedbrain.fl.housekeeping import collect_round_garbage
from fedbrain.fl.progress import ProgressStats
from fedbrain.fl.timing import record_exchange_time

ENCRYPT_SECONDS = "he_encrypt_seconds"
DECRYPT_SECONDS = "he_decrypt_seconds"


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
    """FLARE's encryptor, timed, quiet, and parallel over layers when the site allows threads."""

    def __init__(self, workers: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.workers = workers  # None: the site's num_threads (local/fedbrain_site.json), else 1
        self._pool = None
        self._pool_workers = None  # resolved once per run

    def _process(self, dxo, fl_ctx):
        start = time.perf_counter()
        out = super()._process(dxo, fl_ctx)
        out.set_meta_prop(ENCRYPT_SECONDS, time.perf_counter() - start)
        return out

    def _pool_size(self, fl_ctx) -> int:
        if self.workers is not None:
            return max(1, int(self.workers))
        try:
            from fedbrain.fl.site import resolve_site_settings

            site = fl_ctx.get_identity_name() if fl_ctx is not None else "?"
            # Each worker holds TenSEAL and a copy of the context: at most 4, whatever the training threads.
            return max(1, min(4, int(resolve_site_settings(site).num_threads or 1)))
        except Exception:  # noqa: BLE001 - no site settings (tests, odd layouts): stay serial
            return 1

    def encryption(self, params, fl_ctx):
        if self._pool_workers is None:
            self._pool_workers = self._pool_size(fl_ctx)
        workers = self._pool_workers
        with tenseal_quiet():
            if workers <= 1 or self.encrypt_layers != [True]:
                return super().encryption(params, fl_ctx)
            return self._encrypt_in_pool(params, workers)

    def _encrypt_in_pool(self, params: dict, workers: int):
        """Every layer encrypted whole (as FLARE's encryptor does), layers spread over processes."""
        import tenseal as ts

        if self._pool is None:
            # FLARE's kits hold a symmetric CKKS context: encrypting needs the secret key, so the
            # worker processes (on this machine, children of this site's job) get the whole context.
            context = self.tenseal_context.serialize(save_secret_key=True)
            self._pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker,
                                             initargs=(context,))
        scale = np.float64(self.aggregation_weight or 1.0) * np.float64(self.n_iter if self.weigh_by_local_iter else 1.0)
        names = list(params)
        values = [np.asarray(params[n], dtype=np.float64).ravel() * scale for n in names]
        blobs = list(self._pool.map(encrypt_serialized, values))
        encrypted = {n: ts.ckks_vector_from(self.tenseal_context, b) for n, b in zip(names, blobs)}
        return encrypted, dict.fromkeys(names, True)

    def handle_event(self, event_type, fl_ctx):
        super().handle_event(event_type, fl_ctx)
        from nvflare.apis.event_type import EventType

        if event_type == EventType.END_RUN and self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if event_type == EventType.END_RUN:
            self._pool_workers = None


class TimedHEAggregator(ProgressStats, HEInTimeAccumulateWeightedAggregator):
    """FLARE's encrypted sum, timed and recorded per round; it also holds the round policy's minimum:
    FLARE's ScatterAndGather aggregates whatever arrived once ``train_timeout`` passes, even fewer
    updates than its ``min_clients``, so a round with fewer than ``min_responses`` ends the job here."""

    def __init__(self, min_responses: int = 1, min_trained_sites: int = 3, **kwargs):
        super().__init__(**kwargs)
        if int(min_trained_sites) < 2:
            raise ValueError(f"min_trained_sites must be >= 2, got {min_trained_sites}")
        self.min_responses = int(min_responses)
        self.min_trained_sites = int(min_trained_sites)
        self._accept_seconds = 0.0
        self._accepted = 0
        self._trained = 0

    def accept(self, shareable, fl_ctx):
        from nvflare.apis.dxo import from_shareable

        start = time.perf_counter()
        ok = super().accept(shareable, fl_ctx)
        self._accept_seconds += time.perf_counter() - start
        self._accepted += int(bool(ok))
        if ok:
            try:  # the step count rides in the update's plaintext meta
                self._trained += int(float(from_shareable(shareable).get_meta_prop(NUM_STEPS_META) or 0) > 0)
            except (ValueError, TypeError):
                pass
        return ok

    def aggregate(self, fl_ctx):
        start = time.perf_counter()
        accepted, trained, round_no = self._accepted, self._trained, fl_ctx.get_prop("current_round")
        self._trained = 0
        if accepted < self.min_responses:
            self._accept_seconds, self._accepted = 0.0, 0
            self.system_panic(f"round {round_no}: {accepted} encrypted update(s) arrived before the round closed, "
                              f"fewer than min_responses {self.min_responses}: the job ends here", fl_ctx)
            return None
        if trained < self.min_trained_sites:  # the encrypted sum cannot be left out of the model: the job ends
            self._accept_seconds, self._accepted = 0.0, 0
            self.system_panic(f"round {round_no} not published: {trained} trained site(s), fewer than "
                              f"min_trained_sites {self.min_trained_sites}: the job ends here", fl_ctx)
            return None
        out = super().aggregate(fl_ctx)
        entry = {"round": round_no, "updates": accepted, "trained": trained, "min_responses": self.min_responses,
                 "add_seconds": self._accept_seconds, "mean_seconds": time.perf_counter() - start}
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_prop(FLContextKey.CURRENT_RUN))
        with open(Path(run_dir) / HE_AGGREGATION_FILE, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self._accept_seconds, self._accepted = 0.0, 0
        collect_round_garbage()  # fedbrain.fl.housekeeping
        return out
