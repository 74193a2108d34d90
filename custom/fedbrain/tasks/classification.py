"""Grade classification (healthy / LGG / HGG) from MRI + CT with the dual-stream classifier.

:class:`ClassificationConfig` is the one home of every classification setting;
:class:`ClassificationTrainer` is the shared loop (:mod:`fedbrain.tasks.loop`) with this
task's data, cross-entropy loss and metrics. With a personal algorithm the classifier head
is this site's own (:meth:`ClassificationTrainer.personal_parameter_names`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from monai.metrics import ROCAUCMetric
from torch import nn

from fedbrain.contracts import CLASSIFICATION_METRICS, GRADES
from fedbrain.data.multimodal import class_counts, classification_transforms, load_classification_cases
from fedbrain.models.classifier import STREAMS, head_parameter_names
from fedbrain.tasks.classification_config import ClassificationConfig  # noqa: F401 (the task's config, re-exported)
from fedbrain.tasks.loop import Trainer, plain

logger = logging.getLogger("fedbrain")

DROPS = (None, "ct", "mri")


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


class ClassificationTrainer(Trainer):
    """One site's (or the central baseline's) classification data, loss and AdamW optimizer."""

    key_metric = "val_bacc"

    def __init__(self, train_cases, val_cases, config: ClassificationConfig | None = None, *, progress: bool = False):
        config = config or ClassificationConfig()
        self.val_batch_size = config.batch_size
        super().__init__(train_cases, val_cases, config, progress=progress)
        weights = self._class_weights()
        # A weighted "mean" divides by the batch's weight sum, mixing samples; DP-SGD needs per-sample terms.
        self._per_sample_mean = config.dp and weights is not None
        self.loss_fn = nn.CrossEntropyLoss(weight=weights, reduction="none" if self._per_sample_mean else "mean")

    def transforms(self, train: bool):
        c = self.config
        return classification_transforms(train, spacing=c.spacing, spatial_size=c.spatial_size, augment=c.augment)

    def load_cases(self, cases, transform, *, progress: bool):
        return load_classification_cases(cases, transform, progress=progress)

    def personal_parameter_names(self, model: nn.Module) -> list[str]:
        return head_parameter_names(model) if self.config.personal else []

    def data_summary(self) -> dict:
        return {
            **super().data_summary(),
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

    def loss_terms(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        y = plain(batch["label"]).long().to(self.device)
        mri, ct, has_mri, has_ct = self._inputs(batch)
        c = self.config
        own = self._streams_with_own_loss(model)
        weight = c.stream_loss if len(c.streams) > 1 and c.fusion != "late" and own else 0.0
        logits = model(mri, ct, has_mri, has_ct, each_stream=bool(weight)).float()
        fused = self.loss_fn(logits[:, 0] if weight else logits, y)
        terms = {"ce_loss": fused.mean() if self._per_sample_mean else fused}
        if weight:
            present = {"mri": has_mri, "ct": has_ct}
            for i, name in enumerate((s for s in STREAMS if s in c.streams), start=1):  # the model's stream order
                if name not in own:
                    continue
                # a per-sample sum over the batch size (not over the present samples): DP-SGD needs per-sample terms
                alone = nn.functional.cross_entropy(logits[:, i], y, weight=self.loss_fn.weight, reduction="none")
                terms[f"ce_{name}_alone"] = weight * (alone * present[name]).sum() / len(y)
        return terms

    def _streams_with_own_loss(self, model: nn.Module) -> set[str]:
        """Streams whose own loss applies: each stream's loss is there to train its trunk; with the trunk
        frozen (DP-SGD on a part of a public start) it would only bend the shared head towards features that
        cannot improve (a CT trunk the public start never trained: balanced accuracy 0.61 at epsilon 8 with
        it, 0.78 without, 2026-12-07)."""
        names = [n for n, _ in model.named_parameters()]
        trained = set(self.config.trainable_names(names))
        return {s for s in self.config.streams if any(f"{s}_trunk.features" in n for n in trained)}

    def summary_line(self, r: dict) -> str:
        return f"loss {r['train_loss']:.4f}  acc {r['val_acc']:.3f}  bacc {r['val_bacc']:.3f}  auc {r['val_auc']:.3f}"

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
        c = len(GRADES)
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
            return {**dict.fromkeys(CLASSIFICATION_METRICS, math.nan), "n_val": 0}
        out = self.predict(model, drop=drop)
        probs, labels = out["probs"], out["labels"]
        metrics = classification_metrics(probs, labels)
        picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
        metrics["val_loss"] = float(-np.log(picked).mean())
        metrics["n_val"] = int(len(labels))
        return metrics
