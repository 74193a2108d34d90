"""Client-level DP (DP-FedAvg) on what leaves a site: FLARE result filters.

``UpdateNormClip(max_norm)`` scales an outgoing update so its L2 norm (over all its float
tensors) is at most ``max_norm``: it bounds any one site's influence on the global model.
``ClientLevelDP(clip_norm, noise_multiplier)`` clips the same way, then adds Gaussian noise
of std ``noise_multiplier * clip_norm`` to every value (under secure aggregation with threshold t, 1/sqrt(t) of it:
the server only ever sees the masked sum of at least t updates, which carries the whole noise; such an update may
leave the site only masked), and keeps an RDP account of the job
(sampling rate 1, one release per round): the epsilon it has bought so far rides in the
update's meta (``client_dp_epsilon``) and in the site's log.

With ``part`` (the job's trained part from a public start: name patterns) both act on that part only (the
norm, the clip, the noise) and send every other difference as exactly 0, whatever the training did.

Both act on plaintext: a site's privacy.json scope runs before the job's filters, and a job
must place them before an HE encryptor (after ExcludeVars, so a personal head is neither
counted nor noised). Noise comes from the OS's random source, never from the job's seed.
"""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedbrain.contracts import CLIENT_DP_EPSILON_META
from fedbrain.privacy.accounting import epsilon_of
from fedbrain.privacy.releases import CLIENT_DP, CLIENT_DP_SHARED, record_release
from fedbrain.updates import is_float, names_in_part, update_norm

KINDS = [DataKind.WEIGHT_DIFF, DataKind.WEIGHTS]


def clip_update(data: dict, max_norm: float) -> tuple[dict, float]:
    """The update scaled to L2 norm <= ``max_norm`` (new dict, same types); and its norm before."""
    norm = update_norm(data)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    if factor == 1.0:
        return dict(data), norm
    return {k: (v * factor if is_float(v) else v) for k, v in data.items()}, norm


def only_part(data: dict, part: list[str] | None) -> dict:
    """The update with every float entry outside ``part`` (name patterns; None: all) set to exactly 0.

    A public start's frozen rest does not change, so its difference is 0 anyway; sending 0 whatever the
    training did keeps anything a job might have changed there from leaving the site unnoised."""
    if part is None:
        return dict(data)
    keep = set(names_in_part(data, part))
    if not keep:
        raise ValueError(f"the trained part {part} names no entry of this update")
    return {k: (v if k in keep or not is_float(v) else _zeros(v)) for k, v in data.items()}


def _zeros(v):
    """Zeros like ``v`` (numpy or torch): not ``v * 0``, which keeps a NaN."""
    return np.zeros_like(v) if isinstance(v, np.ndarray) else v.new_zeros(v.shape)


def add_gaussian_noise(data: dict, std: float, rng: np.random.Generator, part: list[str] | None = None) -> dict:
    """Every float value (of ``part``'s entries when given) plus N(0, std^2), in its own dtype and type."""
    out = {}
    keep = set(names_in_part(data, part))
    for k, v in data.items():
        if not is_float(v) or k not in keep:
            out[k] = v
            continue
        noise = rng.normal(0.0, std, size=tuple(v.shape))
        if isinstance(v, np.ndarray):
            out[k] = (v + noise).astype(v.dtype)
        else:
            import torch

            out[k] = v + torch.as_tensor(noise, dtype=v.dtype, device=v.device)
    return out


class UpdateNormClip(DXOFilter):
    """Clip each outgoing update (WEIGHT_DIFF; WEIGHTS are clipped as a whole) to L2 norm ``max_norm``."""

    def __init__(self, max_norm: float, part: list[str] | None = None, data_kinds_to_filter: list[str] | None = None):
        super().__init__(supported_data_kinds=KINDS, data_kinds_to_filter=data_kinds_to_filter)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)
        self.part = list(part) if part else None

    def _clip(self, dxo: DXO, fl_ctx: FLContext) -> dict:
        if dxo.data_kind == DataKind.WEIGHTS:
            if self.part:
                raise ValueError("client-level DP on a part needs weight differences (params_transfer_type DIFF), "
                                 "got full WEIGHTS: the frozen rest cannot be sent as 0")
            self.log_warning(fl_ctx, "clipping full WEIGHTS, not a difference: send weight differences "
                                     "(params_transfer_type DIFF) for a meaningful bound")
        data, norm = clip_update(only_part(dxo.data, self.part), self.max_norm)
        # The norm itself describes the local data: it stays in the site's own log.
        self.log_debug(fl_ctx, f"update L2 norm {norm:.4g}, clipped to {min(norm, self.max_norm):.4g}")
        return data

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        return DXO(data_kind=dxo.data_kind, data=self._clip(dxo, fl_ctx), meta=dxo.meta)


class ClientLevelDP(UpdateNormClip):
    """Clip to ``clip_norm``, add N(0, (noise_multiplier * clip_norm)^2), account per job.

    The epsilon is for adding or removing this site's whole contribution in a round (sensitivity
    ``clip_norm``) at ``delta``; replacing one update by another arbitrary one doubles the
    sensitivity (the same noise is then worth ``noise_multiplier / 2``).
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float = 1e-5,
                 part: list[str] | None = None, data_kinds_to_filter: list[str] | None = None):
        super().__init__(max_norm=clip_norm, part=part, data_kinds_to_filter=data_kinds_to_filter)
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0 (use UpdateNormClip to only clip), got {noise_multiplier}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier, self.delta = float(noise_multiplier), float(delta)
        self.clip_norm = self.max_norm  # FLARE's job export reads each init argument back by its name
        self.releases = 0
        self._rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.max_norm

    def epsilon(self) -> float:
        """Epsilon bought by this job's releases so far (RDP, sampling rate 1)."""
        return epsilon_of([(self.noise_multiplier, 1.0, self.releases)] if self.releases else [], self.delta)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        from fedbrain.secagg.site import noise_share

        share = noise_share(fl_ctx.get_job_id())  # t under secure aggregation: the sum of >= t carries the noise
        std = self.std / share ** 0.5
        data = add_gaussian_noise(self._clip(dxo, fl_ctx), std, self._rng, self.part)
        self.releases += 1
        eps = self.epsilon()
        self.log_info(fl_ctx, f"client-level DP: release {self.releases}, clip {self.max_norm:g}, noise std {std:g}"
                              + (f" on the trained part {self.part} (the rest sent as 0)" if self.part else "")
                              + (f" (1/sqrt({share}) of {self.std:g}: the masked sum of at least {share} sites carries "
                                 f"the whole noise)" if share > 1 else "")
                              + f": epsilon {eps:.3f} at delta {self.delta:g} for this job")
        out = DXO(data_kind=dxo.data_kind, data=data, meta=dxo.meta)
        out.set_meta_prop(CLIENT_DP_EPSILON_META, eps)
        # what the site's final check will expect; a share of the noise may only leave masked
        record_release(fl_ctx.get_prop(FLContextKey.TASK_ID), data, kind=CLIENT_DP_SHARED if share > 1 else CLIENT_DP)
        return out


def client_dp_filters(config) -> list:
    """The result filters a job places at each site for its config (empty when off), on
    plaintext: after ExcludeVars, before any encryptor."""
    if config.client_dp_clip is None:
        return []
    part = list(config.part_patterns) if config.part_patterns else None
    if config.client_dp_noise > 0:
        return [ClientLevelDP(clip_norm=config.client_dp_clip, noise_multiplier=config.client_dp_noise, part=part)]
    return [UpdateNormClip(max_norm=config.client_dp_clip, part=part)]
