"""The BraTS challenges' second metric beside Dice: the 95th-percentile Hausdorff distance (HD95) per region, in mm,
with MONAI's maintained implementation; and how fast a federation converges (FeTS-style).

HD95 follows the challenges' conventions for empty masks: a case whose ground truth has no voxel of a region does not
count towards that region (as Dice's ``ignore_empty``); a prediction with no voxel where the ground truth has some
scores the volume's diagonal, the worst possible distance (BraTS uses 373.13 mm, its volume's diagonal).
"""

from __future__ import annotations

import math
import warnings

import torch


def volume_diagonal_mm(shape, spacing) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def hd95(pred: torch.Tensor, gt: torch.Tensor, spacing) -> float:
    """HD95 in mm between two binary masks of one region (spatial dims only); NaN when ``gt`` is empty."""
    from monai.metrics import compute_hausdorff_distance

    pred, gt = pred.bool(), gt.bool()
    if not gt.any():
        return float("nan")
    if not pred.any():
        return volume_diagonal_mm(gt.shape, spacing)
    # Surface distances depend only on where the two masks lie relative to each other: the box around both (one
    # voxel of margin, so a mask touching the box still has its border) gives the same distances, ~10x faster.
    both = (pred | gt).nonzero()
    lo, hi = (both.min(0).values - 1).clamp(min=0), both.max(0).values + 2
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    pred, gt = pred[box], gt[box]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(pred[None, None].float(), gt[None, None].float(), percentile=95,
                                           spacing=[float(s) for s in spacing])
    return float(value.reshape(-1)[0])


class RegionHD95:
    """Mean HD95 per region over the cases seen (cases without a region's ground truth do not count)."""

    def __init__(self, n_regions: int, spacing):
        self.spacing = tuple(float(s) for s in spacing)
        self.sums, self.counts = [0.0] * n_regions, [0] * n_regions

    def add(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """``pred``, ``gt``: (batch, region, *spatial) binary masks."""
        for b in range(pred.shape[0]):
            for c in range(pred.shape[1]):
                value = hd95(pred[b, c].cpu(), gt[b, c].cpu(), self.spacing)
                if not math.isnan(value):
                    self.sums[c] += value
                    self.counts[c] += 1

    def means(self) -> list[float]:
        return [s / n if n else float("nan") for s, n in zip(self.sums, self.counts)]


def convergence_score(curve: list[tuple[float, float]], end: float) -> float | None:
    """Area under a validation curve over wall time, divided by that time (FeTS-style): ``curve`` is
    ``(time the value was measured, value)`` per round, each value held until the next; ``end`` the job's end.
    1.0 would be the final quality from the first second; a federation that gets there sooner scores higher."""
    points = sorted((float(t), float(v)) for t, v in curve if v is not None and not math.isnan(float(v)))
    if not points or end <= points[0][0]:
        return None
    area = 0.0
    for (t, v), (t_next, _) in zip(points, points[1:] + [(end, None)]):
        area += v * max(0.0, min(t_next, end) - t)
    return area / (end - points[0][0])
