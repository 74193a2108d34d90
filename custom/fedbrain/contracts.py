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
#: Label conventions a datalist may declare (key ``label_convention``): the values allowed in
#: its segmentation files, the last one being enhancing tumour. BraTS 2018-2021 write it as 4,
#: BraTS 2023 as 3 (1 core, 2 oedema in both); anything else is refused, never guessed.
LABEL_CONVENTIONS = {"brats2021": (0, 1, 2, 4), "brats2023": (0, 1, 2, 3)}
DEFAULT_LABEL_CONVENTION = "brats2021"
#: Datalist keys beyond image/label/ct/grade/case_id: the label convention (top level or per
#: case) and the SeriesInstanceUID that picks one series in a CT folder holding several.
LABEL_CONVENTION_KEY, CT_SERIES_KEY = "label_convention", "ct_series_uid"
#: A CT must hold at least this fraction of the MRI brain voxels inside its field of view
#: (world coordinates): a CT elsewhere would feed the classifier air as "CT present".
CT_MIN_BRAIN_COVERAGE = 0.9
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
#: 95th-percentile Hausdorff distance in mm, per region and their mean (fedbrain.tasks.seg_metrics; lower is better).
VAL_HD95 = "val_hd95"
VAL_HD95_REGIONS = tuple(f"val_hd95_{r}" for r in REGIONS)
SEGMENTATION_METRICS = (VAL_DICE, *VAL_DICE_REGIONS, VAL_HD95, *VAL_HD95_REGIONS)
CLASSIFICATION_METRICS = ("val_acc", "val_bacc", "val_auc", "val_loss", "n_val")
#: What every site sends besides its task's validation metrics.
TRAIN_LOSS, TRAIN_STEPS, ROUND_SECONDS = "train_loss", "train_steps", "round_seconds"
DATA_COUNTS = ("n_train", "n_val", "n_skipped")
SITE_ERROR = "site_error"  # 1 when the site could not read its data and sends empty, zero-weight updates
#: FLARE's meta key for the number of optimizer steps behind an update (FedAvg weights by it).
NUM_STEPS_META = "NUM_STEPS_CURRENT_ROUND"
#: Differential privacy, per site and round: the epsilon this site's data has spent over all jobs so far
#: (at ``dp_delta``), and why a site withheld its update (a code of DP_WITHHELD_REASONS; absent: it did not).
DP_EPSILON_SPENT, DP_DELTA, DP_NOISE_MULTIPLIER = "dp_epsilon_spent", "dp_delta", "dp_noise_multiplier"
DP_WITHHELD = "dp_withheld"
#: 1 when the epsilon spent is unbounded (a release without DP): FLARE's metrics writer drops non-finite
#: numbers, so an infinite ``dp_epsilon_spent`` travels as this flag instead (the report shows ∞).
DP_EPSILON_UNBOUNDED = "dp_epsilon_unbounded"


def epsilon_to_wire(metrics: dict) -> dict:
    """A site's metrics as they may travel: an infinite epsilon becomes the DP_EPSILON_UNBOUNDED flag."""
    eps = metrics.get(DP_EPSILON_SPENT)
    if not (isinstance(eps, float) and eps == float("inf")):
        return dict(metrics)
    return {**{k: v for k, v in metrics.items() if k != DP_EPSILON_SPENT}, DP_EPSILON_UNBOUNDED: 1}


def epsilon_from_wire(metrics: dict) -> dict:
    """What a site sent, with the DP_EPSILON_UNBOUNDED flag read back as an infinite epsilon."""
    return {**metrics, DP_EPSILON_SPENT: float("inf")} if metrics.get(DP_EPSILON_UNBOUNDED) else dict(metrics)
DP_WITHHELD_REASONS = {1: "privacy budget exhausted", 2: "site requires DP; the job has none",
                       3: "privacy ledger failed verification",
                       4: "global model from fewer trained sites than this site's minimum"}
#: Meta of a site's result: one-line notes for the consortium's admin (why the site has no data, job arguments it
#: ignored), with the site's own paths replaced by <site path>.
SITE_NOTES_META = "fedbrain_site_notes"
#: Meta of a global model: how many sites trained the round it came from (None: the initial model).
TRAINED_SITES_META = "fedbrain_trained_sites"
#: DXO meta key of the client-level DP filter: the epsilon its noise has bought this job so far.
CLIENT_DP_EPSILON_META = "client_dp_epsilon"
#: Secure aggregation (fedbrain.secagg): the one array of a masked update, its layout ([[name, shape], ...]), the
#: aggregation weight it was scaled by, and the meta key of the setup/unmask messages; the extra tasks' names.
SECAGG_MASKED = "fedbrain_secagg_masked"
SECAGG_LAYOUT_META = "fedbrain_secagg_layout"
SECAGG_WEIGHT_META = "fedbrain_secagg_weight"
SECAGG_MESSAGE_META = "fedbrain_secagg_message"
SECAGG_TASKS = ("secagg_advertise", "secagg_share", "secagg_deliver", "secagg_unmask")


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

#: The server log line (written by the update audit) that carries a site's round metrics to
#: anyone allowed to read the server's job log (``fedbrain watch``).
SITE_METRICS_LOG_TAG = "fedbrain-site-metrics"
#: Starts the server log line of each closed round (fedbrain.fl.resilient writes it; `fedbrain watch` and
#: the fault harness read it).
ROUND_LOG_TAG = "fedbrain-round"
#: Starts the server update guard's log lines (fedbrain.aggregation.aggregator).
GUARD_LOG_TAG = "update guard"

#: Filters a site's privacy.json scopes name (fedbrain.ops.builder writes them; jobs use the same classes).
PRIVACY_FILTERS = {
    "clip": "fedbrain.privacy.client_dp.UpdateNormClip",
    "client_dp": "fedbrain.privacy.client_dp.ClientLevelDP",
    "require_encryption": "fedbrain.filters.require_encryption.RequireEncryption",
}


# ---------------------------------------------------------------------- record files
# What the server writes into the job's workspace (so they travel with the downloaded result), named once:
# the components that write them and the report that reads them import these.
#: Header of the error reply a site sends instead of a result its final check refused: the one-line reason.
REFUSED_HEADER = "fedbrain_refused"
AUDIT_FILE = "received_updates.jsonl"  # fedbrain.filters.audit: every update as it arrived (names, shapes, bytes)
GUARD_FILE = "update_guard.jsonl"  # fedbrain.aggregation.aggregator: refusals, flags, the method per round
ROUND_FILE = "round_contributions.jsonl"  # fedbrain.fl.resilient: who was asked, who answered, why a round closed
HE_AGGREGATION_FILE = "he_aggregation.jsonl"  # fedbrain.filters.he: the encrypted sum's timing per round
CHECKPOINT_NOTE = "fedbrain_checkpoint.json"  # fedbrain.fl.resilient: the round of the last saved global model
