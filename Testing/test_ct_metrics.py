"""CT detection metrics (METHODS.md section 4): 3D lesion matching, largest diameter, size strata, FROC + bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import rotation

from DiffusionAnomalyLib.metrics import (
    DIAMETER_STRATA_MM,
    diameter_strata_names,
    froc_bootstrap,
    froc_curve,
    largest_diameter_mm,
    lesion_diameters_mm,
    match_labels,
    match_lesions,
    recall_by_size,
    sensitivity_at,
)
from DiffusionAnomalyLib.volume import ijk_to_ras_matrix


# ---- largest diameter ------------------------------------------------------------------------------
def test_feret_diameter_of_a_rod_on_any_grid():
    rod = np.zeros((6, 6, 30), bool)
    rod[2, 3, 5:25] = True  # 20 voxels along i
    assert largest_diameter_mm(rod, spacing=(1.0, 1.0, 1.0)) == pytest.approx(20.0)
    assert largest_diameter_mm(rod, spacing=(3.0, 1.5, 0.8)) == pytest.approx(16.0)  # 20 x 0.8 mm (face to face)
    oblique = ijk_to_ras_matrix((0.8, 1.5, 3.0), (-20.0, 7.0, 31.0), rotation((1.0, -2.0, 0.5), 37.0))
    assert largest_diameter_mm(rod, oblique) == pytest.approx(16.0)  # rotation and origin change nothing
    single = np.zeros((3, 3, 3), bool)
    single[1, 1, 1] = True
    assert largest_diameter_mm(single, spacing=(3.0, 1.5, 1.5)) == pytest.approx(3.0)


def test_feret_diameter_of_a_sphere():
    k, j, i = np.mgrid[:30, :60, :60]
    # a 40 mm sphere drawn on a 1.5 x 1.5 x 3 mm CT grid (voxels whose centres lie within 20 mm)
    sphere = ((k - 15) * 3.0) ** 2 + ((j - 30) * 1.5) ** 2 + ((i - 30) * 1.5) ** 2 <= 20.0 ** 2
    d = largest_diameter_mm(sphere, spacing=(3.0, 1.5, 1.5))
    assert 40.0 <= d <= 43.0  # between d and d + one voxel
    matrix = ijk_to_ras_matrix((1.5, 1.5, 3.0), (0, 0, 0), np.diag([-1.0, -1.0, 1.0]))
    assert largest_diameter_mm(sphere, matrix) == pytest.approx(d)
    labels = sphere.astype(np.uint8) * 2  # label 1 has no voxels
    diameters = lesion_diameters_mm(labels, matrix, n=3)
    assert math.isnan(diameters[0]) and diameters[1] == pytest.approx(d) and math.isnan(diameters[2])


def test_diameter_refusals():
    with pytest.raises(ValueError, match="empty"):
        largest_diameter_mm(np.zeros((3, 3, 3), bool), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        largest_diameter_mm(np.ones((3, 3, 3), bool), np.eye(4), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        largest_diameter_mm(np.ones((3, 3, 3), bool))
    with pytest.raises(ValueError, match="positive"):
        largest_diameter_mm(np.ones((3, 3, 3), bool), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="3D"):
        largest_diameter_mm(np.ones((3, 3), bool), spacing=(1, 1, 1))


# ---- size strata -----------------------------------------------------------------------------------
def test_strata_edges_hold_their_upper_edge():
    assert DIAMETER_STRATA_MM == (20.0, 40.0, 70.0)
    assert diameter_strata_names() == ["<= 2 cm", "2-4 cm", "4-7 cm", "> 7 cm"]
    sizes = [5.0, 20.0, 20.001, 40.0, 55.0, 70.0, 70.5, 120.0]
    found = [True, False, True, True, False, True, False, True]
    rows = recall_by_size(found, sizes)
    assert [r["bin"] for r in rows] == diameter_strata_names()
    assert [(r["lesions"], r["found"]) for r in rows] == [(2, 1), (2, 2), (2, 1), (2, 1)]  # 20 mm is <= 2 cm
    assert [r["sensitivity"] for r in rows] == [0.5, 1.0, 0.5, 0.5]
    assert math.isnan(recall_by_size([True], [10.0])[3]["sensitivity"])  # a stratum without lesions
    # the PET bins of evaluation (by radius, lower edge inclusive) are the same function
    pet = recall_by_size([True, False, True], [5.0, 4.0, 10.0], (5.0, 10.0),
                         ["r < 5 mm", "5 <= r < 10 mm", "r >= 10 mm"], right=False)
    assert [(r["lesions"], r["found"]) for r in pet] == [(1, 0), (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="one size per lesion"):
        recall_by_size([True], [1.0, 2.0])
    with pytest.raises(ValueError, match="missing"):
        recall_by_size([True], [float("nan")])


# ---- matching at IoU 0.2 ---------------------------------------------------------------------------
def test_match_labels_one_match_per_lesion_highest_iou_wins():
    truth = np.zeros((4, 10, 30), np.int32)
    truth[1:3, 2:7, 2:12] = 1  # 100 voxels
    truth[1:3, 2:7, 13:18] = 2  # 50 voxels
    pred = np.zeros_like(truth)
    pred[1:3, 2:7, 2:8] = 1  # 60 voxels in lesion 1: IoU 0.6
    pred[1:3, 2:7, 9:12] = 2  # 30 voxels in lesion 1: IoU 0.3, loses to candidate 1: a false positive
    pred[1:3, 2:4, 13:18] = 3  # 20 voxels in lesion 2: IoU 0.4
    m = match_labels(pred, truth)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 0)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0 and m["f1"] == pytest.approx(0.8)
    assert m["found"].tolist() == [True, True] and m["hit"].tolist() == [True, False, True]
    # IoU exactly 0.2 matches, just below does not
    edge = np.zeros_like(truth)
    edge[1:3, 2:7, 13:14] = 1  # 10 voxels inside lesion 2: IoU 10/50 = 0.2
    assert match_labels(edge, truth)["found"].tolist() == [False, True]
    edge[1, 2, 13] = 0  # 9/50
    assert match_labels(edge, truth)["found"].tolist() == [False, False]
    assert match_labels(edge, truth)["fp"] == 1


def test_match_labels_keeps_touching_lesions_apart_and_counts_empty_cases():
    truth = np.zeros((3, 6, 12), np.int32)
    truth[1, 2:4, 2:6] = 1
    truth[1, 2:4, 6:10] = 2  # touches lesion 1
    pred = (truth > 0).astype(np.int32)  # one candidate over both: IoU 0.5 with each
    m = match_labels(pred, truth)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)  # one match per candidate
    assert match_lesions(pred, truth > 0)["tp"] == 1  # as one mask, the two lesions are one component
    empty = np.zeros_like(truth)
    m = match_labels(empty, truth)
    assert (m["tp"], m["fp"], m["fn"], m["recall"]) == (0, 0, 2, 0.0) and math.isnan(m["precision"])
    m = match_labels(pred, empty)
    assert (m["fp"], m["precision"]) == (1, 0.0) and math.isnan(m["recall"])
    assert match_labels(pred, truth, n_truth=3)["fn"] == 2  # a third lesion without voxels is missed
    with pytest.raises(ValueError, match="same grid"):
        match_labels(pred[:, :, :-1], truth)
    with pytest.raises(ValueError, match="iou_threshold"):
        match_labels(pred, truth, iou_threshold=0.0)


# ---- FROC and its bootstrap ------------------------------------------------------------------------
def test_froc_curve_by_hand():
    scores = [[0.9, 0.4], [0.8, 0.7, 0.1]]
    hits = [[True, False], [False, True, False]]
    curve = froc_curve(scores, hits, [1, 2])
    assert curve["thresholds"].tolist() == [0.9, 0.8, 0.7, 0.4, 0.1]
    assert curve["sensitivity"].tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert curve["false_positives_per_scan"].tolist() == [0.0, 0.5, 0.5, 1.0, 1.5]
    assert sensitivity_at(curve["false_positives_per_scan"], curve["sensitivity"], 0.5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at most as many hits as lesions"):
        froc_curve([[0.5, 0.6]], [[True, True]], [1])
    with pytest.raises(ValueError, match="each case"):
        froc_curve([[0.5]], [[True], [False]], [1])


def _cases(n: int, seed: int):
    rng = np.random.default_rng(seed)
    scores, hits, lesions = [], [], []
    for _ in range(n):
        k = int(rng.integers(0, 3))
        hit = rng.random(k) < 0.7
        s = np.where(hit, rng.uniform(0.4, 1.0, k), 0.0)
        fp = int(rng.integers(0, 4))
        scores.append(np.concatenate([s[hit], rng.uniform(0.0, 0.8, fp)]))
        hits.append(np.concatenate([np.ones(int(hit.sum()), bool), np.zeros(fp, bool)]))
        lesions.append(k)
    return scores, hits, lesions


def test_bootstrap_is_deterministic_and_contains_the_estimate():
    scores, hits, lesions = _cases(30, 0)
    limits = [0.5, 1.0, 2.0, 4.0]
    a = froc_bootstrap(scores, hits, lesions, limits, n_resamples=300, seed=7)
    b = froc_bootstrap(scores, hits, lesions, limits, n_resamples=300, seed=7)
    assert a == b
    c = froc_bootstrap(scores, hits, lesions, limits, n_resamples=300, seed=8)
    assert c["low"] != a["low"] or c["high"] != a["high"]
    assert c["sensitivity"] == a["sensitivity"]  # the estimate does not depend on the resampling
    curve = froc_curve(scores, hits, lesions)
    for lim, sens, lo, hi in zip(limits, a["sensitivity"], a["low"], a["high"]):
        assert sens == sensitivity_at(curve["false_positives_per_scan"], curve["sensitivity"], lim)
        assert lo <= sens <= hi and lo < hi
    assert (a["cases"], a["lesions"], a["n_resamples"], a["seed"], a["confidence"]) == (30, sum(lesions), 300, 7, 0.95)


def test_bootstrap_without_lesions_and_refusals():
    r = froc_bootstrap([[0.3], []], [[False], []], [0, 0], [1.0], n_resamples=20)
    assert all(math.isnan(v) for v in r["sensitivity"] + r["low"] + r["high"])
    one = froc_bootstrap([[0.3]], [[True]], [1], [1.0], n_resamples=20)  # one case: a zero-width interval
    assert one["sensitivity"] == one["low"] == one["high"] == [1.0]
    with pytest.raises(ValueError, match="confidence level"):
        froc_bootstrap([[0.3]], [[True]], [1], [1.0], confidence=95)
    with pytest.raises(ValueError, match="bootstrap resamples"):
        froc_bootstrap([[0.3]], [[True]], [1], [1.0], n_resamples=0)
    with pytest.raises(ValueError, match="each case"):
        froc_bootstrap([], [], [], [1.0])
