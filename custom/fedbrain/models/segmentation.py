"""Small 3D segmentation networks for four MRI channels in, TC/WT/ET logits out.

Sized for CPU demos (a few minutes of training per site) rather than leaderboard
accuracy. Only GroupNorm / InstanceNorm are used: batch statistics would leak across
samples and are not supported by Opacus, which the differential-privacy option needs.
"""

from __future__ import annotations


import torch
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.nets import SegResNet, UNet
from torch import nn

from fedbrain.contracts import MRI_CONTRASTS, REGIONS
from fedbrain.models.specs import ARCHS, CT_STREAM_DIVISOR, DP_ACT, model_spec, size_divisor  # noqa: F401 (re-exported)


def _seeded_init(module: nn.Module, init_seed: int | None, build) -> None:
    """Run ``build`` (the parent constructor) under ``init_seed`` without touching the global RNG.

    Why: FLARE's server persistor builds the initial global model from the spec; unseeded,
    every run of the same job started from other weights and final Dice varied by 0.1.
    """
    if init_seed is None:
        build()
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        build()


class SeededUNet(UNet):
    """MONAI UNet whose initial weights are drawn from ``init_seed`` (same state_dict names)."""

    def __init__(self, init_seed: int | None = None, **kwargs):
        _seeded_init(self, init_seed, lambda: UNet.__init__(self, **kwargs))


class OutOfPlaceResBlock(ResBlock):
    """MONAI's ResBlock with ``x + identity`` instead of ``x += identity``: the same values, but
    Opacus' per-sample-gradient hooks refuse an in-place add on a hooked module's output."""

    def forward(self, x):
        identity = x
        x = self.conv1(self.act(self.norm1(x)))
        x = self.conv2(self.act(self.norm2(x)))
        return x + identity


class SeededSegResNet(SegResNet):
    """MONAI SegResNet whose initial weights are drawn from ``init_seed`` (same state_dict names)."""

    def __init__(self, init_seed: int | None = None, norm=("GROUP", {"num_groups": 8}), **kwargs):
        norm = tuple(norm) if isinstance(norm, list) else norm  # JSON turns the tuple into a list
        _seeded_init(self, init_seed, lambda: SegResNet.__init__(self, norm=norm, **kwargs))
        for module in self.modules():
            if type(module) is ResBlock:
                module.__class__ = OutOfPlaceResBlock


class DualStreamSegNet(nn.Module):
    """MRI + CT segmentation: two streams whose logits add, the CT's only where a case has CT.

    ``mri`` is the MRI-only network (``arch`` as in :func:`model_spec`, 4 channels in); ``ct`` a
    light UNet on the two CT windows (``ct_filters`` .. 8x, three poolings, no residual units: the
    residual units at full resolution cost as much as the whole MRI network on CPU, while a
    correction of the MRI logits needs far less capacity). The input is one tensor, the MRI channels
    then the CT ones (what :func:`fedbrain.data.transforms.segmentation_transforms` gives with
    ``ct=True``), so sliding-window inference and the exported bundle see a single image. A sample
    whose CT channels are all zero (no CT) gets exactly the MRI stream's logits, so a hospital
    without CT trains and validates the MRI stream alone, and its update leaves the CT stream
    unchanged: a batch without any CT does not run the CT stream, so its parameters get no
    gradient (not a zero one, which Adam's weight decay would turn into a full-size step). Under
    DP-SGD (``skip_unused_streams`` off: Opacus needs every parameter's per-sample gradient) the
    stream runs, gated to zero. In training, ``modality_dropout`` hides a present CT per sample, so
    the MRI stream never comes to rely on it.
    """

    #: Whether a stream with nothing to see is skipped (fedbrain.privacy.dpsgd turns it off).
    skip_unused_streams = True

    def __init__(self, arch: str = "unet", init_filters: int = 8, dropout: float | None = None,
                 init_seed: int | None = 0, act: list | None = None, ct_filters: int = 4,
                 modality_dropout: float = 0.3, ct_channels: int = 2):
        super().__init__()
        self.mri_channels = len(MRI_CONTRASTS)
        self.modality_dropout = float(modality_dropout)
        self.mri = build_segmentation_model(arch, init_filters=init_filters, dropout=dropout, init_seed=init_seed,
                                            act=act)
        f = ct_filters
        self.ct = SeededUNet(init_seed=None if init_seed is None else init_seed + 1, spatial_dims=3,
                             in_channels=ct_channels, out_channels=len(REGIONS), channels=[f, 2 * f, 4 * f, 8 * f],
                             strides=[2, 2, 2], num_res_units=0, norm="INSTANCE", **({"act": act} if act else {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mri, ct = x[:, :self.mri_channels], x[:, self.mri_channels:]
        out = self.mri(mri)
        if ct.shape[1] == 0:  # an MRI-only input: the CT stream has nothing to add
            return out
        present = (ct.detach().abs().flatten(1).amax(1) > 0).to(out.dtype)
        if self.training and self.modality_dropout > 0:
            present = present * (torch.rand_like(present) >= self.modality_dropout).to(out.dtype)
        if self.skip_unused_streams and not bool(present.any()):
            return out
        return out + present.view(-1, *([1] * (out.dim() - 1))) * self.ct(ct)


def build_segmentation_model(arch: str, **kwargs) -> nn.Module:
    """The network ``model_spec`` describes; outputs are logits (apply sigmoid per channel)."""
    from fedbrain.models import instantiate

    return instantiate(model_spec(arch, **kwargs))
