"""HD95 and the convergence score (fedbrain.tasks.seg_metrics) on cases small enough to compute by hand."""

import math

import pytest
import torch

from fedbrain.tasks.seg_metrics import RegionHD95, convergence_score, hd95, volume_diagonal_mm


def _mask(shape, *voxels):
    m = torch.zeros(shape, dtype=torch.bool)
    for v in voxels:
        m[v] = True
    return m


def test_hd95_of_one_voxel_moved_is_the_move_in_mm():
    """Ground truth one voxel at (4, 4, 4); prediction at (4, 4, 7) on a 2 x 2 x 3 mm grid: 3 voxels along z = 9 mm."""
    shape = (10, 10, 10)
    assert hd95(_mask(shape, (4, 4, 7)), _mask(shape, (4, 4, 4)), (2.0, 2.0, 3.0)) == pytest.approx(9.0)
    assert hd95(_mask(shape, (4, 4, 4)), _mask(shape, (4, 4, 4)), (2.0, 2.0, 3.0)) == pytest.approx(0.0)


def test_empty_ground_truth_does_not_count_and_an_empty_prediction_scores_the_diagonal():
    shape, spacing = (10, 20, 5), (1.0, 2.0, 3.0)
    assert math.isnan(hd95(_mask(shape, (1, 1, 1)), _mask(shape), spacing))
    diagonal = math.sqrt(10 ** 2 + 40 ** 2 + 15 ** 2)
    assert volume_diagonal_mm(shape, spacing) == pytest.approx(diagonal)
    assert hd95(_mask(shape), _mask(shape, (1, 1, 1)), spacing) == pytest.approx(diagonal)
    acc = RegionHD95(2, spacing)
    pred = torch.stack([_mask(shape, (2, 2, 2)), _mask(shape)])[None]  # region 0: 1 voxel off; region 1: nothing
    gt = torch.stack([_mask(shape, (3, 2, 2)), _mask(shape)])[None]
    acc.add(pred, gt)
    assert acc.means()[0] == pytest.approx(1.0) and math.isnan(acc.means()[1])


def test_convergence_score_is_the_time_weighted_mean_of_the_curve():
    # 0.2 for the first 10 s, 0.8 for the next 30 s: (0.2 * 10 + 0.8 * 30) / 40 = 0.65
    assert convergence_score([(0, 0.2), (10, 0.8)], end=40) == pytest.approx(0.65)
    # the same final quality reached sooner scores higher
    assert convergence_score([(0, 0.2), (5, 0.8)], end=40) > convergence_score([(0, 0.2), (30, 0.8)], end=40)
    assert convergence_score([(0, None), (10, float("nan"))], end=40) is None
