"""The one grade-classification training loop (healthy / LGG / HGG from MRI + CT).

Like :mod:`fedbrain.training.segment` it knows nothing of FLARE: a site loads global
weights into a model, calls :meth:`ClassificationTrainer.validate` then
:meth:`ClassificationTrainer.train` (optionally with the global weights, for the FedProx
term) and sends the result back. :func:`train_central` drives the very same trainer on
pooled data, which makes it the ceiling the federated runs are compared with.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from monai.metrics import ROCAUCMetric
from torch import nn

from fedbrain.data.multimodal import class_counts, classification_transforms, load_classification_cases
from fedbrain.models.classifier import CLASS_NAMES, FUSIONS, build_classifier, head_parameter_names
from fedbrain.training.common import TrainerBase, maybe_progress, plain, three

logger = logging.getLogger("fedbrain")

DROPS = (None, "ct", "mri")
#: Metric names returned by ``validate`` (logged by site scripts and reports).
VAL_KEYS = ("val_acc", "val_bacc", "val_auc", "val_loss", "n_val")


@dataclass
class ClassificationConfig:
    """Everything that defines a classification run; plain values so it round-trips through JSON."""

    fusion: str = "masked_mean"  # "late" | "masked_mean" | "attention"
    streams: tuple[str, ...] = ("mri", "ct")  # ("mri",) / ("ct",) for single-modality baselines
    embed_dim: int = 64
    channels: tuple[int, ...] = (8, 16, 32, 64)
    head_hidden: int = 32
    pool: str = "max"  # trunk global pooling: "max" finds small lesions, "avg" dilutes them
    modality_dropout: float = 0.0  # robust fusions only; e.g. 0.3 to learn to cope with a missing CT
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    spatial_size: tuple[int, int, int] = (32, 40, 32)
    augment: bool = True
    batch_size: int = 4
    lr: float = 3e-4  # 1e-3 made healthy-vs-LGG unstable on the synthetic cohort
    weight_decay: float = 1e-4
    class_weights: bool = False  # inverse-frequency CE weights from this site's training labels
    fedprox_mu: float = 0.0  # > 0 adds mu/2 ||w - w_global||^2 over shared params when given global weights
    epochs_per_round: int = 1
    max_steps: int | None = None  # caps steps of a train() call given in epochs
    num_threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    num_workers: int = 0
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    amp: bool = True  # mixed precision, only ever used on cuda
    seed: int = 0

    def __post_init__(self) -> None:
        self.streams = tuple(self.streams)
        self.channels = tuple(int(c) for c in self.channels)
        self.spacing = tuple(float(s) for s in three(self.spacing))
        self.spatial_size = tuple(int(s) for s in three(self.spatial_size))
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.fedprox_mu < 0:
            raise ValueError("fedprox_mu must be >= 0")

    def model_kwargs(self) -> dict:
        """Constructor arguments of the model this config trains (see ``model_spec``)."""
        return {"fusion": self.fusion, "streams": self.streams, "embed_dim": self.embed_dim,
                "channels": self.channels, "head_hidden": self.head_hidden, "pool": self.pool, "init_seed": self.seed,
                "modality_dropout": self.modality_dropout, "num_classes": len(CLASS_NAMES)}

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("streams", "channels", "spacing", "spatial_size"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClassificationConfig:
        """Build from a (JSON) dict; unknown keys are an error so typos do not pass silently."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ClassificationConfig keys: {sorted(unknown)}")
        return cls(**d)




def proximal_term(model: nn.Module, global_params: Mapping, mu: float) -> torch.Tensor:
    """FedProx: ``mu/2 * sum ||w - w_global||^2`` over the shared (non-head) parameters.

    The head is personal (never averaged), so pulling it towards a global head that
    does not exist would be wrong. ``global_params`` maps state_dict names to tensors or
    numpy arrays (what FLARE delivers); names it lacks are ignored.
    """
    head = set(head_parameter_names(model))
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for name, p in model.named_parameters():
        if not p.requires_grad or name in head:
            continue
        # An Opacus-wrapped model names its parameters "_module.<name>"; FLARE's do not.
        key = name if name in global_params else name.removeprefix("_module.")
        if key not in global_params:
            continue
        g = torch.as_tensor(global_params[key], dtype=p.dtype, device=p.device)
        total = total + (p - g).pow(2).sum()
    return 0.5 * mu * total


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, balanced accuracy and macro one-vs-rest AUC over the classes present.

    Balanced accuracy is the mean recall over classes present in ``labels``. AUC is
    MONAI's ``ROCAUCMetric(average="macro")`` on the present classes' columns (a class
    with no positive case has no AUC); NaN when fewer than two classes are present.
    """
    nan = float("nan")
    if len(labels) == 0:
        return {"val_acc": nan, "val_bacc": nan, "val_auc": nan}
    pred = probs.argmax(1)
    present = np.unique(labels)
    recalls = [float((pred[labels == c] == c).mean()) for c in present]
    auc = nan
    if len(present) > 1:
        metric = ROCAUCMetric(average="macro")
        onehot = np.eye(probs.shape[1], dtype=np.float32)[labels][:, present]
        metric(y_pred=torch.as_tensor(probs[:, present]), y=torch.as_tensor(onehot))
        auc = float(metric.aggregate())
    return {"val_acc": float((pred == labels).mean()), "val_bacc": float(np.mean(recalls)), "val_auc": auc}


class ClassificationTrainer(TrainerBase):
    """Data, loss and optimizer of one site (or of the central baseline).

    The model is passed to each call rather than owned, because an FL site loads new
    global weights into it every round; the AdamW state persists across ``train()``
    calls for the same parameters (see ``SegmentationTrainer``).
    """

    def __init__(
        self,
        train_cases: Sequence[dict],
        val_cases: Sequence[dict],
        config: ClassificationConfig | None = None,
        *,
        progress: bool = False,
    ):
        config = config or ClassificationConfig()
        kw = dict(spacing=config.spacing, spatial_size=config.spatial_size, augment=config.augment)
        self._setup(config, load_classification_cases, train_cases, val_cases, classification_transforms(True, **kw),
                    classification_transforms(False, **kw), val_batch_size=config.batch_size, progress=progress)
        self.loss_fn = nn.CrossEntropyLoss(weight=self._class_weights())

    # ------------------------------------------------------------------ helpers
    def build_model(self) -> nn.Module:
        """A fresh model as the config describes (seeded by the caller's RNG state)."""
        return build_classifier(**self.config.model_kwargs())

    def data_summary(self) -> dict:
        return {
            "n_train": len(self.train_ds),
            "n_val": len(self.val_ds),
            "n_skipped": len(self.skipped),
            "n_train_with_ct": int(sum(float(i["has_ct"]) for i in self.train_ds.items)),
            "n_val_with_ct": int(sum(float(i["has_ct"]) for i in self.val_ds.items)),
            "train_class_counts": class_counts(self.train_ds),
            "val_class_counts": class_counts(self.val_ds),
        }

    def _class_weights(self) -> torch.Tensor | None:
        """Inverse-frequency weights N / (C * n_c); classes absent here get weight 1."""
        if not self.config.class_weights or len(self.train_ds) == 0:
            return None
        counts = np.array(list(class_counts(self.train_ds).values()), float)
        weights = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 1.0)
        return torch.as_tensor(weights, dtype=torch.float32, device=self.device)

    def _new_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def _inputs(self, batch: dict, drop: str | None = None) -> tuple:
        """(mri, ct, has_mri, has_ct) on the device; ``drop`` zeroes a modality and its flag."""
        if drop not in DROPS:
            raise ValueError(f"drop must be one of {DROPS}, got {drop!r}")
        mri = plain(batch["mri"]).to(self.device, non_blocking=True)
        ct = plain(batch["ct"]).to(self.device, non_blocking=True)
        has_mri = plain(batch["has_mri"]).float().to(self.device)
        has_ct = plain(batch["has_ct"]).float().to(self.device)
        if drop == "ct":
            ct, has_ct = torch.zeros_like(ct), torch.zeros_like(has_ct)
        elif drop == "mri":
            mri, has_mri = torch.zeros_like(mri), torch.zeros_like(has_mri)
        return mri, ct, has_mri, has_ct

    # ------------------------------------------------------------------ train
    def train(
        self,
        model: nn.Module,
        *,
        epochs: int | None = None,
        steps: int | None = None,
        global_params: Mapping | None = None,
        progress: bool = False,
        on_step: Callable[[int, float], None] | None = None,
    ) -> dict:
        """Train in place for ``steps`` optimizer steps, or ``epochs`` passes (default
        ``config.epochs_per_round``, capped by ``config.max_steps``).

        With ``config.fedprox_mu > 0`` and ``global_params`` (state_dict-like, e.g. the
        global model FLARE sent this round) the FedProx term is added to the loss.
        Returns ``train_loss`` (mean total loss per step), ``ce_loss`` and ``prox_loss``
        (its two parts), ``steps`` (what FedAvg should weight by), ``epochs`` and
        ``train_seconds``.
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
        nan = float("nan")
        if batches_per_epoch == 0 or steps <= 0:
            if batches_per_epoch == 0:
                logger.warning("No training cases left (%d skipped); not training", len(self.skipped))
            return {"train_loss": nan, "ce_loss": nan, "prox_loss": nan, "steps": 0, "epochs": 0.0,
                    "train_seconds": 0.0}

        model.to(self.device)
        model.train()
        optimizer = self._optimizer_for(model)
        mu = self.config.fedprox_mu
        use_prox = mu > 0 and global_params is not None
        if use_prox:  # convert once, not every step
            global_params = {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(self.device)
                             for k, v in global_params.items()}
        losses, ces, proxes, taken, seen = [], [], [], 0, 0
        start = time.perf_counter()
        with maybe_progress(progress, "Training", steps) as advance:
            while seen < steps:
                for batch in self.train_loader:
                    if seen >= steps:
                        break
                    mri, ct, has_mri, has_ct = self._inputs(batch)
                    y = plain(batch["label"]).long().to(self.device)
                    optimizer.zero_grad(set_to_none=True)
                    with self._autocast():
                        ce = self.loss_fn(model(mri, ct, has_mri, has_ct).float(), y)
                    prox = proximal_term(model, global_params, mu) if use_prox else torch.zeros((), device=self.device)
                    loss = ce + prox
                    scale = self.scaler.get_scale() if self.use_amp else None
                    self.scaler.scale(loss).backward()
                    self.scaler.step(optimizer)
                    self.scaler.update()
                    if not self.use_amp or self.scaler.get_scale() >= scale:
                        taken += 1  # with AMP an overflowing step is skipped
                    seen += 1
                    value = float(loss.detach())
                    losses.append(value)
                    ces.append(float(ce.detach()))
                    proxes.append(float(prox.detach()))
                    if on_step is not None:
                        on_step(self.total_steps + seen, value)
                    advance(value)
        seconds = time.perf_counter() - start
        self.total_steps += taken
        self.last_step_losses = losses
        return {
            "train_loss": float(np.mean(losses)),
            "ce_loss": float(np.mean(ces)),
            "prox_loss": float(np.mean(proxes)),
            "steps": taken,
            "epochs": seen / batches_per_epoch,
            "train_seconds": seconds,
        }

    # ------------------------------------------------------------------ validate
    @torch.no_grad()
    def predict(self, model: nn.Module, *, drop: str | None = None) -> dict:
        """Softmax probabilities ``[N, C]``, labels ``[N]`` and case ids of the validation set."""
        was_training = model.training
        model.to(self.device)
        model.eval()
        probs, labels, ids = [], [], []
        for batch in self.val_loader:
            with self._autocast():
                logits = model(*self._inputs(batch, drop))
            probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
            labels.append(plain(batch["label"]).long().numpy())
            ids.extend(batch["case_id"])
        model.train(was_training)
        c = len(CLASS_NAMES)
        return {
            "probs": np.concatenate(probs) if probs else np.zeros((0, c), np.float32),
            "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
            "case_ids": ids,
        }

    def validate(self, model: nn.Module, *, drop: str | None = None) -> dict:
        """``val_acc``, ``val_bacc``, ``val_auc``, ``val_loss`` and ``n_val`` on the validation set.

        ``drop="ct"`` / ``"mri"`` simulates that modality missing for every case at test
        time (zero input, flag 0): how the fusion copes with an absent modality.
        """
        if drop not in DROPS:
            raise ValueError(f"drop must be one of {DROPS}, got {drop!r}")
        if len(self.val_ds) == 0:
            logger.warning("No validation cases; validation metrics are NaN")
            return {"val_acc": math.nan, "val_bacc": math.nan, "val_auc": math.nan, "val_loss": math.nan,
                    "n_val": 0}
        out = self.predict(model, drop=drop)
        probs, labels = out["probs"], out["labels"]
        metrics = classification_metrics(probs, labels)
        picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
        metrics["val_loss"] = float(-np.log(picked).mean())
        metrics["n_val"] = int(len(labels))
        return metrics


def train_central(
    train_cases: Sequence[dict],
    val_cases: Sequence[dict],
    config: ClassificationConfig | None = None,
    *,
    epochs: int,
    drops: Sequence[str] = (),
    log_dir: str | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
) -> list[dict]:
    """Centralized ceiling: pooled cases, the same trainer, one validation per epoch.

    Returns one dict per epoch: ``epoch``, the ``train()`` and ``validate()`` metrics,
    ``validate(drop=d)`` metrics as ``<name>_no_<d>`` for each of ``drops`` (e.g.
    ``val_bacc_no_ct``) and ``data_summary()``'s counts. With ``log_dir`` the scalars are
    written to TensorBoard with the epoch as step.
    """
    config = config or ClassificationConfig()
    trainer = ClassificationTrainer(train_cases, val_cases, config, progress=progress)
    summary = {k: v for k, v in trainer.data_summary().items() if not isinstance(v, dict)}
    for s in trainer.skipped:
        logger.warning("Central baseline skipped %s: %s", s.case_id, s.reason)
    if model is None:
        model = trainer.build_model()
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(log_dir))
    console = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)
    history = []
    try:
        for epoch in range(1, epochs + 1):
            record = {"epoch": epoch, **trainer.train(model, epochs=1, progress=progress)}
            record.update(trainer.validate(model))
            for d in drops:
                record.update({f"{k}_no_{d}": v for k, v in trainer.validate(model, drop=d).items() if k != "n_val"})
            record.update(summary)
            history.append(record)
            if writer is not None:
                for name, value in record.items():
                    if name != "epoch" and isinstance(value, (int, float)):
                        writer.add_scalar(name, value, epoch)
                writer.flush()
            line = (f"epoch {epoch}/{epochs}  loss {record['train_loss']:.4f}  acc {record['val_acc']:.3f}  "
                    f"bacc {record['val_bacc']:.3f}  auc {record['val_auc']:.3f}")
            line += "".join(f"  bacc(no {d}) {record[f'val_bacc_no_{d}']:.3f}" for d in drops)
            logger.info(line)
            if console is not None:
                console.print(line)
    finally:
        if writer is not None:
            writer.close()
    return history
