"""The names every part of fedbrain agrees on (docs/CONTRACTS.md): declared once, here.

Data readers, models, training, site scripts and reports import these instead of spelling
them again, so a renamed region or metric cannot drift between the site that sends it and
the report that reads it. This module imports nothing of fedbrain.
"""

from __future__ import annotations

import os

#: The four MRI contrasts of a datalist ``image`` list, in BraTS channel order.
MRI_CONTRASTS = ("t1", "t1ce", "t2", "flair")
#: The same contrasts as written in messages and docs.
MRI_CONTRAST_LABELS = ("T1", "T1ce", "T2", "FLAIR")
#: Imaging streams of the classifier, in the order their tokens are fused.
MODALITIES = ("mri", "ct")
#: Segmentation output channels, derived from the BraTS labels 1/2/4 (TC = 1|4, WT = 1|2|4, ET = 4).
REGIONS = ("tc", "wt", "et")
#: BraTS label values allowed in a segmentation file.
BRATS_LABELS = (0, 1, 2, 4)
#: Classifier class index -> grade; also the allowed values of a datalist's ``grade``.
GRADES = ("healthy", "LGG", "HGG")
#: Datalist sections read by default.
SECTIONS = ("training", "validation")

#: Two volumes of one case are on the same grid when their affines agree within this (mm):
#: ``fedbrain data check`` and loading for training use this one tolerance.
AFFINE_ATOL_MM = 1e-3

# Metric names: sent by the site loop with every update, read by reports and benchmarks.
VAL_DICE = "val_dice"
VAL_DICE_REGIONS = tuple(f"val_dice_{r}" for r in REGIONS)
SEGMENTATION_METRICS = (VAL_DICE, *VAL_DICE_REGIONS)
CLASSIFICATION_METRICS = ("val_acc", "val_bacc", "val_auc", "val_loss", "n_val")
#: What every site sends besides its task's validation metrics.
TRAIN_LOSS, TRAIN_STEPS, ROUND_SECONDS = "train_loss", "train_steps", "round_seconds"
DATA_COUNTS = ("n_train", "n_val", "n_skipped")
SITE_ERROR = "site_error"  # 1 when the site could not read its data and sends empty, zero-weight updates
#: FLARE's meta key for the number of optimizer steps behind an update (FedAvg weights by it).
NUM_STEPS_META = "NUM_STEPS_CURRENT_ROUND"


def case_id_of(item: dict, index: int | None = None) -> str:
    """A case's id: its ``case_id``, else the folder holding its label (the datalist rule).

    ``data check`` and loading both call this, so a case has one name in every message.
    """
    item = item if isinstance(item, dict) else {}
    if item.get("case_id"):
        return str(item["case_id"])
    label = item.get("label")
    if isinstance(label, (str, os.PathLike)) and os.path.dirname(os.fspath(label)):
        return os.path.basename(os.path.dirname(os.path.abspath(os.fspath(label))))
    return f"case-{index:04d}" if index is not None else "?"
