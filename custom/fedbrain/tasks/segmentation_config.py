"""Every setting of 3D BraTS-style tumour segmentation, importable without torch (the command
line lists them in milliseconds); :mod:`fedbrain.tasks.segmentation` trains with it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from fedbrain.models.specs import ARCHS, CT_STREAM_DIVISOR, DP_ACT, model_spec, size_divisor
from fedbrain.tasks.config import TaskConfig, three

LOSSES = ("dice", "dicefocal", "dicece")


@dataclass
class SegmentationConfig(TaskConfig):
    """Every setting of a segmentation run, with the product's defaults (sized for 2 CPU cores)."""

    TASK: ClassVar[str] = "segmentation"
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("spacing", "roi_size", "streams")
    #: The stream sets a segmentation network can take: MRI alone, or MRI + CT (dual-stream).
    STREAM_SETS: ClassVar[tuple[tuple[str, ...], ...]] = (("mri",), ("mri", "ct"))
    #: UNet parts (MONAI names: each level's ``submodule.2`` / the top ``model.2`` is its decoder stage).
    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "all": (".",),
        "bias": (r"\.bias$",),  # BitFit: every bias, weights frozen
        "decoder": (r"(^|\.)model\.2\.", r"submodule\.2\."),  # every decoder stage and the output head
        "last_stage": (r"(^|\.)model\.2\.", r"(^|\.)model\.1\.submodule\.2\."),  # the top decoder stage + head
        "decoder_bias": (r"(^|\.)model\.2\.", r"submodule\.2\.", r"\.bias$"),
    }
    #: The part a public-start DP job trains, chosen by measurement (docs/benchmarks.md, "DP from a public start").
    DP_PART_DEFAULT: ClassVar[str] = "decoder"

    name: str = "fedbrain_segmentation"
    rounds: int = 6
    epochs_per_round: int = 4
    lr: float = 1e-2
    arch: str = "unet"  # ~2x faster per step than SegResNet on CPU, same Dice on the demo
    init_filters: int = 8
    dropout: float | None = None
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    roi_size: tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 2  # CPU 3D convs use cores poorly at batch 1
    loss: str = "dicefocal"  # "dice" | "dicefocal" | "dicece"; see _make_loss
    val_sw_batch_size: int = 1
    val_overlap: float = 0.25
    streams: tuple[str, ...] = ("mri",)  # ("mri", "ct"): dual-stream, CT where a case has it (DualStreamSegNet)
    ct_filters: int = 4  # the CT stream's UNet width (dual-stream only)
    modality_dropout: float = 0.3  # dual-stream: share of training samples whose CT is hidden

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in three(self.spacing))
        self.roi_size = tuple(int(r) for r in three(self.roi_size))
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown segmentation arch {self.arch!r}; choose one of {ARCHS}")
        if self.streams not in self.STREAM_SETS:
            raise ValueError(f"streams must be one of {', '.join(' '.join(s) for s in self.STREAM_SETS)}, "
                             f"got {' '.join(self.streams)}")
        if not 0 <= self.modality_dropout < 1 or self.ct_filters < 1:
            raise ValueError("modality_dropout must be in [0, 1) and ct_filters >= 1")
        div = self.size_divisor
        if any(r % div for r in self.roi_size):
            raise ValueError(f"roi_size {self.roi_size} must be a multiple of {div} for {self.arch}"
                             + (" with the CT stream" if self.ct else ""))

    @property
    def ct(self) -> bool:
        """Dual-stream: the CT of a case that has one is read and fed to the CT stream."""
        return "ct" in self.streams

    @property
    def size_divisor(self) -> int:
        """Input sizes must be multiples of this (for the network and, dual-stream, its CT stream)."""
        return math.lcm(size_divisor(self.arch), CT_STREAM_DIVISOR) if self.ct else size_divisor(self.arch)

    def model_spec(self) -> dict:
        return model_spec(self.arch, init_filters=self.init_filters, dropout=self.dropout, init_seed=self.seed,
                          act=DP_ACT if self.dp_ready_model else None, ct_filters=self.ct_filters if self.ct else None,
                          modality_dropout=self.modality_dropout)
