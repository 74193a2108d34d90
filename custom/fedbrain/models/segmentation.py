"""Small 3D segmentation networks for four MRI channels in, TC/WT/ET logits out.

Sized for CPU demos (a few minutes of training per site) rather than leaderboard
accuracy. Only GroupNorm / InstanceNorm are used: batch statistics would leak across
samples and are not supported by Opacus, which the differential-privacy option needs.
"""

from __future__ import annotations

import math

from monai.networks.nets import SegResNet, UNet
from torch import nn

ARCHS = ("segresnet", "unet")


def model_spec(
    arch: str = "segresnet",
    *,
    in_channels: int = 4,
    out_channels: int = 3,
    init_filters: int = 8,
    dropout: float | None = None,
) -> dict:
    """The network as class path + constructor args: the one description that both the site
    (``build_segmentation_model``) and FLARE's server persistor (job config) instantiate.

    * ``segresnet``: the BraTS-winning encoder/decoder (blocks 1-2-2-4), GroupNorm with up
      to 8 groups. About 1.2 M parameters at ``init_filters=8``.
    * ``unet``: 4-level residual UNet with InstanceNorm, channels f..16f. Strided first
      layer makes it several times faster per step on CPU than SegResNet.
    """
    arch = arch.lower()
    if arch == "segresnet":
        return {
            "class_path": "monai.networks.nets.SegResNet",
            "args": {
                "spatial_dims": 3, "in_channels": in_channels, "out_channels": out_channels,
                "init_filters": init_filters, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
                "norm": ["GROUP", {"num_groups": math.gcd(8, init_filters)}], "dropout_prob": dropout,
            },
        }
    if arch == "unet":
        f = init_filters
        return {
            "class_path": "monai.networks.nets.UNet",
            "args": {
                "spatial_dims": 3, "in_channels": in_channels, "out_channels": out_channels,
                "channels": [f, 2 * f, 4 * f, 8 * f, 16 * f], "strides": [2, 2, 2, 2], "num_res_units": 2,
                "norm": "INSTANCE", "dropout": dropout or 0.0,
            },
        }
    raise ValueError(f"unknown segmentation arch {arch!r}; choose one of {ARCHS}")


def build_segmentation_model(arch: str = "segresnet", **kwargs) -> nn.Module:
    """MONAI SegResNet (default) or UNet as ``model_spec`` describes; outputs are logits
    (apply sigmoid per channel)."""
    spec = model_spec(arch, **kwargs)
    args = dict(spec["args"])
    if isinstance(args.get("norm"), list):
        args["norm"] = tuple(args["norm"])
    return {"monai.networks.nets.SegResNet": SegResNet, "monai.networks.nets.UNet": UNet}[spec["class_path"]](**args)


def size_divisor(arch: str) -> int:
    """Input sizes must be multiples of this (one factor 2 per downsampling)."""
    return {"segresnet": 8, "unet": 16}[arch.lower()]

