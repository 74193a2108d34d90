"""What each network is, without building it: architecture names, input-size rules and the
``{"class_path", "args"}`` specs the task configs, FLARE's server persistor and every site share.

Kept apart from the torch modules so a task config (and the command line that lists its
settings) imports in milliseconds; :func:`fedbrain.models.instantiate` builds a spec.
"""

from __future__ import annotations

import math

from fedbrain.contracts import GRADES, MODALITIES, MRI_CONTRASTS, REGIONS

# ---------------------------------------------------------------------- segmentation
ARCHS = ("segresnet", "unet")
#: The activation under DP-SGD: Opacus has no per-sample gradient for MONAI's default PReLU
#: (it would fall back to slow functorch), and in-place activations break its hooks.
DP_ACT = ["LEAKYRELU", {"negative_slope": 0.01, "inplace": False}]
#: Input sizes the CT stream of :class:`DualStreamSegNet` needs (three poolings).
CT_STREAM_DIVISOR = 8


def size_divisor(arch: str) -> int:
    """Input sizes must be multiples of this (one factor 2 per downsampling)."""
    return {"segresnet": 8, "unet": 16}[arch.lower()]


def model_spec(
    arch: str,
    *,
    init_filters: int,
    dropout: float | None = None,
    init_seed: int | None = 0,
    in_channels: int = len(MRI_CONTRASTS),
    out_channels: int = len(REGIONS),
    act: list | None = None,
    ct_filters: int | None = None,
    modality_dropout: float = 0.3,
) -> dict:
    """The network as class path + constructor args: the one description that both the site
    (``build_segmentation_model``) and FLARE's server persistor (job config) instantiate.

    * ``segresnet``: the BraTS-winning encoder/decoder (blocks 1-2-2-4), GroupNorm with up
      to 8 groups. About 1.2 M parameters at ``init_filters=8``.
    * ``unet``: 4-level residual UNet with InstanceNorm, channels f..16f. Strided first
      layer makes it several times faster per step on CPU than SegResNet.

    ``act`` replaces the architecture's default activation (e.g. :data:`DP_ACT`); None keeps it.
    ``ct_filters`` adds a CT stream (:class:`DualStreamSegNet`, MRI + CT channels in).
    """
    own_act = {"act": act} if act is not None else {}
    arch = arch.lower()
    if ct_filters is not None:
        return {
            "class_path": "fedbrain.models.segmentation.DualStreamSegNet",
            "args": {"arch": arch, "init_filters": init_filters, "dropout": dropout, "init_seed": init_seed,
                     "ct_filters": ct_filters, "modality_dropout": modality_dropout, **own_act},
        }
    if arch == "segresnet":
        return {
            "class_path": "fedbrain.models.segmentation.SeededSegResNet",
            "args": {
                "init_seed": init_seed, "spatial_dims": 3, "in_channels": in_channels, "out_channels": out_channels,
                "init_filters": init_filters, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
                "norm": ["GROUP", {"num_groups": math.gcd(8, init_filters)}], "dropout_prob": dropout, **own_act,
            },
        }
    if arch == "unet":
        f = init_filters
        return {
            "class_path": "fedbrain.models.segmentation.SeededUNet",
            "args": {
                "init_seed": init_seed, "spatial_dims": 3, "in_channels": in_channels, "out_channels": out_channels,
                "channels": [f, 2 * f, 4 * f, 8 * f, 16 * f], "strides": [2, 2, 2, 2], "num_res_units": 2,
                "norm": "INSTANCE", "dropout": dropout or 0.0, **own_act,
            },
        }
    raise ValueError(f"unknown segmentation arch {arch!r}; choose one of {ARCHS}")


# ---------------------------------------------------------------------- classification
#: Class index -> grade (the datalist ``grade`` values, docs/CONTRACTS.md).
CLASS_NAMES = GRADES
FUSIONS = ("late", "masked_mean", "attention")
POOLS = ("max", "avg")
#: Modality streams, in the order their tokens are fused.
STREAMS = MODALITIES
#: Input channels per stream: 4 MRI contrasts; CT as brain + high-density windows.
STREAM_CHANNELS = {"mri": len(MRI_CONTRASTS), "ct": 2}
CLASSIFIER_CLASS_PATH = "fedbrain.models.classifier.DualStreamClassifier"
