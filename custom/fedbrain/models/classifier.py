"""Dual-stream MRI + CT grade classifier (healthy / LGG / HGG) with missing-modality fusion.

Why two streams rather than one 6-channel network: MRI and CT live on different
intensity scales and, across a consortium, one of them is often missing (a hospital
without CT, a patient who only had MRI). Separate trunks give one embedding per
modality, and the fusion decides what to do when one is absent:

* ``late``: concatenate both embeddings and mix them with a Linear layer. A missing
  modality is just an all-zero input, so the model cannot tell "absent" from "dark":
  the baseline that degrades when a modality disappears.
* ``masked_mean``: project each embedding, then average over the modalities that are
  present. An absent modality is excluded exactly (``torch.where``), so its input
  tensor has no influence at all.
* ``attention``: a learned query attends over the present modality tokens (absent
  ones are masked out of the softmax), so the model can weight MRI vs CT per case.

Design constraints from what comes later:

* DP-SGD with Opacus: GroupNorm only (no BatchNorm), no in-place activations or
  residual adds, and no bare ``nn.Parameter``: learned tokens are ``nn.Embedding``
  rows, which have per-sample gradient support.
* Personalised federated learning: the classifier head is the module ``head``; its
  ``state_dict`` keys (:func:`head_parameter_names`) stay at the hospital
  (FLARE's ExcludeVars filter takes that explicit list).
* FLARE's server persistor rebuilds the model from :func:`model_spec`.
* Both trunks always run, even on an all-zero input, so every parameter receives a
  (possibly zero) gradient in every step: Opacus needs per-sample gradients for all
  trainable parameters, and skipping a branch would leave some undefined.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from fedbrain.models.specs import CLASS_NAMES, CLASSIFIER_CLASS_PATH, FUSIONS, POOLS, STREAM_CHANNELS, STREAMS

__all__ = [
    "CLASS_NAMES",
    "FUSIONS",
    "POOLS",
    "STREAMS",
    "DualStreamClassifier",
    "build_classifier",
    "head_parameter_names",
    "shared_parameter_names",
    "model_spec",
]

CLASS_PATH = CLASSIFIER_CLASS_PATH


def _act() -> tuple:
    # LeakyReLU: no parameters (unlike MONAI's default PReLU), and never in place.
    return ("leakyrelu", {"negative_slope": 0.01, "inplace": False})


def _norm(groups: int) -> tuple:
    return ("group", {"num_groups": groups})


#: Tensor axis of left-right in the classifier's input ``[B, C, X, Y, Z]`` (RAS: X runs right to left).
LR_AXIS = 2


def mirror_difference(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one more channel: its first channel minus that channel mirrored left-right.

    Why: a radiologist reads a head CT by comparing the hemispheres. A glioma's hypodense oedema
    looks like CSF (both darker than brain) and its density shifts are a few HU, so in one image
    they hide among sulci and ventricles; against the other hemisphere they stand out, because
    normal anatomy is nearly symmetric and a glioma is not. Parameter-free (Opacus needs nothing
    for it) and computed inside the model, after any flip augmentation, so it stays consistent.
    On the synthetic cohort it took the CT-only classifier from chance (0.333) to 0.59-0.75 balanced
    accuracy on held-out cohorts, 5 seeds (docs/troubleshooting.md, docs/benchmarks.md).
    """
    first = x[:, :1]
    return torch.cat([x, first - first.flip(LR_AXIS)], 1)


class Trunk(nn.Module):
    """Small 3D residual CNN: stem conv, strided ResidualUnits, global pool, Linear.

    Global pooling makes the trunk independent of the input size, so the same weights
    accept any preprocessing ``spatial_size``. Max pooling is the default because grade
    is decided by a few voxels (an enhancing rim, an oedema focus) in a whole brain: an
    average over ~80 positions dilutes them, and on the synthetic cohort average pooling
    stayed near majority-class predictions for 40 epochs where max pooling reached
    balanced accuracy 0.93 in 35 (docs/troubleshooting.md).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], embed_dim: int, groups: int, pool: str = "max",
                 mirror: bool = False):
        super().__init__()
        channels = [int(c) for c in channels]
        self.in_channels = int(in_channels)  # what the stream feeds, before the mirror channel
        self.mirror = bool(mirror)
        if any(c % groups for c in channels):
            raise ValueError(f"every channel count {channels} must be divisible by norm_groups={groups}")
        layers: list[nn.Module] = [
            Convolution(3, in_channels + self.mirror, channels[0], strides=1, kernel_size=3, act=_act(), norm=_norm(groups))
        ]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers.append(
                ResidualUnit(3, c_in, c_out, strides=2, kernel_size=3, subunits=2,
                             act=_act(), norm=_norm(groups), adn_ordering="NDA")
            )
        self.features = nn.Sequential(*layers)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = nn.AdaptiveMaxPool3d(1) if pool == "max" else nn.AdaptiveAvgPool3d(1)
        self.proj = nn.Linear(channels[-1], embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mirror:
            x = mirror_difference(x)
        return self.proj(torch.flatten(self.pool(self.features(x)), 1))


class LateFusion(nn.Module):
    """Concatenate embeddings, Linear + activation. Ignores availability by design."""

    def __init__(self, n_streams: int, embed_dim: int):
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(n_streams * embed_dim, embed_dim), nn.LeakyReLU(0.01, inplace=False))

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.flatten(tokens, 1))


class MaskedMeanFusion(nn.Module):
    """Per-modality projection, then the mean over present modalities only.

    A learned modality embedding is added before the projection so the fused vector
    still says which modalities contributed.
    """

    def __init__(self, n_streams: int, embed_dim: int):
        super().__init__()
        self.modality = nn.Embedding(n_streams, embed_dim)
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.LeakyReLU(0.01, inplace=False))

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        projected = self.proj(tokens + self.modality(ids))
        mask = present.unsqueeze(-1) > 0
        # where(), not multiply: a NaN/Inf in an absent modality cannot leak through.
        summed = torch.where(mask, projected, torch.zeros_like(projected)).sum(1)
        return summed / present.sum(1, keepdim=True).clamp_min(1.0)


class AttentionFusion(nn.Module):
    """Single-head attention of a learned query over the present modality tokens.

    Written with Linear / Embedding layers rather than ``nn.MultiheadAttention``, which
    Opacus cannot compute per-sample gradients for without swapping it out.
    """

    def __init__(self, n_streams: int, embed_dim: int):
        super().__init__()
        self.modality = nn.Embedding(n_streams, embed_dim)
        self.query = nn.Embedding(1, embed_dim)  # the learned query, one row
        self.key = nn.Linear(embed_dim, embed_dim)
        self.value = nn.Linear(embed_dim, embed_dim)
        self.out = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.LeakyReLU(0.01, inplace=False))
        self.scale = 1.0 / math.sqrt(embed_dim)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b, m, _ = tokens.shape
        ids = torch.arange(m, device=tokens.device).expand(b, -1)
        tokens = tokens + self.modality(ids)
        q = self.query(torch.zeros(b, dtype=torch.long, device=tokens.device))  # [B, E]
        k, v = self.key(tokens), self.value(tokens)
        scores = (k * q.unsqueeze(1)).sum(-1) * self.scale  # [B, M]
        mask = present > 0
        scores = torch.where(mask, scores, torch.full_like(scores, -1e4))
        weights = torch.softmax(scores, dim=1)
        # Exact zeros for absent tokens, and all zeros when nothing is present.
        weights = torch.where(mask, weights, torch.zeros_like(weights))
        v = torch.where(mask.unsqueeze(-1), v, torch.zeros_like(v))
        return self.out((weights.unsqueeze(-1) * v).sum(1))


_FUSION_CLASSES = {"late": LateFusion, "masked_mean": MaskedMeanFusion, "attention": AttentionFusion}


class DualStreamClassifier(nn.Module):
    """MRI trunk + CT trunk -> fusion -> personal ``head`` -> logits over CLASS_NAMES.

    ``streams`` disables a trunk for single-modality baselines (its attribute is then
    ``None`` and its input is ignored). ``modality_dropout`` (robust fusions only,
    training mode only) drops one of the two present modalities per sample with
    probability p, never both, so the model learns to classify from either alone.
    ``ct_mirror`` feeds the CT trunk a left-right difference channel (:func:`mirror_difference`).
    ``shared_head`` adds a second head, federated like the trunks, whose logits the personal ``head`` corrects
    (logits = shared_head + head; the personal head's output layer starts at zero, so a new site predicts what
    the federation knows): a hospital keeps the grades it rarely sees and learns its own habits on top.
    """

    def __init__(
        self,
        fusion: str = "masked_mean",
        embed_dim: int = 64,
        num_classes: int = 3,
        modality_dropout: float = 0.0,
        streams: Sequence[str] = STREAMS,
        channels: Sequence[int] = (8, 16, 32, 64),
        norm_groups: int = 8,
        head_hidden: int = 32,
        head_dropout: float = 0.0,
        pool: str = "max",
        init_seed: int | None = None,
        ct_mirror: bool = True,
        mri_channels: int = STREAM_CHANNELS["mri"],
        ct_channels: int = STREAM_CHANNELS["ct"],
        shared_head: bool = False,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        streams = tuple(streams)
        if not streams or any(s not in STREAMS for s in streams) or len(set(streams)) != len(streams):
            raise ValueError(f"streams must be a non-empty subset of {STREAMS}, got {streams!r}")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        self.fusion_name = fusion
        self.streams = tuple(s for s in STREAMS if s in streams)  # canonical order
        self.modality_dropout = float(modality_dropout)
        self.num_classes = int(num_classes)
        in_ch = {"mri": mri_channels, "ct": ct_channels}

        def trunk(name):
            if name not in self.streams:
                return None
            return Trunk(in_ch[name], channels, embed_dim, norm_groups, pool, mirror=ct_mirror and name == "ct")

        self.mri_trunk = trunk("mri")
        self.ct_trunk = trunk("ct")
        self.fusion = _FUSION_CLASSES[fusion](len(self.streams), embed_dim)

        def grade_head() -> nn.Sequential:
            layers: list[nn.Module] = [nn.Dropout(head_dropout)] if head_dropout > 0 else []
            if head_hidden:
                layers += [nn.Linear(embed_dim, head_hidden), nn.LeakyReLU(0.01, inplace=False),
                           nn.Linear(head_hidden, num_classes)]
            else:
                layers.append(nn.Linear(embed_dim, num_classes))
            return nn.Sequential(*layers)

        self.shared_head = grade_head() if shared_head else None
        self.head = grade_head()
        if init_seed is not None:
            self.reset_parameters(init_seed)
        self._start_personal_at_zero()

    def _start_personal_at_zero(self) -> None:
        """With a shared head, the personal head adds nothing until its site trains it."""
        if self.shared_head is not None:
            with torch.no_grad():
                self.head[-1].weight.zero_()
                self.head[-1].bias.zero_()

    def reset_parameters(self, seed: int) -> None:
        """Re-draw every layer's initial weights from ``seed``, leaving the global RNG untouched.

        Why: FLARE's server persistor builds the initial global model from ``model_spec``;
        with ``init_seed`` in the spec two jobs (e.g. two benchmark arms) start from the
        same weights, so their difference is the algorithm, not the draw.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self._start_personal_at_zero()

    @property
    def robust(self) -> bool:
        """True when the fusion masks absent modalities (late fusion cannot)."""
        return self.fusion_name != "late"

    def _drop_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Per sample, with prob p, mask one of two present modalities (chosen uniformly)."""
        if present.shape[1] < 2:
            return present
        both = present.sum(1) >= present.shape[1]
        drop = both & (torch.rand(present.shape[0], device=present.device) < self.modality_dropout)
        which = torch.randint(0, present.shape[1], (present.shape[0],), device=present.device)
        # a comparison, not one_hot: one_hot checks its values on the host, which torch.func's vmap (DP-SGD's
        # per-sample gradients) cannot do
        hit = (which.unsqueeze(1) == torch.arange(present.shape[1], device=present.device)).to(present.dtype)
        hit = hit * drop.unsqueeze(1)
        return present * (1 - hit)

    def forward(
        self,
        mri: torch.Tensor | None,
        ct: torch.Tensor | None,
        has_mri: torch.Tensor | None = None,
        has_ct: torch.Tensor | None = None,
        each_stream: bool = False,
    ) -> torch.Tensor:
        """Logits ``[B, num_classes]``. Flags are float ``[B]`` (1 present, 0 absent); None = present.

        A ``None`` tensor for an enabled stream is treated as absent (zeros are fed).
        ``each_stream`` (robust fusions) returns ``[B, 1 + M, num_classes]``: the fused logits, then
        each stream's logits as if it were the only one present (same trunks, fusion and head; for a
        sample without that stream they mean nothing). Training on them keeps every stream able to
        grade alone: without it the MRI stream, which learns first, starves the CT stream.
        """
        inputs = {"mri": (mri, has_mri), "ct": (ct, has_ct)}
        ref = next(x for x, _ in inputs.values() if x is not None)
        b, device = ref.shape[0], ref.device
        tokens, flags = [], []
        for name in self.streams:
            x, flag = inputs[name]
            trunk = self.mri_trunk if name == "mri" else self.ct_trunk
            if x is None:
                channels = trunk.in_channels
                x = torch.zeros((b, channels, *ref.shape[2:]), device=device, dtype=ref.dtype)
                flag = torch.zeros(b, device=device)
            tokens.append(trunk(x))
            if flag is None:
                flag = torch.ones(b, device=device)
            flags.append(flag.to(device=device, dtype=torch.float32).reshape(b))
        tokens = torch.stack(tokens, 1)  # [B, M, E]
        present = torch.stack(flags, 1)  # [B, M]
        fused = present
        if self.training and self.robust and self.modality_dropout > 0:
            fused = self._drop_modalities(present)
        logits = self._grade(self.fusion(tokens, fused))
        if not each_stream:
            return logits
        if not self.robust:
            raise ValueError("each_stream needs a fusion that masks absent modalities (not 'late')")
        only = torch.eye(len(self.streams), device=device, dtype=present.dtype)
        alone = [self._grade(self.fusion(tokens, only[i].expand(b, -1))) for i in range(len(self.streams))]
        return torch.stack([logits, *alone], 1)

    def _grade(self, features: torch.Tensor) -> torch.Tensor:
        """The grade logits of fused features: the head's, plus the shared head's when there is one."""
        logits = self.head(features)
        return logits if self.shared_head is None else self.shared_head(features) + logits


def build_classifier(fusion: str = "masked_mean", streams: Sequence[str] = STREAMS, **kwargs) -> DualStreamClassifier:
    """The classifier for a benchmark arm: dual-stream, or MRI-only / CT-only via ``streams``."""
    return DualStreamClassifier(fusion=fusion, streams=tuple(streams), **kwargs)


#: Constructor arguments added after specs were first saved, with the value that builds the network as before:
#: a spec leaves them out at that value, so a start pretrained earlier still matches its job.
ADDED_LATER = {"shared_head": False}


def model_spec(**kwargs) -> dict:
    """``{"class_path", "args"}`` with every constructor argument filled in (JSON-friendly).

    FLARE's server persistor instantiates ``class_path(**args)``; filling the defaults
    in makes the spec independent of later default changes.
    """
    sig = inspect.signature(DualStreamClassifier.__init__)
    unknown = set(kwargs) - (set(sig.parameters) - {"self"})
    if unknown:
        raise TypeError(f"unknown DualStreamClassifier arguments: {sorted(unknown)}")
    args = {}
    for name, param in sig.parameters.items():
        if name == "self":
            continue
        value = kwargs.get(name, param.default)
        if isinstance(value, tuple):
            value = list(value)
        args[name] = value
    args["streams"] = [s for s in STREAMS if s in args["streams"]]
    for name, before in ADDED_LATER.items():  # as the network was before them: specs, starts and caches stay valid
        if args[name] == before:
            del args[name]
    return {"class_path": CLASS_PATH, "args": args}


def _head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classifier's head, also through wrappers (Opacus ``_module.``)."""
    for name, module in model.named_modules():
        if isinstance(module, DualStreamClassifier):
            return f"{name}.head." if name else "head."
    raise TypeError(f"{type(model).__name__} holds no DualStreamClassifier")


def head_parameter_names(model: nn.Module) -> list[str]:
    """Exact ``state_dict`` keys of the personal head (kept at the site, never sent)."""
    prefix = _head_prefix(model)
    return [k for k in model.state_dict() if k.startswith(prefix)]


def shared_parameter_names(model: nn.Module) -> list[str]:
    """Every other ``state_dict`` key: trunks and fusion, the federated part."""
    prefix = _head_prefix(model)
    return [k for k in model.state_dict() if not k.startswith(prefix)]
