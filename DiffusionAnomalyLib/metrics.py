"""Evaluation metrics for anomaly maps and lesion masks (IgCONDA-PET section 3.4; thesis 5.3.2).

Everything works on 2D slices or 3D volumes given as numpy arrays: masks (bool, or numbers where
nonzero means lesion) and float anomaly maps. Slice-level metrics: Dice / optimal Dice and HD95;
pixel-level: AUPRC; lesion-level: detection sensitivity (criterion 2) and precision / recall /
F1 at an IoU threshold.

Typical per-slice evaluation, as in IgCONDA-PET section 3.4::

    dsc, t = optimal_dice(amap, truth)                 # DSC_opt and its threshold
    h = hd95(scale_to_unit(amap) >= t, truth)          # HD95 at the DSC-optimal threshold
    ap = auprc(amap, truth)
    tp, n = detection_sensitivity(scale_to_unit(amap) >= t, truth)

Aggregate Dice/HD95/AUPRC by their mean over slices (HD95 with ``np.nanmean``: it is undefined
when exactly one mask is empty); aggregate detection by pooling lesions,
``sensitivity(sum of tp, sum of n)``.

The numbers come from the field's libraries: Dice from scipy, HD95 from MONAI (the library the
reference IgCONDA-PET code is built on), AUPRC from scikit-learn, components from scikit-image
(the label contingency table is one numpy ``bincount``). This module adds input checks, the
empty-mask conventions, the lesion matching rule and the FROC read-out (:func:`sensitivity_at`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from monai.metrics import compute_hausdorff_distance
from scipy.spatial.distance import dice as _dice_dissimilarity
from skimage.measure import label as _label
from sklearn.metrics import average_precision_score

__all__ = [
    "scale_to_unit",
    "dice",
    "optimal_dice",
    "hd95",
    "auprc",
    "detection_sensitivity",
    "sensitivity",
    "match_lesions",
    "lesion_overlaps",
    "match_overlaps",
    "sensitivity_at",
]

#: Thresholds swept for DSC_opt (IgCONDA-PET section 3.4, eq. 12): 0.1, 0.2, ..., 0.9.
DEFAULT_THRESHOLDS: np.ndarray = np.round(np.arange(0.1, 1.0, 0.1), 10)

# Decimals thresholds are rounded to, so that np.arange's 0.30000000000000004 acts as 0.3.
_THRESHOLD_DECIMALS = 10


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------
def _check_array(a: np.ndarray, name: str) -> np.ndarray:
    """Return ``a`` as an ndarray after checking it is a non-empty 2D/3D array without NaN/inf."""
    arr = np.asarray(a)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D slice or a 3D volume, got an array of shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); there is nothing to evaluate.")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold booleans or numbers, got dtype {arr.dtype}.")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; fix or mask them before scoring.")
    return arr


def _check_pair(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate two arrays and require equal shapes (metrics compare them voxel by voxel)."""
    arr_a = _check_array(a, name_a)
    arr_b = _check_array(b, name_b)
    if arr_a.shape != arr_b.shape:
        raise ValueError(
            f"{name_a} has shape {arr_a.shape} but {name_b} has shape {arr_b.shape}; "
            "they must be on the same grid."
        )
    return arr_a, arr_b


def _as_mask(arr: np.ndarray) -> np.ndarray:
    """Boolean view of a validated array: nonzero is lesion (so label maps count as masks)."""
    return arr if arr.dtype == bool else arr != 0


def _masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prediction/truth pair and return both as boolean masks."""
    p, t = _check_pair(pred, truth, "pred", "truth")
    return _as_mask(p), _as_mask(t)


def _check_iou_threshold(iou_threshold: float) -> float:
    """IoU thresholds must lie in (0, 1]: at 0 every non-overlapping pair would 'match'."""
    thr = float(iou_threshold)
    if not 0.0 < thr <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}.")
    return thr


# --------------------------------------------------------------------------------------------
# slice-level: Dice, DSC_opt, HD95
# --------------------------------------------------------------------------------------------
def scale_to_unit(anomaly_map: np.ndarray) -> np.ndarray:
    """Min-max scale a map to [0, 1] (IgCONDA-PET 3.4 thresholds maps in [0, 1]); constant -> zeros.

    Written out because a constant map must give zeros (skimage's rescale_intensity returns it unchanged).
    """
    m = _check_array(anomaly_map, "anomaly_map").astype(np.float64)
    lo, hi = float(m.min()), float(m.max())
    if hi <= lo:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def _dice_of_masks(p: np.ndarray, t: np.ndarray) -> float:
    """Dice of two boolean masks of one shape: 1 - scipy's Dice dissimilarity; both empty -> 1."""
    if not (p.any() or t.any()):
        return 1.0  # scipy gives 0/0 = NaN here; two empty masks agree perfectly
    return 1.0 - float(_dice_dissimilarity(p.ravel(), t.ravel()))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks, 2|P∩T|/(|P|+|T|) (IgCONDA-PET 3.4, eq. 11); both empty -> 1, one empty -> 0.

    Computed as 1 - ``scipy.spatial.distance.dice`` of the flattened masks (equal to the formula
    to within one unit in the last place).
    """
    p, t = _masks(pred, truth)
    return _dice_of_masks(p, t)


def optimal_dice(
    anomaly_map: np.ndarray,
    truth: np.ndarray,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
) -> tuple[float, float]:
    """Best Dice of ``scale_to_unit(map) >= t`` over thresholds and that t (IgCONDA-PET 3.4, eq. 12-13).

    Thresholds are rounded to 10 decimals (so 0.30000000000000004 acts as 0.3) and tried in
    ascending order; ties keep the smallest threshold. Dice as in :func:`dice`.
    """
    m, t = _check_pair(anomaly_map, truth, "anomaly_map", "truth")
    truth_mask = _as_mask(t)
    ths = np.unique(np.round(np.asarray(thresholds, dtype=np.float64).ravel(), _THRESHOLD_DECIMALS))
    if ths.size == 0 or not np.all(np.isfinite(ths)):
        raise ValueError(f"thresholds must be a non-empty list of finite numbers, got {thresholds!r}.")
    scaled = scale_to_unit(m)
    best_dice, best_t = -1.0, float(ths[0])
    for th in ths:  # ascending; strict '>' keeps the smallest threshold on ties
        d = _dice_of_masks(scaled >= th, truth_mask)
        if d > best_dice:
            best_dice, best_t = d, float(th)
    return best_dice, best_t


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
) -> float:
    """HD95 (IgCONDA-PET 3.4, eq. 14) as MONAI defines it: the larger of the two directed 95th percentiles.

    HD95 = max(P95{d(p, ∂T) : p in ∂P}, P95{d(t, ∂P) : t in ∂T}), where ∂X is the boundary of mask
    X (mask voxels with a background face-neighbour; the image border counts as background), d the
    Euclidean distance to the nearest boundary voxel of the other mask, and P95 the 95th percentile
    with linear interpolation. This is ``monai.metrics.compute_hausdorff_distance(percentile=95)``,
    which computes it (in float32); it is not the 95th percentile of both distance sets pooled.
    Distances are in pixels unless ``spacing`` (per array axis) is given. Both masks empty -> 0.0;
    exactly one empty -> NaN, because a distance to a surface that does not exist is undefined
    (average over slices with ``np.nanmean`` or report such slices separately).
    """
    p, t = _masks(pred, truth)
    if spacing is None:
        sampling = None
    else:
        sampling = np.asarray(spacing, dtype=np.float64).ravel()
        if sampling.size != p.ndim or not np.all(np.isfinite(sampling)) or np.any(sampling <= 0):
            raise ValueError(
                f"spacing must be {p.ndim} positive numbers (one per array axis), got {spacing!r}."
            )
        sampling = sampling.tolist()
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return float("nan")
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated always_return_as_numpy argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        distance = compute_hausdorff_distance(
            p[None, None], t[None, None], include_background=True, percentile=95, spacing=sampling
        )
    return float(distance[0, 0])


# --------------------------------------------------------------------------------------------
# pixel-level: AUPRC
# --------------------------------------------------------------------------------------------
def auprc(anomaly_map: np.ndarray, truth: np.ndarray) -> float:
    """Average precision of the unthresholded map, sum_k (R_k - R_{k-1}) P_k (IgCONDA-PET 3.4, eq. 16).

    ``sklearn.metrics.average_precision_score``: each distinct map value is one threshold (equal
    scores form one group). Empty truth -> NaN (recall is undefined; scikit-learn would warn and
    return 0).
    """
    m, t = _check_pair(anomaly_map, truth, "anomaly_map", "truth")
    y = _as_mask(t).ravel()
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, m.ravel().astype(np.float64)))


# --------------------------------------------------------------------------------------------
# lesion-level: detection sensitivity, precision / recall / F1 at an IoU threshold
# --------------------------------------------------------------------------------------------
def _components(mask: np.ndarray, connectivity: int | None) -> tuple[np.ndarray, int]:
    """Label connected components; connectivity as in skimage (1 = faces, ndim = full, None = ndim)."""
    if connectivity is not None and not 1 <= int(connectivity) <= mask.ndim:
        raise ValueError(
            f"connectivity must be between 1 and {mask.ndim} for a {mask.ndim}D array, got {connectivity!r}."
        )
    labels, n = _label(mask, connectivity=connectivity, return_num=True)
    return labels, int(n)


def lesion_overlaps(
    pred_labels: np.ndarray, truth_labels: np.ndarray, n_pred: int | None = None, n_truth: int | None = None,
    truth_areas: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersections [n_truth, n_pred], truth areas, predicted areas) of two label images taken as given.

    Label k (1..n) is lesion or candidate k, 0 is background; ``n_pred``/``n_truth`` default to the
    largest label (labels above them are not counted). The table is built over the predicted voxels
    only, so a few small candidates in a whole-body volume cost little; ``truth_areas`` (voxels of
    truth labels 1..n_truth) lets the caller pass arrays cropped to the predictions' box.
    """
    n_p = int(pred_labels.max()) if n_pred is None else int(n_pred)
    n_t = int(truth_labels.max()) if n_truth is None else int(n_truth)
    fg = (pred_labels > 0) & (pred_labels <= n_p)
    area_p = np.bincount(pred_labels[fg].ravel(), minlength=n_p + 1)[1:n_p + 1].astype(np.int64)
    if truth_areas is None:
        area_t = np.bincount(truth_labels.ravel().astype(np.int64), minlength=n_t + 1)[1:n_t + 1].astype(np.int64)
    else:
        area_t = np.asarray(truth_areas, dtype=np.int64)
    # the contingency table of (truth, prediction) labels over the predicted voxels, as one bincount
    # (scikit-image's contingency_table sorts a sparse matrix: 10x slower on a FROC's many calls)
    truth_fg = truth_labels[fg].astype(np.int64)
    pairs = np.where(truth_fg <= n_t, truth_fg, 0) * (n_p + 1) + pred_labels[fg]
    joint = np.bincount(pairs, minlength=(n_t + 1) * (n_p + 1))[:(n_t + 1) * (n_p + 1)].reshape(n_t + 1, n_p + 1)
    return joint[1:, 1:].astype(np.int64), area_t, area_p


def match_overlaps(
    inter: np.ndarray, area_t: np.ndarray, area_p: np.ndarray, iou_threshold: float = 0.2,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """Which truth lesions a candidate matches (bool per truth lesion): one-to-one, highest IoU first.

    ``inter``/``area_t``/``area_p`` as :func:`lesion_overlaps` gives them; ``keep`` (bool per
    candidate) leaves the other candidates out (a size filter), which changes no pair's IoU. The
    greedy loop is written out because the thesis's rule is greedy, not the optimal assignment
    that ``scipy.optimize.linear_sum_assignment`` would find.
    """
    thr = _check_iou_threshold(iou_threshold)
    n_t, n_p = inter.shape
    matched_t = np.zeros(n_t, dtype=bool)
    if n_t == 0 or n_p == 0:
        return matched_t
    union = area_t[:, None] + area_p[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    ok = (inter > 0) & (iou >= thr)
    if keep is not None:
        ok &= np.asarray(keep, dtype=bool)[None, :]
    ti, pi = np.nonzero(ok)
    # Highest IoU first; ties broken by truth then prediction label for determinism.
    order = np.lexsort((pi, ti, -iou[ti, pi]))
    used_p = np.zeros(n_p, dtype=bool)
    for k in order:
        a, b = ti[k], pi[k]
        if not matched_t[a] and not used_p[b]:
            matched_t[a] = used_p[b] = True
    return matched_t


def _greedy_matches(
    pred: np.ndarray, truth: np.ndarray, iou_threshold: float, connectivity: int | None
) -> tuple[int, int, int]:
    """(matched pairs, #predicted components, #truth lesions) of two masks: :func:`match_overlaps` of their components."""
    lp, n_p = _components(pred, connectivity)
    lt, n_t = _components(truth, connectivity)
    if n_p == 0 or n_t == 0:
        return 0, n_p, n_t
    matched = match_overlaps(*lesion_overlaps(lp, lt, n_p, n_t), iou_threshold)
    return int(matched.sum()), n_p, n_t


def detection_sensitivity(
    pred: np.ndarray,
    truth: np.ndarray,
    iou_threshold: float = 0.5,
    connectivity: int = 1,
) -> tuple[int, int]:
    """(TP, number of truth lesions) under detection criterion 2 (IgCONDA-PET 3.4, eq. 15).

    Lesions are connected components (connectivity=1: 4-neighbour in 2D, 6 in 3D); a truth
    lesion is detected when a predicted component, matched one-to-one by highest IoU, has
    IoU >= ``iou_threshold``. For thresholds >= 0.5 the one-to-one constraint never binds, so
    this equals "each predicted component scored against its best-matching lesion".
    Aggregate with ``sensitivity(sum(tp), sum(n))`` over slices (pooled lesions).
    """
    p, t = _masks(pred, truth)
    thr = _check_iou_threshold(iou_threshold)
    tp, _, n_t = _greedy_matches(p, t, thr, connectivity)
    return tp, n_t


def sensitivity(tp: int | Sequence[int] | np.ndarray, n: int | Sequence[int] | np.ndarray) -> float:
    """TP / number of lesions, summing sequences first (pooled over slices); no lesions -> NaN."""
    total_tp = int(np.sum(tp))
    total_n = int(np.sum(n))
    if total_tp < 0 or total_n < 0 or total_tp > total_n:
        raise ValueError(f"need 0 <= tp <= n, got tp={total_tp}, n={total_n}.")
    if total_n == 0:
        return float("nan")
    return total_tp / total_n


def match_lesions(
    pred: np.ndarray,
    truth: np.ndarray,
    iou_threshold: float = 0.2,
    connectivity: int | None = None,
) -> dict[str, float]:
    """Lesion-level tp/fp/fn, precision, recall, F1 at IoU >= threshold (METHODS 4; thesis 5.3.2).

    One match per lesion and per prediction, highest IoU wins. ``connectivity`` defaults to full
    (8 in 2D, 26 in 3D; skimage's default) since the thesis labels 3D components without saying
    which; use the post-processing's connectivity. Undefined ratios are NaN: precision without
    predictions, recall without lesions, F1 (= 2tp/(2tp+fp+fn)) when both are empty.
    """
    p, t = _masks(pred, truth)
    thr = _check_iou_threshold(iou_threshold)
    tp, n_p, n_t = _greedy_matches(p, t, thr, connectivity)
    fp, fn = n_p - tp, n_t - tp
    precision = tp / n_p if n_p else float("nan")
    recall = tp / n_t if n_t else float("nan")
    denom = 2 * tp + fp + fn
    f1 = 2 * tp / denom if denom else float("nan")
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


# --------------------------------------------------------------------------------------------
# FROC: lesion sensitivity against false candidates per volume
# --------------------------------------------------------------------------------------------
def sensitivity_at(false_positives_per_volume: Sequence[float], sensitivities: Sequence[float],
                   limit: float) -> float:
    """The highest sensitivity among FROC operating points with at most ``limit`` false candidates per volume.

    The curve read as a reader reads it ("sensitivity at 1 false candidate per volume"): an
    operating point with more false candidates does not count, and a high enough threshold always
    gives the point (0 false candidates, sensitivity 0), so the result is 0.0 when no point
    qualifies; NaN sensitivities (no lesions) give NaN. Non-decreasing in ``limit``.
    """
    fp = np.asarray(false_positives_per_volume, dtype=np.float64)
    sens = np.asarray(sensitivities, dtype=np.float64)
    if fp.shape != sens.shape:
        raise ValueError(f"need one sensitivity per operating point, got {sens.size} for {fp.size}.")
    if sens.size and np.isnan(sens).all():
        return float("nan")
    ok = (fp <= float(limit) * (1.0 + 1e-12)) & np.isfinite(sens)
    return float(sens[ok].max()) if ok.any() else 0.0
