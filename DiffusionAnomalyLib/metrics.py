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

The CT detection metrics of METHODS.md section 4 (thesis 5.3.2), per case on 3D label images::

    m = match_labels(pred_labels, truth_labels)        # IoU >= 0.2, one match per lesion, highest IoU wins
    m["tp"], m["fp"], m["fn"], m["precision"], m["recall"], m["f1"], m["found"], m["hit"]
    d = lesion_diameters_mm(truth_labels, ijk_to_ras)  # largest (Feret) diameter of each lesion
    recall_by_size(found_of_all_cases, d_of_all_cases) # strata <= 2, 2-4, 4-7, > 7 cm
    froc_bootstrap(scores, hits, lesions, fp_limits)   # per case: candidate scores, m["hit"], lesion count

The numbers come from the field's libraries: Dice from scipy, HD95 from MONAI (the library the
reference IgCONDA-PET code is built on), AUPRC from scikit-learn, components and lesion surfaces
from scikit-image, convex hulls and distances from scipy.spatial (the label contingency table is
one numpy ``bincount``). This module adds input checks, the empty-mask conventions, the lesion
matching rule, the size strata and the FROC read-out (:func:`sensitivity_at`) with its bootstrap.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull
from scipy.spatial.distance import dice as _dice_dissimilarity
from scipy.spatial.distance import pdist
from skimage.measure import label as _label
from skimage.measure import marching_cubes

from .card import real_number, whole_number
from .postprocessing import check_label_image

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
    "pair_lesions",
    "match_labels",
    "largest_diameter_mm",
    "lesion_diameters_mm",
    "DIAMETER_STRATA_MM",
    "diameter_strata_names",
    "recall_by_size",
    "sensitivity_at",
    "froc_curve",
    "froc_bootstrap",
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
    from monai.metrics import compute_hausdorff_distance  # here: MONAI takes seconds to import (torch, transforms)

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
    from sklearn.metrics import average_precision_score  # here: only this metric needs scikit-learn

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
    candidate) leaves the other candidates out (a size filter), which changes no pair's IoU.
    The pairs are :func:`pair_lesions`'.
    """
    return pair_lesions(inter, area_t, area_p, iou_threshold, keep) >= 0


def pair_lesions(
    inter: np.ndarray, area_t: np.ndarray, area_p: np.ndarray, iou_threshold: float = 0.2,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """The candidate (0-based column of ``inter``) each truth lesion is matched to, -1 for none.

    Arguments as :func:`match_overlaps`. One match per lesion and per candidate, at IoU >= the
    threshold, highest IoU first. The greedy loop is written out because the thesis's rule is greedy,
    not the optimal assignment that ``scipy.optimize.linear_sum_assignment`` would find.
    """
    thr = _check_iou_threshold(iou_threshold)
    n_t, n_p = inter.shape
    pair = np.full(n_t, -1, dtype=np.int64)
    if n_t == 0 or n_p == 0:
        return pair
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
        if pair[a] < 0 and not used_p[b]:
            pair[a] = b
            used_p[b] = True
    return pair


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
    return _detection_counts(*_greedy_matches(p, t, thr, connectivity))


def _detection_counts(tp: int, n_p: int, n_t: int) -> dict[str, float]:
    """tp/fp/fn, precision, recall, F1 of ``tp`` matches among ``n_p`` candidates and ``n_t`` lesions (NaN: undefined)."""
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


def _label_image(labels: np.ndarray, name: str) -> np.ndarray:
    """A 3D label image (:func:`.postprocessing.check_label_image`); a bool mask is lesion 1."""
    arr = check_label_image(labels, name)
    return arr.astype(np.int64) if arr.dtype == bool else arr


def match_labels(
    pred_labels: np.ndarray, truth_labels: np.ndarray, iou_threshold: float = 0.2, n_truth: int | None = None,
) -> dict[str, object]:
    """Per-case detection of METHODS.md section 4 on two 3D label images taken as given.

    Candidate k is label k of ``pred_labels`` (1..max, as :func:`.postprocessing.segment` numbers
    them), lesion k is label k of ``truth_labels`` (1..``n_truth``, default its max; touching lesions
    stay apart, unlike :func:`match_lesions`, which relabels masks into components). A candidate
    finds a lesion at IoU >= ``iou_threshold``, one match per lesion and per candidate, highest IoU
    first (:func:`pair_lesions`). Returns :func:`match_lesions`' tp, fp, fn, precision, recall, F1,
    plus ``found`` (bool per lesion) and ``hit`` (bool per candidate), for size strata and the FROC.
    """
    p, t = _label_image(pred_labels, "pred_labels"), _label_image(truth_labels, "truth_labels")
    if p.shape != t.shape:
        raise ValueError(f"pred_labels has shape {p.shape} but truth_labels has shape {t.shape}; "
                         "they must be on the same grid.")
    thr = _check_iou_threshold(iou_threshold)
    n_t = int(t.max()) if n_truth is None else whole_number(n_truth, "n_truth", 0)
    n_p = int(p.max())
    pair = pair_lesions(*lesion_overlaps(p, t, n_p, n_t), thr)
    hit = np.zeros(n_p, dtype=bool)
    hit[pair[pair >= 0]] = True
    found = pair >= 0
    return {**_detection_counts(int(found.sum()), n_p, n_t), "found": found, "hit": hit}


def match_rule_words(iou_threshold: float = 0.2) -> str:
    """The detection rule of :func:`match_labels` in one sentence, for the demo, reports and evaluations."""
    return (f"a candidate finds a true lesion when their intersection over union (IoU) is at least {iou_threshold:g}, "
            "one candidate per lesion, highest IoU first (METHODS.md section 4)")


def lesion_matches(pred_labels: np.ndarray, truth_labels: np.ndarray, iou_threshold: float = 0.2,
                   n_truth: int | None = None) -> list[dict[str, Any]]:
    """Per true lesion, which candidate found it under :func:`match_labels`' rule and, found or not, the candidate
    overlapping it most: {"lesion", "found", "candidate" (1-based, None), "iou", "covered" (fraction of the lesion's
    voxels inside that candidate), "size_ratio" (candidate / lesion voxels)}, so a reader can see why a candidate
    holding the whole lesion may still not count (IoU below the rule's threshold)."""
    p, t = _label_image(pred_labels, "pred_labels"), _label_image(truth_labels, "truth_labels")
    thr = _check_iou_threshold(iou_threshold)
    n_t = int(t.max()) if n_truth is None else whole_number(n_truth, "n_truth", 0)
    inter, area_t, area_p = lesion_overlaps(p, t, int(p.max()), n_t)
    pair = pair_lesions(inter, area_t, area_p, thr)
    rows = []
    for k in range(n_t):
        c = int(pair[k]) if pair[k] >= 0 else (int(np.argmax(inter[k])) if inter.shape[1] and inter[k].any() else -1)
        if c < 0:
            rows.append({"lesion": k + 1, "found": False, "candidate": None, "iou": 0.0, "covered": 0.0,
                         "size_ratio": None})
            continue
        union = area_t[k] + area_p[c] - inter[k, c]
        rows.append({"lesion": k + 1, "found": bool(pair[k] >= 0), "candidate": c + 1,
                     "iou": float(inter[k, c] / union), "covered": float(inter[k, c] / max(area_t[k], 1)),
                     "size_ratio": float(area_p[c] / max(area_t[k], 1))})
    return rows


# --------------------------------------------------------------------------------------------
# lesion size: largest diameter and the size strata of METHODS.md section 4
# --------------------------------------------------------------------------------------------
#: Edges (mm) of the size strata by largest diameter (METHODS.md section 4): <= 2 cm, 2-4, 4-7, > 7 cm;
#: a stratum holds its upper edge (exactly 20 mm is "<= 2 cm").
DIAMETER_STRATA_MM: tuple[float, ...] = (20.0, 40.0, 70.0)


def _linear_mm(ijk_to_ras: np.ndarray | None, spacing: Sequence[float] | None) -> np.ndarray:
    """3x3 matrix taking a [k, j, i] index offset to millimetres, from IJK->RAS (4x4 or 3x3) or per-axis spacing."""
    if (ijk_to_ras is None) == (spacing is None):
        raise ValueError("give the grid either as its IJK->RAS matrix or as its spacing per array axis, not both.")
    if ijk_to_ras is not None:
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        if m.shape not in ((4, 4), (3, 3)) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) == 0:
            raise ValueError(f"the IJK->RAS matrix must be a finite, invertible 4x4 (or 3x3) matrix, got shape {m.shape}.")
        return m[:3, :3][:, ::-1]  # columns of k, j, i
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be 3 positive numbers in mm (one per array axis k, j, i), got {spacing!r}.")
    return np.diag(sp)


def _feret_mm(mask: np.ndarray, to_mm: np.ndarray) -> float:
    """Largest distance (mm) between two points of the lesion's surface; the mask's voxels are in its box."""
    padded = np.pad(mask, 1).astype(np.float32)
    verts = marching_cubes(padded, level=0.5)[0]
    points = verts @ to_mm.T
    if len(points) > 4:
        points = points[ConvexHull(points).vertices]  # the farthest pair lies on the hull: few points for pdist
    return float(pdist(points).max())


def largest_diameter_mm(mask: np.ndarray, ijk_to_ras: np.ndarray | None = None, *,
                        spacing: Sequence[float] | None = None) -> float:
    """The lesion's largest (maximum Feret) diameter in mm: the largest distance between two points of its surface.

    ``mask``: 3D [k, j, i], nonzero = lesion (all its voxels, connected or not). The grid as its
    IJK->RAS matrix (oblique and anisotropic grids exact) or ``spacing`` per array axis (k, j, i).
    The surface is scikit-image's marching cubes at level 0.5 (half way between lesion and
    background voxel centres, as ``regionprops``' ``feret_diameter_max``), mapped to millimetres, and
    the distance the largest between its convex-hull vertices (scipy.spatial). Not
    ``feret_diameter_max`` itself: it builds a convex-hull image first, which fails on a one-voxel-
    thin lesion, and takes axis-aligned spacing only. A rod of n voxels measures n voxel lengths (face
    to face); a sphere drawn as the voxels whose centres lie within d / 2 measures between d and d plus
    one voxel. An empty mask is refused.
    """
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"the lesion mask must be 3D [k, j, i], got shape {m.shape}.")
    to_mm = _linear_mm(ijk_to_ras, spacing)
    m = _as_mask(m)
    box = ndi.find_objects(m.astype(np.uint8))
    if not box:
        raise ValueError("the lesion mask is empty; a lesion without voxels has no diameter.")
    return _feret_mm(m[box[0]], to_mm)


def lesion_diameters_mm(labels: np.ndarray, ijk_to_ras: np.ndarray | None = None, *,
                        spacing: Sequence[float] | None = None, n: int | None = None) -> np.ndarray:
    """:func:`largest_diameter_mm` of lesions 1..``n`` (default: the largest label) of a label image; NaN for a
    label without voxels."""
    lab = _label_image(labels, "the label image")
    to_mm = _linear_mm(ijk_to_ras, spacing)
    n = int(lab.max()) if n is None else whole_number(n, "n", 0)
    out = np.full(n, np.nan)
    for k, box in enumerate(ndi.find_objects(lab, max_label=n), start=1):
        if box is not None:
            out[k - 1] = _feret_mm(lab[box] == k, to_mm)
    return out


def diameter_strata_names(edges_mm: Sequence[float] = DIAMETER_STRATA_MM) -> list[str]:
    """Names of the strata of :data:`DIAMETER_STRATA_MM` (upper edge inclusive): "<= 2 cm", "2-4 cm", ..., "> 7 cm"."""
    cm = [f"{e / 10.0:g}" for e in edges_mm]
    return [f"<= {cm[0]} cm"] + [f"{a}-{b} cm" for a, b in zip(cm, cm[1:])] + [f"> {cm[-1]} cm"]


def recall_by_size(found: Sequence[bool] | np.ndarray, sizes_mm: Sequence[float] | np.ndarray,
                   edges_mm: Sequence[float] = DIAMETER_STRATA_MM, names: Sequence[str] | None = None,
                   right: bool = True) -> list[dict[str, object]]:
    """Recall (sensitivity) per size stratum: one dict per stratum, ``bin``, ``lesions``, ``found``, ``sensitivity``.

    ``found``: bool per lesion (pooled over cases); ``sizes_mm``: each lesion's size (default strata:
    largest diameter, :data:`DIAMETER_STRATA_MM`, named by :func:`diameter_strata_names`). ``right``:
    a stratum holds its upper edge (METHODS.md's "<= 2 cm"); False: its lower edge (``np.digitize``'s
    default). A stratum without lesions has sensitivity NaN.
    """
    hits = np.asarray(found, dtype=bool).ravel()
    sizes = np.asarray(sizes_mm, dtype=np.float64).ravel()
    if hits.shape != sizes.shape:
        raise ValueError(f"need one size per lesion, got {sizes.size} sizes for {hits.size} lesions.")
    if not np.all(np.isfinite(sizes)):
        raise ValueError("a lesion size is missing (NaN) or infinite; measure every lesion before stratifying.")
    edges = np.asarray(edges_mm, dtype=np.float64)
    names = list(diameter_strata_names(edges_mm) if names is None else names)
    if len(names) != edges.size + 1:
        raise ValueError(f"need {edges.size + 1} stratum names for {edges.size} edges, got {len(names)}.")
    bins = np.digitize(sizes, edges, right=right)
    out = []
    for b, name in enumerate(names):
        n, k = int(np.sum(bins == b)), int(np.sum(hits[bins == b]))
        out.append({"bin": name, "lesions": n, "found": k, "sensitivity": sensitivity(k, n)})
    return out


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


def _froc_counts(scores: Sequence, hits: Sequence, lesions: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, TP [case, threshold], FP [case, threshold], lesions per case) of scored candidates."""
    if not (len(scores) == len(hits) == len(lesions)) or len(scores) == 0:
        raise ValueError(f"need the candidates' scores, hits and lesion count of each case, got {len(scores)} "
                         f"score lists, {len(hits)} hit lists and {len(lesions)} lesion counts.")
    cases = []
    for c, (sc, hi, n) in enumerate(zip(scores, hits, lesions)):
        sc, hi = np.asarray(sc, dtype=np.float64).ravel(), np.asarray(hi, dtype=bool).ravel()
        n = whole_number(n, f"the lesion count of case {c}", 0)
        if sc.shape != hi.shape or not np.all(np.isfinite(sc)) or int(hi.sum()) > n:
            raise ValueError(f"case {c} needs one finite score and one hit flag per candidate and at most as many hits "
                             f"as lesions, got {sc.size} scores, {hi.size} flags, {int(hi.sum())} hits, {n} lesions.")
        cases.append((sc, hi, n))
    thresholds = np.unique(np.concatenate([sc for sc, _, _ in cases]))[::-1]
    tp = np.zeros((len(cases), thresholds.size))
    fp = np.zeros_like(tp)
    for c, (sc, hi, _) in enumerate(cases):
        for table, chosen in ((tp, sc[hi]), (fp, sc[~hi])):
            ordered = np.sort(chosen)
            table[c] = ordered.size - np.searchsorted(ordered, thresholds, side="left")  # scores >= threshold
    return thresholds, tp, fp, np.array([n for _, _, n in cases], dtype=np.float64)


def _pooled(weights: np.ndarray, tp: np.ndarray, fp: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sensitivity, false positives per scan) [set, threshold] of case sets given as case counts [set, case]."""
    lesions = weights @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(lesions[:, None] > 0, (weights @ tp) / lesions[:, None], np.nan)
    return sens, (weights @ fp) / weights.sum(axis=1, keepdims=True)


def froc_curve(scores: Sequence[Sequence[float]], hits: Sequence[Sequence[bool]],
               lesions: Sequence[int]) -> dict[str, np.ndarray]:
    """FROC of scored candidates: sensitivity against mean false positives per scan, one point per threshold.

    Per case: ``scores`` of its candidates (e.g. each candidate's maximum heat), ``hits`` (bool per
    candidate: it found a lesion, :func:`match_labels`' ``hit``) and ``lesions`` (its lesion count).
    The matching is made once on all candidates; a threshold t then keeps the candidates scoring >= t
    (the CAD FROC convention). Thresholds are the distinct scores, descending; sensitivity is pooled
    over the lesions of all cases (NaN without lesions), false positives are averaged over cases.
    Returns ``thresholds``, ``sensitivity``, ``false_positives_per_scan``.
    """
    thresholds, tp, fp, n = _froc_counts(scores, hits, lesions)
    sens, fpps = _pooled(np.ones((1, len(n))), tp, fp, n)
    return {"thresholds": thresholds, "sensitivity": sens[0], "false_positives_per_scan": fpps[0]}


def _read_at(fpps: np.ndarray, sens: np.ndarray, limits: list[float], has_lesions: bool) -> list[float]:
    """:func:`sensitivity_at` at each limit; NaN for a set of cases without lesions (also when it has no candidates)."""
    if not has_lesions:
        return [float("nan")] * len(limits)
    return [sensitivity_at(fpps, sens, lim) for lim in limits]


def froc_bootstrap(scores: Sequence[Sequence[float]], hits: Sequence[Sequence[bool]], lesions: Sequence[int],
                   fp_limits: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> dict[str, object]:
    """The FROC read at ``fp_limits`` false positives per scan (:func:`sensitivity_at`), with bootstrap confidence
    intervals by resampling cases.

    Arguments as :func:`froc_curve`. ``n_resamples`` resamples of the cases with replacement (numpy
    Generator seeded with ``seed``: the same inputs give the same interval); the interval is the
    percentile interval at ``confidence``. Written with numpy rather than ``scipy.stats.bootstrap``
    (which resamples the same way) because a resample without lesions has no sensitivity: it is
    left out here, where scipy's interval would turn NaN. Returns ``fp_limits``, ``sensitivity``
    (of all cases), ``low``, ``high`` (lists, one per limit), ``cases``, ``lesions``, ``n_resamples``,
    ``seed``, ``confidence``.
    """
    limits = [real_number(v, "a false-positives-per-scan limit", 0.0) for v in fp_limits]
    n_resamples = whole_number(n_resamples, "the number of bootstrap resamples", 1)
    seed = whole_number(seed, "the bootstrap seed", 0)
    confidence = real_number(confidence, "the confidence level", 0.0, 1.0, lo_open=True, hi_open=True)
    _, tp, fp, n = _froc_counts(scores, hits, lesions)
    n_cases = len(n)
    sens, fpps = _pooled(np.ones((1, n_cases)), tp, fp, n)
    point = _read_at(fpps[0], sens[0], limits, n.sum() > 0)

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_cases, size=(n_resamples, n_cases))
    weights = np.bincount((np.arange(n_resamples)[:, None] * n_cases + picks).ravel(),
                          minlength=n_resamples * n_cases).reshape(n_resamples, n_cases).astype(np.float64)
    sens_b, fpps_b = _pooled(weights, tp, fp, n)
    has_lesions = weights @ n > 0
    readings = np.array([_read_at(fpps_b[b], sens_b[b], limits, has_lesions[b]) for b in range(n_resamples)])
    alpha = 100.0 * (1.0 - confidence) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a limit no resample can read (no lesions at all): NaN
        low = np.nanpercentile(readings, alpha, axis=0)
        high = np.nanpercentile(readings, 100.0 - alpha, axis=0)
    return {"fp_limits": limits, "sensitivity": point, "low": [float(v) for v in low],
            "high": [float(v) for v in high], "cases": n_cases, "lesions": int(n.sum()),
            "n_resamples": n_resamples, "seed": seed, "confidence": confidence}
