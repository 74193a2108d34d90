"""FAULT INJECTION, for tests and benchmarks only: poison one named site's outgoing update (also: a site
that dies before sending, a curious server that keeps what it receives).

``PoisonUpdate(site, kind)`` is a client result filter (after the site's own privacy filters) that
rewrites the weight difference the named site sends; at any other site it passes the update
unchanged. It is not in the installed fedbrain: a test or benchmark exports a job with it
(:func:`export_with_attack`) and admits it in its own POC kits (:func:`admit_attack_filter`), and
it is visible in the exported job's config_fed_client.json. No provisioned kit can run it.

Kinds (on every float array of the update):
- ``scale``: the update times ``factor`` (default 100): a boosted / model-replacement attack;
- ``sign_flip``: the update times -1 (``factor`` ignored): pushes the model against the others;
- ``random``: Gaussian noise with the same L2 norm as the honest update (times ``factor``, default 1):
  at matching norm the norm guard cannot see it; only the robust methods can;
- ``weight``: the update unchanged, its FedAvg weight (``NUM_STEPS_CURRENT_ROUND``) times ``factor``
  (default 100): an inflated weight buys the site the model without a visible update.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedbrain.contracts import NUM_STEPS_META
from fedbrain.updates import as_numpy, is_float, update_norm

#: The repository folder holding this package: on a test POC's PYTHONPATH, so its sites can import it.
SUPPORT_ROOT = Path(__file__).resolve().parents[1]

KINDS = ("scale", "sign_flip", "random", "weight")
DEFAULT_FACTOR = {"scale": 100.0, "sign_flip": -1.0, "random": 1.0, "weight": 100.0}


def poison(data: dict, kind: str, factor: float | None = None, rng: np.random.Generator | None = None) -> dict:
    """The poisoned copy of an update (same names, shapes and types)."""
    if kind not in KINDS:
        raise ValueError(f"attack kind must be one of {KINDS}, got {kind!r}")
    factor = DEFAULT_FACTOR[kind] if factor is None else float(factor)
    if kind == "weight":
        return dict(data)
    if kind == "sign_flip":
        factor = -1.0
    if kind in ("scale", "sign_flip"):
        return {k: (v * factor if is_float(v) else v) for k, v in data.items()}
    rng = rng or np.random.default_rng(0)
    noise = {k: rng.standard_normal(tuple(as_numpy(v).shape)) for k, v in data.items() if is_float(v)}
    total = math.sqrt(sum(float(np.sum(n ** 2)) for n in noise.values())) or 1.0
    scale = factor * update_norm(data) / total
    out = {}
    for k, v in data.items():
        if k not in noise:
            out[k] = v
        elif isinstance(v, np.ndarray):
            out[k] = (noise[k] * scale).astype(v.dtype)
        else:
            import torch

            out[k] = torch.as_tensor(noise[k] * scale, dtype=v.dtype, device=v.device)
    return out


class PoisonUpdate(DXOFilter):
    """Fault injection: poison ``site``'s outgoing weight difference (see the module docstring)."""

    def __init__(self, site: str, kind: str, factor: float | None = None, seed: int = 0,
                 data_kinds_to_filter: list[str] | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS],
                         data_kinds_to_filter=data_kinds_to_filter)
        if kind not in KINDS:
            raise ValueError(f"attack kind must be one of {KINDS}, got {kind!r}")
        self.site, self.kind, self.factor, self.seed = site, kind, factor, seed
        self._rounds = 0

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if fl_ctx.get_identity_name() != self.site or not dxo.data:
            return dxo
        self._rounds += 1
        rng = np.random.default_rng([self.seed, self._rounds])
        self.log_warning(fl_ctx, f"FAULT INJECTION: {self.site} sends a poisoned update ({self.kind}"
                                 f"{'' if self.factor is None else f', factor {self.factor:g}'})")
        meta = dict(dxo.meta or {})
        if self.kind == "weight" and NUM_STEPS_META in meta:
            meta[NUM_STEPS_META] = int(meta[NUM_STEPS_META] * (self.factor or DEFAULT_FACTOR["weight"]))
        return DXO(data_kind=dxo.data_kind, data=poison(dxo.data, self.kind, self.factor, rng), meta=meta)


def check_attack(attack: dict, config, sites=None) -> None:
    if config.he:
        raise ValueError("attack: an injected poisoned update would follow the encryptor (ciphertext); "
                         "fault injection is for plaintext jobs")
    if not isinstance(attack, dict) or attack.get("kind") not in KINDS or not attack.get("site"):
        raise ValueError(f"attack must be {{'site': name, 'kind': one of {KINDS}}}, got {attack!r}")
    if sites and attack["site"] not in sites:
        raise ValueError(f"attack site {attack['site']!r} is not one of the job's sites ({', '.join(sites)})")


def export_with_attack(config, export_dir, attack: dict | None, sites=None) -> Path:
    """The task's job (``fedbrain.jobs.<task>.build_recipe``) with ``attack = {"site", "kind", "factor"?}``
    poisoning that site's updates, after its privacy filters; exported like the job itself. ``attack``
    None: the plain job (a benchmark's clean arm)."""
    from fedbrain.fl.flare_private import job_of
    from fedbrain.jobs import DEFAULT_SITES, INSTALLED_PACKAGES, SITES_DIR, classification, export_recipe, segmentation

    per_site = config.TASK == "classification"  # one app per site: the filter goes to the attacker's only
    sites = list(sites or DEFAULT_SITES) if per_site else sites
    recipe = classification.build_recipe(config, sites) if per_site else segmentation.build_recipe(config)
    if attack is None:
        return export_recipe(recipe, export_dir, config.name)
    check_attack(attack, config, sites)
    with contextlib.chdir(SITES_DIR):  # FLARE re-reads the site script's path, named relative to sites/
        recipe.add_client_output_filter(PoisonUpdate(attack["site"], attack["kind"], attack.get("factor")),
                                        tasks=["train"], clients=[attack["site"]] if per_site else None)
    # Installed at the test POC's sites (admit_attack_filter): FLARE must not copy it into the job's custom/,
    # which would make the job BYOC, refused by every fedbrain kit.
    job_of(recipe).set_app_packages([*INSTALLED_PACKAGES, __name__.split(".")[0]])
    return export_recipe(recipe, export_dir, config.name)


class CuriousServer(Filter):
    """An honest-but-curious server: it keeps what each site's ``train`` result carried as it arrived (the
    first ``keep`` values of every array), in ``curious_server/<site>_round<r>.npz`` of the job's run folder,
    so a test can look at exactly what a server could read."""

    def __init__(self, keep: int = 65536):
        super().__init__()
        self.keep = int(keep)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        from nvflare.apis.dxo import from_shareable
        from nvflare.apis.fl_constant import FLContextKey, ReservedKey
        from nvflare.app_common.app_constant import AppConstants

        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - an error reply: nothing to keep
            return shareable
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        round_no = shareable.get_header(AppConstants.CURRENT_ROUND)
        arrays = {k: as_numpy(v).ravel()[:self.keep] for k, v in (dxo.data or {}).items() if hasattr(v, "shape")}
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_prop(FLContextKey.CURRENT_RUN)))
        (run_dir / "curious_server").mkdir(exist_ok=True)
        np.savez(run_dir / "curious_server" / f"{site}_round{round_no}.npz", **arrays)
        return shareable


class CrashBeforeSend(Filter):
    """Fault injection: ``site``'s job process is killed (SIGKILL, as by the OOM killer or a lost machine) in round
    ``round_no`` after training, before its result leaves (for secure aggregation: after the key setup, before the
    masked update)."""

    def __init__(self, site: str, round_no: int):
        super().__init__()
        self.site, self.round_no = site, int(round_no)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        import os
        import signal

        from nvflare.app_common.app_constant import AppConstants

        if fl_ctx.get_identity_name() == self.site and shareable.get_header(AppConstants.CURRENT_ROUND) == self.round_no:
            self.log_warning(fl_ctx, f"FAULT INJECTION: {self.site}'s job process dies before sending round {self.round_no}")
            os.kill(os.getpid(), signal.SIGKILL)
        return shareable


class SwapSecAggKey(Filter):
    """A server that substitutes keys: in the secure-aggregation setup it puts a masking key of its own in place of
    ``site``'s (keeping that site's signature) before forwarding the advertisements (a server task data filter on
    ``secagg_share``). Every site must refuse the setup."""

    def __init__(self, site: str):
        super().__init__()
        self.site = site

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        import base64

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from nvflare.apis.dxo import from_shareable

        from fedbrain.contracts import SECAGG_MESSAGE_META

        dxo = from_shareable(shareable)
        message = json.loads(dxo.meta[SECAGG_MESSAGE_META])
        raw = X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                    serialization.PublicFormat.Raw)
        for ad in message.get("advertisements", []):
            if ad.get("site") == self.site:
                ad["s_pk"] = base64.b64encode(raw).decode()
                self.log_warning(fl_ctx, f"ATTACK: the server swapped {self.site}'s masking key")
        dxo.meta[SECAGG_MESSAGE_META] = json.dumps(message)
        return dxo.update_shareable(shareable)


#: The test-support classes a test POC admits (sites; server).
SITE_SUPPORT = (PoisonUpdate, CrashBeforeSend)
SERVER_SUPPORT = (CuriousServer, SwapSecAggKey)


def admit_attack_filter(poc) -> None:
    """Let a test or benchmark POC run the test-support classes (:class:`PoisonUpdate`, :class:`CrashBeforeSend`
    at the sites, :class:`CuriousServer`, :class:`SwapSecAggKey` at the server): their exact classes on each kit's
    class allow-list, and
    this package on the consortium's PYTHONPATH (call before the POC starts)."""
    server = next(p.name for p in poc.participants("server"))
    for name, classes in [(site, SITE_SUPPORT) for site in poc.sites] + [(server, SERVER_SUPPORT)]:
        resources = poc.kit(name) / "local" / "resources.json"
        res = json.loads(resources.read_text())
        res["class_allow_list"] = [*res.get("class_allow_list", []), *(f"{c.__module__}.{c.__name__}" for c in classes)]
        resources.write_text(json.dumps(res, indent=2))
    poc.extra_env["PYTHONPATH"] = str(SUPPORT_ROOT)
