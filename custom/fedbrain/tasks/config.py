"""The base of every task config: one dataclass per task is the only place a setting and
its default live. job.py, the site script, the CLI, the demo and the benchmarks all read it.

It travels to sites whole, as one JSON command-line argument of the site script
(:meth:`TaskConfig.to_argument`), and the site rebuilds exactly the same object
(:meth:`TaskConfig.from_json`): no setting is re-declared as a flag on either side.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar


def three(v) -> tuple:
    """A per-axis triple from one value or a triple (``--spacing 2`` means 2 mm on every axis)."""
    if isinstance(v, Sequence) and not isinstance(v, str):
        v = tuple(v)
        return v * 3 if len(v) == 1 else v
    return (v, v, v)


@dataclass
class TaskConfig:
    """Settings every task has: federation, optimisation, compute. Plain values (JSON round trip)."""

    #: The task's name: a site's ``datalists`` entry for it (local/fedbrain_site.json) and the CLI's task.
    TASK: ClassVar[str] = ""
    #: The algorithms this task's job can build (subclasses narrow or widen it).
    ALGORITHMS: ClassVar[tuple[str, ...]] = ("fedavg", "fedprox")
    #: How the server combines a round's updates (``aggregation``).
    AGGREGATIONS: ClassVar[tuple[str, ...]] = ("fedavg", "median", "trimmed_mean", "krum")
    #: Names of the fields holding tuples (JSON gives lists back).
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ()
    #: What each setting belongs to (a field not named here is a training setting): the command
    #: line offers a command only the groups that apply to it.
    FIELD_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "federation": ("name", "algorithm", "rounds", "min_clients", "epochs_per_round", "fedprox_mu",
                       "aggregation", "trim_fraction", "krum_byzantine", "guard", "guard_z", "guard_flag_after"),
        "privacy": ("he", "secagg", "dp_epsilon", "dp_noise_multiplier", "dp_max_grad_norm", "dp_delta", "dp_part",
                    "client_dp_clip", "client_dp_noise", "min_trained_sites"),
        "resilience": ("round_timeout", "min_responses", "dead_site_grace"),
    }
    #: Whether DP-SGD from a public start clips at the start's public clip (fedbrain.privacy.clip) by default:
    #: chosen per task by measurement (docs/benchmarks.md).
    PUBLIC_CLIP: ClassVar[bool] = True
    #: Privacy settings that also apply to centralized training (sample-level DP-SGD).
    CENTRAL_PRIVACY: ClassVar[tuple[str, ...]] = ("dp_epsilon", "dp_noise_multiplier", "dp_max_grad_norm", "dp_delta",
                                                  "dp_part")
    #: What may train under DP-SGD (``dp_part``): name -> regular expressions searched in parameter
    #: names (state_dict keys); the rest stays as the starting model. ``all``: every parameter.
    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {"all": (".",)}
    #: The part a public-start DP job trains (chosen by measurement: docs/benchmarks.md).
    DP_PART_DEFAULT: ClassVar[str] = "all"

    name: str = "fedbrain"  # the FLARE job name; also names a site's personal-part store
    algorithm: str = "fedavg"
    rounds: int = 6
    min_clients: int = 3
    epochs_per_round: int = 1
    max_steps: int | None = None  # caps steps of a train() call given in epochs
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    fedprox_mu: float = 0.01  # proximal weight, used when algorithm == "fedprox"
    seed: int = 0  # initial weights (init_seed), data order and augmentation
    num_threads: int | None = None  # torch.set_num_threads; a site's local settings may override
    num_workers: int = 0  # data loading workers; 0 is best when sites share a few cores
    device: str = "auto"  # "auto" -> cuda when available, else cpu; a site may override
    amp: bool = True  # mixed precision, only ever used on cuda
    he: bool = False  # CKKS-encrypted updates: the server sums what it cannot read (needs an HE-provisioned kit)
    secagg: bool = False  # pairwise-masked updates (fedbrain.secagg): the server unmasks the round's sum only
    # Sample-level DP-SGD (fedbrain.privacy.dpsgd): on when dp_epsilon or dp_noise_multiplier is set.
    dp_epsilon: float | None = None  # this job's epsilon: noise calibrated to spend it over rounds x epochs; a cap
    dp_noise_multiplier: float | None = None  # fixed noise instead of calibrating to dp_epsilon
    # Per-sample gradient clip (L2). None: the clip the public start chose for the trained part on public data
    # (fedbrain.privacy.clip; an exported job carries the number), else 1.0.
    dp_max_grad_norm: float | None = None
    dp_delta: float | None = None  # None: min(1e-5, 1 / n_train^1.1) of each site
    # What trains under DP-SGD or client-level DP (a name of the task's PARTS); the rest stays frozen at the
    # starting model, so only the part gets per-sample gradients, clipping and noise (client-level DP sends
    # the rest as 0). Meant with start_model: a frozen random network learns nothing. Without DP all trains.
    dp_part: str | None = None  # None: the task's DP_PART_DEFAULT with a start_model, else all
    # A starting model written by `fedbrain pretrain` (its start.pt; start.json beside it): the server's
    # initial global model, built DP-ready; its provenance reaches the job's result and report. The exported
    # job carries the file, and its config names it by its hash (sha256:...), never by a path.
    start_model: str | None = None
    dp_ready: bool = False  # build the network DP-SGD can train even without DP (what `fedbrain pretrain` writes)
    # Client-level DP (fedbrain.privacy.client_dp): each site clips its whole update, adds Gaussian noise.
    client_dp_clip: float | None = None  # L2 bound of an outgoing update; None: off
    client_dp_noise: float = 0.0  # noise std = client_dp_noise * client_dp_clip; 0: clip only
    # No aggregate of fewer trained sites (an aggregate of one is that site's update, for every other site to read):
    # a round with fewer is not published (FedAvg: the global model stays; SCAFFOLD, he: the job ends). >= 2.
    min_trained_sites: int = 3
    # Server side (fedbrain.aggregation): how the round's updates are screened, then combined.
    aggregation: str = "fedavg"  # fedavg | median | trimmed_mean | krum (coordinate-wise / Krum, on weight differences)
    trim_fraction: float = 0.2  # trimmed_mean: share of sites cut at each end of every coordinate
    krum_byzantine: int = 1  # krum: sites assumed faulty (f); multi-Krum averages the n - f best-scored updates
    # Update guard: refuse NaN/Inf, unknown names or shapes, and norm outliers. None: on wherever the server can read
    # the updates (plaintext FedAvg), off for he (ciphertext) and SCAFFOLD (FLARE's workflow takes no custom aggregator);
    # True on those paths is refused rather than silently dropped.
    guard: bool | None = None
    guard_z: float = 3.5  # robust z-score (median/MAD over the round) of an update norm above which it is refused
    guard_flag_after: int = 3  # a site refused this many rounds in a row is flagged (log line, report)
    # Fault tolerance (fedbrain.fl / jobs): settings of the round's waiting policy live here.
    # (fedbrain.fl.resilient.ResilientFedAvg; docs/reliability.md "Timeout policy"). min_clients is the number of
    # sites the job needs: it starts once that many are connected and ends (with the reason) when fewer stay alive.
    round_timeout: float = 1800.0  # seconds a round waits for every site asked; then it closes with who answered (0: no limit)
    min_responses: int | None = None  # updates a round needs to be accepted; None: min_clients
    dead_site_grace: float = 60.0  # seconds after a site's job process vanished before FLARE deems it gone (not asked again)

    def __post_init__(self) -> None:
        for key in self.TUPLE_FIELDS:
            setattr(self, key, tuple(getattr(self, key)))
        if self.algorithm not in self.ALGORITHMS:
            raise ValueError(f"algorithm must be one of {self.ALGORITHMS}, got {self.algorithm!r}")
        if self.fedprox_mu < 0:
            raise ValueError("fedprox_mu must be >= 0")
        if self.rounds < 1 or self.epochs_per_round < 1:
            raise ValueError(f"rounds and epochs_per_round must be >= 1, got {self.rounds}, {self.epochs_per_round}")
        if self.secagg and (self.he or self.algorithm == "scaffold" or self.aggregation != "fedavg"):
            raise ValueError("secagg: the server learns only the sum of a round's masked updates, so it cannot also "
                             "decrypt (he), move SCAFFOLD's control variates (they travel unmasked in the meta) or "
                             "combine other than by a weighted average; use algorithm fedavg/fedprox, aggregation "
                             "fedavg and no he with secagg")
        if self.guard and self.secagg:
            raise ValueError("guard: the update guard screens each site's update at the server, and under secagg the "
                             "server never sees one; leave guard unset (off on this path) or set it off")
        if self.he and self.algorithm == "scaffold":
            raise ValueError("he: SCAFFOLD's control variates travel unencrypted in the update's meta; "
                             "use fedavg, fedprox or personal with he")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        for key in ("dp_epsilon", "dp_noise_multiplier", "dp_max_grad_norm", "dp_delta", "client_dp_clip"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key} must be > 0 or unset, got {value}")
        if self.dp_delta is not None and self.dp_delta >= 1:
            raise ValueError(f"dp_delta must be < 1, got {self.dp_delta}")
        if self.aggregation not in self.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {self.AGGREGATIONS}, got {self.aggregation!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.krum_byzantine < 0 or self.guard_flag_after < 1 or not self.guard_z > 0:
            raise ValueError("krum_byzantine must be >= 0, guard_flag_after >= 1 and guard_z > 0")
        if self.aggregation != "fedavg" and self.he:
            raise ValueError(f"aggregation {self.aggregation}: with he the server holds only ciphertext and can "
                             "only sum it; use aggregation fedavg with he (the update guard does not apply either)")
        if self.aggregation != "fedavg" and self.algorithm == "scaffold":
            raise ValueError(f"aggregation {self.aggregation}: FLARE's SCAFFOLD workflow takes no custom aggregator; "
                             "use aggregation fedavg with scaffold (the update guard does not apply either)")
        if self.guard and (self.he or self.algorithm == "scaffold"):
            raise ValueError("guard: the update guard screens plaintext updates at the server, and this job's server "
                             + ("holds only ciphertext (he)" if self.he else "runs FLARE's SCAFFOLD workflow, which "
                                "takes no custom aggregator") + "; leave guard unset (off on this path) or set it off")
        if self.round_timeout < 0 or self.dead_site_grace < 0:
            raise ValueError(f"round_timeout and dead_site_grace must be >= 0, got {self.round_timeout}, {self.dead_site_grace}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if self.min_responses is not None and not 1 <= self.min_responses <= self.min_clients:
            raise ValueError(f"min_responses must be between 1 and min_clients ({self.min_clients}) or unset, "
                             f"got {self.min_responses}")
        if self.min_trained_sites < 2:
            raise ValueError(f"min_trained_sites must be >= 2 (an aggregate of one trained site is that site's own "
                             f"update, readable by every other site), got {self.min_trained_sites}")
        if self.dp_part is not None and self.dp_part not in self.PARTS:
            raise ValueError(f"dp_part must be one of {tuple(self.PARTS)}, got {self.dp_part!r}")
        if self.client_dp_noise < 0 or (self.client_dp_noise > 0 and self.client_dp_clip is None):
            raise ValueError("client_dp_noise must be >= 0 and needs client_dp_clip (the noise is relative to it)")

    # ------------------------------------------------------------------ derived
    @classmethod
    def group_of(cls, name: str) -> str:
        """``training`` | ``federation`` | ``privacy`` | ``resilience``: what a setting belongs to."""
        return next((g for g, names in cls.FIELD_GROUPS.items() if name in names), "training")

    @property
    def uses_fedprox(self) -> bool:
        return self.algorithm == "fedprox" and self.fedprox_mu > 0

    @property
    def shared_head(self) -> bool:
        """Whether a federated shared head sits beside the personal one (the classifier's algorithm ``mixed``)."""
        return False

    @property
    def update_guard(self) -> bool:
        """Whether the server screens this job's updates (``guard``, resolved for the job's path)."""
        return self.guard if self.guard is not None else not (self.he or self.secagg or self.algorithm == "scaffold")

    @property
    def dp(self) -> bool:
        """Sample-level DP-SGD on (the model spec may differ: see the tasks' model_spec)."""
        return self.dp_epsilon is not None or self.dp_noise_multiplier is not None

    @property
    def dp_ready_model(self) -> bool:
        """Whether the network is built so DP-SGD can train it (a public start always is: the same start
        serves DP and non-DP fine-tuning)."""
        return self.dp or self.dp_ready or self.start_model is not None

    @property
    def trained_part(self) -> str:
        """The part a DP mechanism trains: ``dp_part``, or by default the task's chosen part from a public start
        (from random weights a frozen rest could not learn: everything trains)."""
        if self.dp_part is not None:
            return self.dp_part
        return self.DP_PART_DEFAULT if self.start_model is not None else "all"

    @property
    def part_patterns(self) -> tuple[str, ...] | None:
        """The trained part's name patterns when training is limited to it: under sample-level DP-SGD or
        client-level DP (clip, noise), with a part other than ``all``. None: everything trains."""
        if not (self.dp or self.client_dp_clip is not None) or self.trained_part == "all":
            return None
        return self.PARTS[self.trained_part]

    def dp_clip(self) -> float:
        """The per-sample clip DP-SGD uses: ``dp_max_grad_norm``, else the clip a start given by path chose for
        the trained part on public data (a job's config already carries it: :func:`fedbrain.models.start.bind`),
        else :data:`fedbrain.privacy.clip.DEFAULT_CLIP`."""
        from fedbrain.models.start import HASH_PREFIX, load
        from fedbrain.privacy.clip import DEFAULT_CLIP, clip_from_record

        if self.dp_max_grad_norm is not None:
            return float(self.dp_max_grad_norm)
        if self.start_model is not None and not self.start_model.startswith(HASH_PREFIX):
            chosen = clip_from_record(load(self.start_model).record, self)
            if chosen is not None:
                return chosen
        return DEFAULT_CLIP

    @classmethod
    def default_shown(cls, name: str, default):
        """What a flag's help gives as ``name``'s default: ``default``, or what None means where it is decided later."""
        if name == "dp_max_grad_norm":
            return "the public start's clip for the trained part (chosen on public data), else 1.0" \
                if cls.PUBLIC_CLIP else 1.0
        return default

    def trainable_names(self, names) -> list[str]:
        """Of ``names`` (parameter names), those that train under this config: the part's under a DP
        mechanism (:attr:`part_patterns`), all otherwise."""
        from fedbrain.updates import names_in_part  # numpy: not at import (the command line lists settings fast)

        return names_in_part(names, self.part_patterns)

    def model_spec(self) -> dict:
        """``{"class_path", "args"}`` of this task's network: what the server persistor and
        every site build (:func:`fedbrain.models.instantiate`)."""
        raise NotImplementedError

    def build_model(self):
        """The network; with ``start_model`` a path (centralized runs, benchmarks), loaded with the start's
        weights. In a job ``start_model`` is the start's hash and the server's initial model carries them."""
        from fedbrain.models import instantiate

        model = instantiate(self.model_spec())
        if self.start_model is not None and not self.start_model.startswith("sha256:"):
            from fedbrain.models import start

            found = start.load(self.start_model)
            found.check_spec(self)
            model.load_state_dict(found.state_dict())
        return model

    # ------------------------------------------------------------------ travel
    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a (JSON) dict; unknown keys are an error so a typo does not pass silently."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def to_argument(self) -> str:
        """One command-line token: FLARE splits a site script's arguments on whitespace, so
        the JSON is compact and any space inside a string is written as the JSON escape
        ``\\u0020`` (decodes to the same string)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return text.replace(" ", "\\u0020")

    def replace(self, **changes):
        """A copy with some settings changed, validated again."""
        return replace(self, **changes)


# ---------------------------------------------------------------------- command lines
def _element_type(f, default):
    hint = str(f.type)
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if hint.startswith(name) or hint.startswith(f"tuple[{name}"):
            return typ
    if isinstance(default, tuple) and default:
        return type(default[0])
    return type(default) if default is not None else str


GROUPS = ("training", "federation", "privacy", "resilience")


def add_config_arguments(parser, config_cls, skip: tuple[str, ...] = (), *, groups: tuple[str, ...] = GROUPS,
                         also: tuple[str, ...] = (), defaults=None) -> None:
    """One ``--field-name`` flag per config field of ``groups`` (plus the fields in ``also``), in
    one help section per group, each showing the default: the config's own, or ``defaults``' (a
    config instance a command starts from, as the demo does).

    Flags default to None (not given), so only what the user sets overrides the config: the
    default itself is never written twice. The snake_case spelling stays a hidden alias.
    """
    import argparse

    defaults = config_cls() if defaults is None else defaults
    sections = {}
    for f in fields(config_cls):
        group = config_cls.group_of(f.name)
        if f.name in skip or (group not in groups and f.name not in also):
            continue
        if group not in sections:
            sections[group] = parser.add_argument_group(f"{group} settings ({config_cls.TASK or 'task'} defaults)")
        section = sections[group]
        default = getattr(defaults, f.name)
        flag, alias = f"--{f.name.replace('_', '-')}", f"--{f.name}"
        kwargs = dict(default=None, dest=f"config_{f.name}")
        if isinstance(default, bool) or str(f.type).startswith("bool"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(nargs="+", type=_element_type(f, default), metavar=f.name.upper())
        elif f.name == "algorithm":
            kwargs["choices"] = config_cls.ALGORITHMS
        elif f.name == "aggregation":
            kwargs["choices"] = config_cls.AGGREGATIONS
        else:
            kwargs.update(type=_element_type(f, default), metavar=f.name.upper())
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else config_cls.default_shown(f.name, default)
        section.add_argument(flag, help=f"default: {shown}", **kwargs)
        if alias != flag:
            section.add_argument(alias, help=argparse.SUPPRESS, **kwargs)


def config_from_arguments(config_cls, namespace, defaults=None, **overrides):
    """The config with every flag the user gave (and ``overrides``) applied, to the config's own
    defaults or to ``defaults`` (a config instance)."""
    given = {k.removeprefix("config_"): v for k, v in vars(namespace).items()
             if k.startswith("config_") and v is not None}
    own = {f.name for f in fields(config_cls)}
    foreign = sorted(set(given) - own)
    if foreign:
        raise SystemExit(f"{', '.join('--' + k for k in foreign)}: not a setting of {config_cls.__name__}")
    try:
        return (config_cls() if defaults is None else defaults).replace(**{**given, **overrides})
    except (TypeError, ValueError) as e:
        raise SystemExit(f"invalid {config_cls.__name__} settings: {e}") from None
