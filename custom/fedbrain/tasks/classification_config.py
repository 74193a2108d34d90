"""Every setting of grade classification (healthy / LGG / HGG) from MRI + CT, importable without
torch (the command line lists them in milliseconds); :mod:`fedbrain.tasks.classification` trains with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedbrain.contracts import GRADES
from fedbrain.models.specs import FUSIONS, POOLS
from fedbrain.tasks.config import TaskConfig, three


@dataclass
class ClassificationConfig(TaskConfig):
    """Every setting of a classification run, with the product's defaults."""

    #: personal: trunks + fusion federated, each hospital's head stays on site; fedavg: all shared;
    #: fedprox: personal + proximal term; scaffold: personal + SCAFFOLD controls on the shared part;
    #: mixed: personal + a federated shared head whose logits each site's head corrects (APFL-style mixing).
    ALGORITHMS: ClassVar[tuple[str, ...]] = ("personal", "fedavg", "fedprox", "scaffold", "mixed")
    TASK: ClassVar[str] = "classification"
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("streams", "channels", "spacing", "spatial_size")
    #: Classifier parts: trunks (one per stream), their projections, the fusion and the grade head.
    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "all": (".",),
        "head": (r"(^|\.)head\.", r"(^|\.)fusion\."),  # fusion + grade head
        "head_proj": (r"(^|\.)head\.", r"(^|\.)fusion\.", r"_trunk\.proj\."),  # + each trunk's projection
        "head_ct": (r"(^|\.)head\.", r"(^|\.)fusion\.", r"_trunk\.proj\.", r"(^|\.)ct_trunk\."),  # + the CT trunk (no public CT)
        "bias": (r"\.bias$", r"(^|\.)head\.", r"(^|\.)fusion\."),
    }
    #: The part a public-start DP job trains, chosen by measurement (docs/benchmarks.md, "DP from a public start").
    DP_PART_DEFAULT: ClassVar[str] = "head"
    #: The public start classifies public cases with almost no loss (median per-case gradient norm of the head
    #: 6.5e-5, against 1-44 on a hospital's), so their norms say nothing of a hospital's: clip at 1.0.
    PUBLIC_CLIP: ClassVar[bool] = False

    name: str = "fedbrain_classification"
    algorithm: str = "personal"
    rounds: int = 20  # ~6 s each on 2 cores; 10 left the smallest demo site at chance
    epochs_per_round: int = 4
    fusion: str = "masked_mean"  # "late" | "masked_mean" | "attention"
    streams: tuple[str, ...] = ("mri", "ct")  # ("mri",) / ("ct",) for single-modality baselines
    embed_dim: int = 64
    channels: tuple[int, ...] = (8, 16, 32, 64)
    head_hidden: int = 32
    pool: str = "max"  # trunk global pooling: "max" finds small lesions, "avg" dilutes them
    ct_mirror: bool = True  # CT trunk also sees left minus right: without it CT alone graded at chance
    modality_dropout: float = 0.3  # robust fusions only: learn to cope with a missing CT
    stream_loss: float = 0.5  # robust fusions: weight of each stream's own loss (graded alone), so CT learns beside MRI
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    spatial_size: tuple[int, int, int] = (32, 40, 32)
    augment: bool = True
    batch_size: int = 4
    lr: float = 3e-4  # 1e-3 made healthy-vs-LGG unstable on the synthetic cohort
    weight_decay: float = 1e-4
    class_weights: bool = False  # inverse-frequency CE weights from this site's training labels

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.spacing = tuple(float(s) for s in three(self.spacing))
        self.spatial_size = tuple(int(s) for s in three(self.spatial_size))
        super().__post_init__()
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.algorithm == "mixed" and self.start_model is not None:
            raise ValueError("algorithm mixed adds a shared grade head that a start model does not have: train it "
                             "from random weights (no start model) or use algorithm personal with the start")

    @property
    def personal(self) -> bool:
        """Whether each site keeps its own head (every algorithm but plain FedAvg)."""
        return self.algorithm != "fedavg"

    @property
    def shared_head(self) -> bool:
        return self.algorithm == "mixed"

    def model_spec(self) -> dict:
        from fedbrain.models.classifier import model_spec as classifier_spec  # fills the network's defaults (torch)

        return classifier_spec(fusion=self.fusion, streams=self.streams, embed_dim=self.embed_dim,
                               channels=self.channels, head_hidden=self.head_hidden, pool=self.pool, ct_mirror=self.ct_mirror,
                               init_seed=self.seed, modality_dropout=self.modality_dropout,
                               num_classes=len(GRADES), shared_head=self.shared_head)
