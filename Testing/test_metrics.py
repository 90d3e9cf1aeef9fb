"""Tests for DiffusionAnomalyLib.metrics against independent implementations.

References: scipy's Dice dissimilarity and SimpleITK's LabelOverlapMeasuresImageFilter (Dice),
sklearn's average_precision_score (AUPRC) and f1_score (optimal Dice), MONAI's
compute_hausdorff_distance, SimpleITK LabelContour + brute-force pairwise distances and scipy's
directed_hausdorff (HD95), scipy.ndimage.label and hand-built cases with known answers (lesion
detection). The library calls metrics.py makes are kept here as regression oracles.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage
from scipy.spatial.distance import cdist, directed_hausdorff
from scipy.spatial.distance import dice as scipy_dice_dissimilarity
from skimage.segmentation import find_boundaries
from sklearn.metrics import average_precision_score, f1_score

from DiffusionAnomalyLib.metrics import (
    auprc,
    detection_sensitivity,
    dice,
    hd95,
    match_lesions,
    optimal_dice,
    scale_to_unit,
    sensitivity,
)

SEEDS = [0, 1, 2, 3, 4]
SHAPES = [(32, 32), (24, 40), (12, 14, 16)]


# ------------------------------------------------------------------------------------------
# random inputs
# ------------------------------------------------------------------------------------------
def blob_mask(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 2.0, frac: float = 0.15) -> np.ndarray:
    """Random blobby mask: smoothed noise above its (1-frac) quantile (several components)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1.0 - frac)


def noisy_map(rng: np.random.Generator, truth: np.ndarray, noise: float = 0.7) -> np.ndarray:
    """Anomaly map correlated with the truth: smoothed truth plus Gaussian noise."""
    return ndimage.gaussian_filter(truth.astype(float), 1.0) + noise * rng.random(truth.shape)


def random_pair(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A (pred, truth) pair of related random blob masks."""
    rng = np.random.default_rng(seed)
    truth = blob_mask(rng, shape)
    pred = ndimage.gaussian_filter(truth.astype(float), 1.5) + 0.6 * ndimage.gaussian_filter(
        rng.standard_normal(shape), 1.5
    ) > 0.5
    return pred, truth


# ------------------------------------------------------------------------------------------
# independent references
# ------------------------------------------------------------------------------------------
def ref_dice_scipy(p: np.ndarray, t: np.ndarray) -> float:
    """1 - scipy's Dice dissimilarity (only for masks that are not both empty)."""
    return 1.0 - float(scipy_dice_dissimilarity(p.ravel(), t.ravel()))


def ref_dice_sitk(p: np.ndarray, t: np.ndarray) -> float:
    """SimpleITK's Dice coefficient of label 1."""
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(sitk.GetImageFromArray(t.astype(np.uint8)), sitk.GetImageFromArray(p.astype(np.uint8)))
    return float(f.GetDiceCoefficient(1))


def ref_contour_points(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Physical coordinates of face-connected contour voxels from SimpleITK LabelContour.

    The mask is zero-padded first so the image border counts as background (LabelContour on its
    own would not mark voxels touching the image edge).
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    contour = sitk.GetArrayFromImage(
        sitk.LabelContour(sitk.GetImageFromArray(padded), fullyConnected=False, backgroundValue=0)
    ).astype(bool)
    inner = contour[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.argwhere(inner) * np.asarray(spacing, dtype=float)


def ref_directed_distances(
    p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brute-force directed boundary distances p->t and t->p (cdist over all contour-point pairs)
    and both point sets."""
    pp = ref_contour_points(p, spacing)
    tt = ref_contour_points(t, spacing)
    d = cdist(pp, tt)
    return d.min(axis=1), d.min(axis=0), pp, tt


def ref_hd95(p: np.ndarray, t: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """Reference HD95 from SimpleITK contours and brute-force distances: max of the directed P95s."""
    spacing = spacing or (1.0,) * p.ndim
    p_to_t, t_to_p, _, _ = ref_directed_distances(p, t, spacing)
    return float(max(np.percentile(p_to_t, 95), np.percentile(t_to_p, 95)))


def ref_hd95_pooled(p: np.ndarray, t: np.ndarray) -> float:
    """The other HD95 definition (this module's before issue 6): P95 of both directed sets pooled."""
    p_to_t, t_to_p, _, _ = ref_directed_distances(p, t, (1.0,) * p.ndim)
    return float(np.percentile(np.concatenate([p_to_t, t_to_p]), 95))


def monai_hd(p: np.ndarray, t: np.ndarray, spacing=None, percentile: float | None = 95) -> float:
    """MONAI's Hausdorff distance of two masks (one batch item, one channel)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = compute_hausdorff_distance(
            p[None, None], t[None, None], include_background=True, percentile=percentile, spacing=spacing
        )
    return float(out[0, 0])


#: MONAI computes surface distances in float32.
HD_REL = 1e-6


def ref_detection_tp(pred: np.ndarray, truth: np.ndarray, connectivity: int, thr: float = 0.5) -> tuple[int, int]:
    """Criterion 2 for IoU threshold >= 0.5 with scipy labels: lesions whose best IoU >= thr."""
    structure = ndimage.generate_binary_structure(truth.ndim, connectivity)
    lt, n_t = ndimage.label(truth, structure=structure)
    lp, n_p = ndimage.label(pred, structure=structure)
    tp = 0
    for i in range(1, n_t + 1):
        gi = lt == i
        best = 0.0
        for j in range(1, n_p + 1):
            pj = lp == j
            inter = np.logical_and(gi, pj).sum()
            if inter:
                best = max(best, inter / np.logical_or(gi, pj).sum())
        tp += best >= thr
    return int(tp), int(n_t)


def ref_greedy_match(pred: np.ndarray, truth: np.ndarray, connectivity: int, thr: float) -> tuple[int, int, int]:
    """Plain-Python greedy one-to-one matching (highest IoU first) on scipy labels: (tp, n_pred, n_truth)."""
    structure = ndimage.generate_binary_structure(truth.ndim, connectivity)
    lt, n_t = ndimage.label(truth, structure=structure)
    lp, n_p = ndimage.label(pred, structure=structure)
    pairs = []
    for i in range(1, n_t + 1):
        for j in range(1, n_p + 1):
            a, b = lt == i, lp == j
            inter = np.logical_and(a, b).sum()
            if inter:
                iou = inter / np.logical_or(a, b).sum()
                if iou >= thr:
                    pairs.append((iou, i, j))
    pairs.sort(key=lambda x: -x[0])
    used_t, used_p, tp = set(), set(), 0
    for _, i, j in pairs:
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            tp += 1
    return tp, int(n_p), int(n_t)


# ------------------------------------------------------------------------------------------
# dice
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_dice_matches_scipy_and_sitk(seed: int, shape: tuple[int, ...]) -> None:
    pred, truth = random_pair(seed, shape)
    assert pred.any() and truth.any() and not np.array_equal(pred, truth)
    got = dice(pred, truth)
    assert 0.0 < got < 1.0
    assert got == pytest.approx(ref_dice_scipy(pred, truth), abs=1e-12)
    assert got == pytest.approx(ref_dice_sitk(pred, truth), abs=1e-6)
    exact = 2.0 * int((pred & truth).sum()) / (int(pred.sum()) + int(truth.sum()))
    assert got == pytest.approx(exact, rel=1e-15, abs=0)  # the formula, to within one ulp


def test_dice_edge_cases() -> None:
    empty = np.zeros((8, 8), bool)
    full = np.ones((8, 8), bool)
    one = empty.copy()
    one[3, 4] = True
    assert dice(empty, empty) == 1.0
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0
    assert dice(full, full) == 1.0
    assert dice(one, one) == 1.0
    assert dice(one, full) == pytest.approx(2 / 65)
    assert dice(one, full) == pytest.approx(ref_dice_scipy(one, full))
    # Numeric masks: nonzero is lesion.
    assert dice(one.astype(np.uint8) * 3, one) == 1.0


# ------------------------------------------------------------------------------------------
# optimal dice
# ------------------------------------------------------------------------------------------
def ref_optimal_dice(amap: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Brute force with sklearn f1_score (== Dice for binary masks) at each threshold 0.1..0.9."""
    lo, hi = amap.min(), amap.max()
    scaled = np.zeros_like(amap, dtype=float) if hi == lo else (amap - lo) / (hi - lo)
    best, best_t = -1.0, None
    for k in range(1, 10):
        th = k / 10
        d = f1_score(truth.ravel(), (scaled >= th).ravel(), zero_division=1.0)
        if d > best + 1e-12:
            best, best_t = d, th
    return float(best), float(best_t)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_optimal_dice_matches_bruteforce_f1(seed: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(100 + seed)
    truth = blob_mask(rng, shape)
    amap = noisy_map(rng, truth) * 7.0 - 2.0  # arbitrary affine range: scaling must undo it
    got_d, got_t = optimal_dice(amap, truth)
    ref_d, ref_t = ref_optimal_dice(amap, truth)
    assert got_d == pytest.approx(ref_d, abs=1e-12)
    assert got_t == ref_t
    assert 0.0 < got_d < 1.0
    assert got_d == dice(scale_to_unit(amap) >= got_t, truth)  # the same Dice as dice()


def test_optimal_dice_quantised_map_hits_exact_threshold_and_ties_pick_smallest() -> None:
    # Values k/10 land exactly on the thresholds; np.arange gives 0.30000000000000004, which
    # would exclude the 0.3 pixels without rounding.
    amap = np.tile(np.arange(11, dtype=float), (4, 1))  # scaled: 0.0, 0.1, ..., 1.0
    truth = amap >= 3
    d, t = optimal_dice(amap, truth)
    assert (d, t) == (1.0, 0.3)
    # Raw np.arange thresholds passed explicitly are rounded too.
    assert optimal_dice(amap, truth, thresholds=np.arange(0.1, 1.0, 0.1)) == (1.0, 0.3)
    truth7 = amap >= 7
    assert optimal_dice(amap, truth7) == (1.0, 0.7)
    # Tie: a two-valued map gives the same prediction for every threshold -> smallest (0.1).
    binary = np.zeros((6, 6))
    binary[2:4, 2:4] = 5.0
    assert optimal_dice(binary, binary > 0) == (1.0, 0.1)
    # Custom thresholds, unordered: result still the smallest tied one.
    assert optimal_dice(binary, binary > 0, thresholds=[0.8, 0.25, 0.5]) == (1.0, 0.25)


def test_optimal_dice_constant_map_and_empty_truth() -> None:
    const = np.full((5, 5), 3.3)
    truth = np.zeros((5, 5), bool)
    # Constant map scales to zeros -> prediction empty at every threshold > 0.
    assert optimal_dice(const, truth) == (1.0, 0.1)
    truth[1, 1] = True
    assert optimal_dice(const, truth) == (0.0, 0.1)
    np.testing.assert_array_equal(scale_to_unit(const), np.zeros((5, 5)))


# ------------------------------------------------------------------------------------------
# hd95
# ------------------------------------------------------------------------------------------
def test_reference_contours_agree_with_skimage_find_boundaries() -> None:
    # Sanity check of the reference itself: two independent boundary extractors agree.
    rng = np.random.default_rng(7)
    for shape in SHAPES:
        m = blob_mask(rng, shape, frac=0.3)
        fb = find_boundaries(np.pad(m, 1), mode="inner", connectivity=1)
        fb = fb[tuple(slice(1, -1) for _ in shape)]
        np.testing.assert_array_equal(np.argwhere(fb), ref_contour_points(m, (1.0,) * m.ndim).astype(int))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_hd95_matches_sitk_contour_bruteforce(seed: int, shape: tuple[int, ...]) -> None:
    pred, truth = random_pair(200 + seed, shape)
    got = hd95(pred, truth)
    ref = ref_hd95(pred, truth)
    assert got == pytest.approx(ref, rel=HD_REL, abs=1e-9)
    assert got > 0.0
    assert hd95(truth, pred) == got  # symmetric


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_hd95_is_monais_hausdorff_percentile_95(seed: int, shape: tuple[int, ...]) -> None:
    # Regression oracle: the library call metrics.hd95 makes, with and without spacing.
    pred, truth = random_pair(250 + seed, shape)
    spacing = tuple(0.7 + 0.6 * i for i in range(len(shape)))
    assert hd95(pred, truth) == monai_hd(pred, truth)
    assert hd95(pred, truth, spacing=spacing) == monai_hd(pred, truth, spacing=list(spacing))


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_hd95_with_anisotropic_spacing(seed: int) -> None:
    pred, truth = random_pair(300 + seed, (10, 12, 14))
    spacing = (3.0, 0.8, 1.25)
    got = hd95(pred, truth, spacing=spacing)
    assert got == pytest.approx(ref_hd95(pred, truth, spacing), rel=HD_REL, abs=1e-9)
    # Spacing really matters here (the pixel-unit answer differs).
    assert got != pytest.approx(hd95(pred, truth))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_monai_boundaries_are_face_connected_contours_with_the_border_as_background(
    seed: int, shape: tuple[int, ...]
) -> None:
    # MONAI's Hausdorff distance (no percentile) equals scipy's symmetric directed Hausdorff of the
    # SimpleITK contour points: MONAI's boundary is the contour convention the docstring names.
    pred, truth = random_pair(400 + seed, shape)
    pred[0, :] = True  # touch the image border
    spacing = tuple(1.0 + 0.5 * i for i in range(len(shape)))
    _, _, pp, tt = ref_directed_distances(pred, truth, spacing)
    hausdorff = max(directed_hausdorff(pp, tt)[0], directed_hausdorff(tt, pp)[0])
    assert monai_hd(pred, truth, spacing=list(spacing), percentile=None) == pytest.approx(hausdorff, rel=HD_REL)
    assert hd95(pred, truth, spacing=spacing) == pytest.approx(ref_hd95(pred, truth, spacing), rel=HD_REL)


def test_hd95_is_the_larger_directed_percentile_not_the_pooled_one() -> None:
    # A point at the left end of a 10-pixel line. point -> line: {0}, P95 = 0;
    # line -> point: {0, 1, ..., 9}, P95 = 0.95 * 9 = 8.55 (linear interpolation).
    # HD95 = max(0, 8.55) = 8.55. Pooling both sets, {0, 0, 1, ..., 9}, would give 8.5.
    point = np.zeros((9, 16), bool)
    point[4, 4] = True
    line = np.zeros((9, 16), bool)
    line[4, 4:14] = True
    assert hd95(point, line) == pytest.approx(8.55, rel=HD_REL)
    assert hd95(line, point) == pytest.approx(8.55, rel=HD_REL)
    assert ref_hd95_pooled(point, line) == pytest.approx(8.5)
    # With 2 mm columns every distance doubles.
    assert hd95(point, line, spacing=(1.0, 2.0)) == pytest.approx(17.1, rel=HD_REL)
    # Squares 4x4 and 6x6 sharing the top-left corner (boundaries of 12 and 20 pixels).
    # small -> large: seven 0, two 1, three 2; P95 (index 0.95 * 11 = 10.45) = 2.
    # large -> small: seven 0, two 1, eight 2, two sqrt(5), one sqrt(8);
    # P95 (index 0.95 * 19 = 18.05) = sqrt(5) + 0.05 * (sqrt(8) - sqrt(5)) = 2.26569.
    # Pooled (index 0.95 * 31 = 29.45 lands between the two sqrt(5)) it would be sqrt(5) = 2.23607.
    small = np.zeros((10, 10), bool)
    small[0:4, 0:4] = True
    large = np.zeros((10, 10), bool)
    large[0:6, 0:6] = True
    expected = math.sqrt(5) + 0.05 * (math.sqrt(8) - math.sqrt(5))
    assert hd95(small, large) == pytest.approx(expected, rel=HD_REL)
    assert ref_hd95(small, large) == pytest.approx(expected)
    assert ref_hd95_pooled(small, large) == pytest.approx(math.sqrt(5))


def test_hd95_known_values_and_edge_cases() -> None:
    empty = np.zeros((9, 9), bool)
    full = np.ones((9, 9), bool)
    a = empty.copy()
    a[4, 4] = True
    b = empty.copy()
    b[4, 7] = True
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    assert hd95(a, a) == 0.0
    assert hd95(full, full) == 0.0
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(a, empty))
    assert math.isnan(hd95(empty, a))
    # Full mask: its boundary is the image frame; matches the reference.
    assert hd95(full, a) == pytest.approx(ref_hd95(full, a), rel=HD_REL)
    # Shifted squares: every boundary distance is at most the shift.
    sq = empty.copy()
    sq[2:6, 2:6] = True
    sh = np.roll(sq, 2, axis=1)
    assert hd95(sq, sh) == pytest.approx(ref_hd95(sq, sh), rel=HD_REL)
    assert 0.0 < hd95(sq, sh) <= 2.0


def test_hd95_raises_no_library_warnings() -> None:
    pred, truth = random_pair(0, (16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hd95(pred, truth)
        hd95(pred, np.zeros_like(truth))  # one empty: NaN without MONAI's empty-mask warning
        hd95(np.zeros_like(pred), np.zeros_like(truth))


# ------------------------------------------------------------------------------------------
# auprc
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_auprc_matches_sklearn(seed: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(500 + seed)
    truth = blob_mask(rng, shape)
    amap = noisy_map(rng, truth)
    got = auprc(amap, truth)
    ref = average_precision_score(truth.ravel(), amap.ravel())
    assert got == pytest.approx(ref, rel=1e-12)
    assert truth.mean() < got < 1.0


@pytest.mark.parametrize("levels", [2, 3, 5, 10])
@pytest.mark.parametrize("seed", SEEDS)
def test_auprc_with_ties_matches_sklearn(seed: int, levels: int) -> None:
    rng = np.random.default_rng(600 + seed)
    truth = blob_mask(rng, (30, 30), frac=0.2)
    amap = np.floor(noisy_map(rng, truth, noise=1.0) * levels) / levels  # heavily tied
    assert np.unique(amap).size <= 2 * levels + 1
    got = auprc(amap, truth)
    ref = average_precision_score(truth.ravel(), amap.ravel())
    assert got == pytest.approx(ref, rel=1e-12)


def test_auprc_edge_cases() -> None:
    truth = np.zeros((6, 6), bool)
    truth[1:3, 1:3] = True
    assert auprc(truth.astype(float), truth) == pytest.approx(1.0)
    # Constant map: one threshold, precision = prevalence.
    assert auprc(np.full((6, 6), 0.2), truth) == pytest.approx(4 / 36)
    # Inverted map: positives ranked last.
    inv = 1.0 - truth.astype(float)
    assert auprc(inv, truth) == pytest.approx(average_precision_score(truth.ravel(), inv.ravel()))
    assert auprc(inv, truth) < 0.2
    assert math.isnan(auprc(np.random.default_rng(0).random((6, 6)), np.zeros((6, 6), bool)))
    full = np.ones((6, 6), bool)
    assert auprc(np.random.default_rng(0).random((6, 6)), full) == pytest.approx(1.0)
    single = np.zeros((6, 6), bool)
    single[5, 0] = True
    m = np.random.default_rng(1).random((6, 6))
    assert auprc(m, single) == pytest.approx(average_precision_score(single.ravel(), m.ravel()))


# ------------------------------------------------------------------------------------------
# lesion detection
# ------------------------------------------------------------------------------------------
def two_lesion_case() -> tuple[np.ndarray, np.ndarray]:
    """Lesion A (10 px) hit with IoU 0.6, lesion B (10 px) hit with IoU 0.3."""
    truth = np.zeros((16, 12), bool)
    pred = np.zeros_like(truth)
    truth[2:4, 2:7] = True  # A
    pred[2:4, 2:5] = True  # 6 px inside A -> IoU 6/10
    truth[10:12, 2:7] = True  # B
    pred[10, 2:5] = True  # 3 px inside B -> IoU 3/10
    return pred, truth


def test_detection_two_lesions_iou_06_and_03() -> None:
    pred, truth = two_lesion_case()
    assert detection_sensitivity(pred, truth) == (1, 2)
    assert detection_sensitivity(pred, truth, iou_threshold=0.3) == (2, 2)
    assert detection_sensitivity(pred, truth, iou_threshold=0.61) == (0, 2)
    assert sensitivity(*detection_sensitivity(pred, truth)) == 0.5
    r = match_lesions(pred, truth)  # IoU >= 0.2: both found
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)
    assert r["precision"] == r["recall"] == r["f1"] == 1.0
    r = match_lesions(pred, truth, iou_threshold=0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
    assert r["precision"] == r["recall"] == r["f1"] == 0.5


def test_detection_prediction_merging_two_lesions() -> None:
    truth = np.zeros((8, 12), bool)
    truth[2:5, 1:4] = True  # 9 px
    truth[2:5, 5:8] = True  # 9 px, one column apart
    pred = np.zeros_like(truth)
    pred[2:5, 1:8] = True  # 21 px covering both: IoU 9/21 with each
    assert detection_sensitivity(pred, truth) == (0, 2)
    assert detection_sensitivity(pred, truth, iou_threshold=0.4) == (1, 2)  # one match only
    r = match_lesions(pred, truth)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 1)
    assert r["precision"] == 1.0 and r["recall"] == 0.5
    assert r["f1"] == pytest.approx(2 / 3)


def test_detection_highest_iou_wins() -> None:
    truth = np.zeros((10, 10), bool)
    truth[2:6, 2:6] = True  # 16 px
    pred = np.zeros_like(truth)
    pred[2:6, 2:4] = True  # A: 8 px inside, IoU 8/16 = 0.5
    pred[2:6, 5:7] = True  # B: 4 of 8 px inside, IoU 4/20 = 0.2 (column 4 separates A and B)
    r = match_lesions(pred, truth, iou_threshold=0.1, connectivity=1)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    assert r["precision"] == 0.5 and r["recall"] == 1.0
    # Exactly 0.5 counts (>=) under criterion 2; B alone at 0.2 does not.
    assert detection_sensitivity(pred, truth) == (1, 1)
    assert detection_sensitivity(pred & (np.arange(10) >= 5), truth) == (0, 1)
    assert match_lesions(pred & (np.arange(10) >= 5), truth)["tp"] == 1


def test_detection_greedy_one_to_one() -> None:
    truth = np.zeros((4, 12), bool)
    pred = np.zeros_like(truth)
    truth[0, 0:10] = True  # T1, 10 px
    truth[2, 0:10] = True  # T2, 10 px (row 1 separates them)
    pred[0, 0:4] = True  # P1: 4 px over T1 ...
    pred[1, 0] = True  # ... a background bridge ...
    pred[2, 0:6] = True  # ... and 6 px over T2; |P1| = 11
    pred[2, 7:10] = True  # P2: 3 px over T2, separate from P1
    # IoU(P1,T1) = 4/17, IoU(P1,T2) = 6/15 = 0.4, IoU(P2,T2) = 3/10.
    # Greedy by highest IoU takes P1-T2 first; T1 (only P1) and P2 (only T2) stay unmatched.
    # (Matching lesion by lesion in label order would give 2 TPs instead.)
    got = match_lesions(pred, truth, iou_threshold=0.2, connectivity=1)
    assert (got["tp"], got["fp"], got["fn"]) == (1, 1, 1)
    assert ref_greedy_match(pred, truth, 1, 0.2) == (1, 2, 2)
    assert detection_sensitivity(pred, truth, iou_threshold=0.2) == (1, 2)
    assert detection_sensitivity(pred, truth, iou_threshold=0.45) == (0, 2)


def test_detection_connectivity_4_vs_8_and_3d() -> None:
    truth = np.zeros((5, 5), bool)
    truth[0, 0] = truth[1, 1] = True  # diagonal neighbours
    assert detection_sensitivity(truth, truth, connectivity=1) == (2, 2)
    assert detection_sensitivity(truth, truth, connectivity=2) == (1, 1)
    one = np.zeros_like(truth)
    one[0, 0] = True
    assert detection_sensitivity(one, truth, connectivity=1) == (1, 2)
    assert detection_sensitivity(one, truth, connectivity=2) == (1, 1)  # IoU exactly 0.5
    assert detection_sensitivity(one, truth, iou_threshold=0.51, connectivity=2) == (0, 1)
    # match_lesions defaults to full connectivity.
    r = match_lesions(truth, truth)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 0)
    r = match_lesions(truth, truth, connectivity=1)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)
    # 3D: edge- and corner-diagonal voxels.
    vol = np.zeros((3, 3, 3), bool)
    vol[0, 0, 0] = vol[0, 1, 1] = vol[2, 2, 2] = True
    assert detection_sensitivity(vol, vol, connectivity=1)[1] == 3  # 6-connectivity
    assert detection_sensitivity(vol, vol, connectivity=2)[1] == 2  # 18: edge neighbours join
    assert detection_sensitivity(vol, vol, connectivity=3)[1] == 2
    vol[1, 2, 2] = True  # (0,1,1)-(1,2,2) corner neighbours, (1,2,2)-(2,2,2) face neighbours
    assert detection_sensitivity(vol, vol, connectivity=1)[1] == 3
    assert detection_sensitivity(vol, vol, connectivity=2)[1] == 2
    assert detection_sensitivity(vol, vol, connectivity=3)[1] == 1
    with pytest.raises(ValueError, match="connectivity"):
        detection_sensitivity(truth, truth, connectivity=3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_detection_random_matches_scipy_reference(seed: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(700 + seed)
    truth = blob_mask(rng, shape, sigma=1.2, frac=0.12)
    pred = blob_mask(rng, shape, sigma=1.2, frac=0.05) | (ndimage.binary_erosion(truth) & (rng.random(shape) < 0.9))
    for conn in (1, len(shape)):
        for thr in (0.5, 0.7):
            assert detection_sensitivity(pred, truth, iou_threshold=thr, connectivity=conn) == ref_detection_tp(
                pred, truth, conn, thr
            )
        for thr in (0.1, 0.2):
            ref_tp, ref_np, ref_nt = ref_greedy_match(pred, truth, conn, thr)
            r = match_lesions(pred, truth, iou_threshold=thr, connectivity=conn)
            assert (r["tp"], r["tp"] + r["fp"], r["tp"] + r["fn"]) == (ref_tp, ref_np, ref_nt)
    # The random case is not degenerate.
    tp, n = detection_sensitivity(pred, truth)
    assert n >= 2


def test_detection_edge_cases() -> None:
    empty = np.zeros((6, 6), bool)
    les = empty.copy()
    les[2, 2] = True
    full = np.ones((6, 6), bool)
    assert detection_sensitivity(empty, les) == (0, 1)
    assert detection_sensitivity(les, empty) == (0, 0)
    assert detection_sensitivity(empty, empty) == (0, 0)
    assert detection_sensitivity(les, les) == (1, 1)
    assert detection_sensitivity(full, les) == (0, 1)  # IoU 1/36
    assert detection_sensitivity(full, full) == (1, 1)
    assert math.isnan(sensitivity(0, 0))
    assert sensitivity([1, 0, 2], [2, 1, 3]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        sensitivity(3, 2)
    r = match_lesions(empty, les)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 0, 1)
    assert math.isnan(r["precision"]) and r["recall"] == 0.0 and r["f1"] == 0.0
    r = match_lesions(les, empty)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 0)
    assert r["precision"] == 0.0 and math.isnan(r["recall"]) and r["f1"] == 0.0
    r = match_lesions(empty, empty)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 0, 0)
    assert all(math.isnan(r[k]) for k in ("precision", "recall", "f1"))
    with pytest.raises(ValueError, match="iou_threshold"):
        match_lesions(les, les, iou_threshold=0.0)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def test_shape_mismatch_names_both_shapes() -> None:
    a, b = np.zeros((4, 5), bool), np.zeros((5, 4), bool)
    for fn in (dice, hd95, auprc, optimal_dice, detection_sensitivity, match_lesions):
        with pytest.raises(ValueError) as exc:
            fn(a, b)
        assert "(4, 5)" in str(exc.value) and "(5, 4)" in str(exc.value)


def test_nan_and_bad_inputs_rejected() -> None:
    amap = np.random.default_rng(0).random((5, 5))
    truth = amap > 0.5
    amap[2, 2] = np.nan
    for fn in (auprc, optimal_dice):
        with pytest.raises(ValueError, match="NaN"):
            fn(amap, truth)
    with pytest.raises(ValueError, match="NaN"):
        dice(truth, np.where(truth, np.nan, 0.0))
    with pytest.raises(ValueError):
        dice(np.zeros(5, bool), np.zeros(5, bool))  # 1D is not a slice
    with pytest.raises(ValueError, match="spacing"):
        hd95(truth, truth, spacing=(1.0,))
    with pytest.raises(ValueError, match="thresholds"):
        optimal_dice(np.nan_to_num(amap), truth, thresholds=[])
