"""The one segmentation training loop, shared by the centralized baseline and FL sites.

It knows nothing of FLARE: a site script receives global weights, loads them into a
model, calls :meth:`SegmentationTrainer.validate` then :meth:`SegmentationTrainer.train`
and sends the difference back. The centralized baseline (:func:`train_central`) drives
the very same trainer, so the two are comparable by construction.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from monai.metrics import DiceMetric
from monai.transforms import Activations, AsDiscrete, Compose
from torch import nn

from fedbrain.data.dataset import load_cases
from fedbrain.data.transforms import REGIONS, segmentation_transforms
from fedbrain.models.segmentation import build_segmentation_model, size_divisor
from fedbrain.training.common import TrainerBase, maybe_progress, plain, three

logger = logging.getLogger("fedbrain")

LOSSES = ("dice", "dicefocal", "dicece")


@dataclass
class SegmentationConfig:
    """Everything that defines a training run; plain values so it round-trips through JSON."""

    arch: str = "segresnet"
    init_filters: int = 8
    dropout: float | None = None
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    roi_size: tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 2  # CPU 3D convs use cores poorly at batch 1
    lr: float = 1e-3
    weight_decay: float = 1e-5
    loss: str = "dicefocal"  # "dice" | "dicefocal" | "dicece"; see _make_loss
    epochs_per_round: int = 1
    max_steps: int | None = None  # caps steps of a train() call given in epochs
    num_threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    num_workers: int = 0  # data loading workers; 0 is best when sites share a few cores
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    amp: bool = True  # mixed precision, only ever used on cuda
    seed: int = 0
    val_sw_batch_size: int = 1
    val_overlap: float = 0.25

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in three(self.spacing))
        self.roi_size = tuple(int(r) for r in three(self.roi_size))
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        div = size_divisor(self.arch)
        if any(r % div for r in self.roi_size):
            raise ValueError(f"roi_size {self.roi_size} must be a multiple of {div} for {self.arch}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spacing"], d["roi_size"] = list(self.spacing), list(self.roi_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SegmentationConfig:
        """Build from a (JSON) dict; unknown keys are an error so typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SegmentationConfig keys: {sorted(unknown)}")
        return cls(**d)





def _make_loss(name: str) -> nn.Module:
    """Sigmoid per channel: TC, WT and ET overlap, so softmax over them would be wrong.

    DiceFocal is the default because tumours fill ~1% of a crop: pure Dice gives each
    background voxel a vanishing gradient and needs hundreds of steps to clear the initial
    p=0.5 background; the focal term does that within the few dozen steps a CPU demo
    round has (60 steps on the fixture: mean Dice 0.69 vs 0.38 with Dice alone).
    """
    if name == "dicefocal":
        return DiceFocalLoss(sigmoid=True)
    if name == "dicece":
        return DiceCELoss(sigmoid=True)
    return DiceLoss(sigmoid=True)


class SegmentationTrainer(TrainerBase):
    """Holds the data, loss and optimizer of one site (or of the central baseline).

    The model is passed to each call rather than owned, because an FL site loads new
    global weights into it every round. The Adam optimizer persists across ``train()``
    calls: loading weights with ``load_state_dict`` keeps the same parameter objects, so
    its moment estimates simply carry on; if a *different* model object is passed, the
    optimizer is rebuilt for it and its state transferred.
    """

    def __init__(
        self,
        train_cases: Sequence[dict],
        val_cases: Sequence[dict],
        config: SegmentationConfig | None = None,
        *,
        progress: bool = False,
    ):
        config = config or SegmentationConfig()
        kw = dict(spacing=config.spacing, roi_size=config.roi_size, k_divisible=size_divisor(config.arch))
        self._setup(config, load_cases, train_cases, val_cases, segmentation_transforms(True, **kw),
                    segmentation_transforms(False, **kw), val_batch_size=1, progress=progress)
        self.loss_fn = _make_loss(config.loss)
        self.post = Compose([Activations(sigmoid=True), AsDiscrete(threshold=0.5)])

    # ------------------------------------------------------------------ helpers
    def build_model(self) -> nn.Module:
        """A fresh model as the config describes (seeded by the caller's RNG state)."""
        c = self.config
        return build_segmentation_model(c.arch, init_filters=c.init_filters, dropout=c.dropout)

    def data_summary(self) -> dict:
        return {"n_train": len(self.train_ds), "n_val": len(self.val_ds), "n_skipped": len(self.skipped)}

    def _new_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    # ------------------------------------------------------------------ train
    def train(
        self,
        model: nn.Module,
        *,
        epochs: int | None = None,
        steps: int | None = None,
        progress: bool = False,
        on_step: Callable[[int, float], None] | None = None,
    ) -> dict:
        """Train in place for ``steps`` optimizer steps, or ``epochs`` passes (default
        ``config.epochs_per_round``, capped by ``config.max_steps``).

        Returns ``train_loss`` (mean over the steps), ``steps`` (optimizer steps actually
        taken: what FedAvg should weight by), ``epochs`` (passes, fractional), and
        ``train_seconds``. ``on_step(step, loss)`` is called after every step with the
        trainer's running step count (continues across calls, handy as a TensorBoard step);
        the losses are also kept in ``self.last_step_losses``. The model is moved to the
        trainer's device and left there (call ``.cpu()`` before computing weight diffs).
        """
        if epochs is not None and steps is not None:
            raise ValueError("give epochs or steps, not both")
        batches_per_epoch = len(self.train_loader)
        if steps is None:
            n_epochs = self.config.epochs_per_round if epochs is None else epochs
            steps = n_epochs * batches_per_epoch
            if self.config.max_steps is not None:
                steps = min(steps, self.config.max_steps)
        self.last_step_losses = []
        if batches_per_epoch == 0 or steps <= 0:
            if batches_per_epoch == 0:
                logger.warning("No training cases left (%d skipped); not training", len(self.skipped))
            return {"train_loss": float("nan"), "steps": 0, "epochs": 0.0, "train_seconds": 0.0}

        self._apply_threads()
        model.to(self.device)
        model.train()
        optimizer = self._optimizer_for(model)
        losses, taken, seen = [], 0, 0
        start = time.perf_counter()
        with maybe_progress(progress, "Training", steps) as advance:
            while seen < steps:
                for batch in self.train_loader:
                    if seen >= steps:
                        break
                    x = plain(batch["image"]).to(self.device, non_blocking=True)
                    y = plain(batch["label"]).to(self.device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    with self._autocast():
                        loss = self.loss_fn(model(x), y)
                    scale = self.scaler.get_scale() if self.use_amp else None
                    self.scaler.scale(loss).backward()
                    self.scaler.step(optimizer)
                    self.scaler.update()
                    # With AMP an overflowing step is skipped (and the scale lowered).
                    if not self.use_amp or self.scaler.get_scale() >= scale:
                        taken += 1
                    seen += 1
                    value = float(loss.detach())
                    losses.append(value)
                    if on_step is not None:
                        on_step(self.total_steps + seen, value)
                    advance(value)
        seconds = time.perf_counter() - start
        self.total_steps += taken
        self.last_step_losses = losses
        return {
            "train_loss": float(sum(losses) / len(losses)),
            "steps": taken,
            "epochs": seen / batches_per_epoch,
            "train_seconds": seconds,
        }

    # ------------------------------------------------------------------ validate
    @torch.no_grad()
    def validate(self, model: nn.Module, *, progress: bool = False) -> dict:
        """Dice of sigmoid>0.5 predictions over whole validation volumes (sliding window).

        Empty ground truth: ``ignore_empty=True`` semantics, i.e. a case whose ground truth
        has no voxel of a region (e.g. a healthy brain, or a tumour without enhancement)
        does not count towards that region's Dice, whatever is predicted. A region absent
        from *every* validation case is reported as NaN, and ``val_dice`` is the mean of
        the regions that are present (NaN if none).
        """
        nan = float("nan")
        keys = ["val_dice"] + [f"val_dice_{r}" for r in REGIONS]
        if len(self.val_ds) == 0:
            logger.warning("No validation cases; validation metrics are NaN")
            return dict.fromkeys(keys, nan)
        self._apply_threads()
        was_training = model.training
        model.to(self.device)
        model.eval()
        metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True, get_not_nans=True)
        with maybe_progress(progress, "Validating", len(self.val_ds)) as advance:
            for batch in self.val_loader:
                x = plain(batch["image"]).to(self.device, non_blocking=True)
                y = plain(batch["label"]).to(self.device, non_blocking=True)
                with self._autocast():
                    logits = sliding_window_inference(
                        x,
                        roi_size=self.config.roi_size,
                        sw_batch_size=self.config.val_sw_batch_size,
                        predictor=model,
                        overlap=self.config.val_overlap,
                    )
                pred = torch.stack([self.post(p.float()) for p in logits])
                metric(y_pred=pred, y=y)
                advance(None)
        per_region, not_nans = metric.aggregate()
        model.train(was_training)
        values = [float(v) if n > 0 else nan for v, n in zip(per_region.tolist(), not_nans.tolist())]
        present = [v for v in values if not math.isnan(v)]
        out = {"val_dice": sum(present) / len(present) if present else nan}
        out.update({f"val_dice_{r}": v for r, v in zip(REGIONS, values)})
        return out



def train_central(
    train_cases: Sequence[dict],
    val_cases: Sequence[dict],
    config: SegmentationConfig | None = None,
    *,
    epochs: int,
    log_dir: str | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
) -> list[dict]:
    """Centralized baseline: pooled cases, the same trainer, one validation per epoch.

    Returns one dict per epoch: ``epoch``, the ``train()`` and ``validate()`` metrics and
    ``n_train`` / ``n_val`` / ``n_skipped``. With ``log_dir`` the CONTRACTS.md metric names
    are also written to TensorBoard with the epoch as step. Pass ``model`` to keep (and
    save) the trained network; otherwise a fresh one is built from ``config``.
    """
    config = config or SegmentationConfig()
    trainer = SegmentationTrainer(train_cases, val_cases, config, progress=progress)
    summary = trainer.data_summary()  # skipped cases were already logged while loading
    if model is None:
        model = trainer.build_model()
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
    history = []
    console = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)
    try:
        for epoch in range(1, epochs + 1):
            record = {"epoch": epoch, **trainer.train(model, epochs=1, progress=progress)}
            record.update(trainer.validate(model, progress=progress))
            record.update(summary)
            history.append(record)
            if writer is not None:
                for name in ("train_loss", "val_dice", "val_dice_tc", "val_dice_wt", "val_dice_et",
                             "n_train", "n_val", "n_skipped"):
                    writer.add_scalar(name, record[name], epoch)
                writer.flush()
            line = (
                f"epoch {epoch}/{epochs}  {record['steps']} steps {record['train_seconds']:.0f}s  "
                f"loss {record['train_loss']:.4f}  dice {record['val_dice']:.3f} "
                f"(tc {record['val_dice_tc']:.3f} wt {record['val_dice_wt']:.3f} et {record['val_dice_et']:.3f})"
            )
            if console is not None:
                console.print(line)
            else:
                logger.info(line)
    finally:
        if writer is not None:
            writer.close()
    return history
