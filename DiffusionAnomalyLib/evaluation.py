"""Evaluation on held-out phantoms with the IgCONDA-PET metrics (METHODS.md, "Evaluation metrics").

Protocol (IgCONDA-PET section 3.4): per unhealthy axial slice of the model's slice space (the
paper evaluates on its 64 x 64 resampled slices too), the anomaly map is scaled to [0, 1];
DSC_opt is the best Dice over thresholds 0.1..0.9, HD95 (pixels) and lesion detection
(criterion 2) are taken at that slice's DSC-optimal threshold, AUPRC on the unthresholded map.
The 41 % SUVmax baseline thresholds each slice's SUV at 0.41 x its maximum; there is nothing to
optimise, so its DSC_opt is its Dice, and its AUPRC uses SUV / SUVmax as the score.
Ground truth in slice space: model pixels at least half covered by a lesion.
Seeds used for training, validation or tuning (recorded in the model card) are refused.

Whole-volume lesion detection (what a user of ``run`` sees; not part of the paper's protocol):
3D candidates of :func:`.postprocessing.segment` on the whole volume, matched one-to-one to the
phantom's lesions at IoU >= 0.2, as a FROC curve over the threshold value and at the card's
operating point, with and without an organ exclusion (the phantom's organ labels stand in for
TotalSegmentator's), for the model and for the 41 % SUVmax baseline on the SUV volume.
:func:`whole_volume_sweep` chooses those defaults on tuning seeds with the same code.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import metrics
from .card import (SEED_RANGE_KEYS, THRESHOLD_METHODS, Steps, check_margin_mm, check_min_size_ml, check_threshold,
                   number_from_text, organ_list, whole_number)
from .export import write_json
from .figures import froc_png
from .files import atomic_path, check_writable_dir
from .methods.base import check_evaluations
from .phantoms import make_phantom
from .postprocessing import (Thresholding, bounding_box, inside_roi, large_enough, segment, suv_threshold_baseline, threshold_value,
                             voxel_volume_ml)
from .preprocessing import mask_to_model_space, to_model_space
from .roi import OrganSelection, organ_names
from .volume import Volume

METRIC_NAMES = ("dsc_opt", "hd95", "auprc", "sensitivity")

#: Whole-volume detection: a candidate finds a lesion when their IoU is at least this (thesis 5.3.2).
DETECTION_IOU = 0.2
#: The 41 % SUVmax baseline: voxels above this fraction of the maximum (inside the organ ROI, if any).
BASELINE_FRACTION = 0.41
#: FROC (and sweep) threshold values of the "fraction" rule: 0.1, 0.15, ..., 0.95 of the map's maximum ...
FROC_FRACTIONS: tuple[float, ...] = tuple(round(0.1 + 0.05 * k, 2) for k in range(18))
#: ... and of the "absolute" rule, in the map's units (a PET model's heat map: SUV differences).
FROC_ABSOLUTE: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
#: Edges (mm) of the lesion size bins, by the phantom lesion's radius: < 5, 5-10, >= 10 mm.
SIZE_BINS_MM: tuple[float, ...] = (5.0, 10.0)
#: FROC read-outs: the sensitivity at <= this many false candidates per volume.
FP_LIMITS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
#: The whole-volume criterion of the threshold sweep: at most this many false candidates per volume.
MAX_FALSE_PER_VOLUME = 1.0
#: The organ exclusion evaluate compares against when the model card has no default one.
FALLBACK_EXCLUSION: tuple[str, ...] = ("physiological-uptake",)
#: [start, stop) of the phantom seeds kept for held-out evaluation (evaluate's default starts here); sweeps refuse them.
EVALUATION_SEEDS: tuple[int, int] = (5_000_000, 6_000_000)
#: The first seed a whole-volume sweep suggests when the one given is refused.
SUGGESTED_TUNING_SEED = 810_000
#: Default axes of the whole-volume sweep besides the threshold values (:func:`whole_volume_grid`).
SWEEP_MIN_SIZES_ML: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)
SWEEP_ORGAN_EXCLUDES: tuple[str, ...] = ("none", "physiological-uptake")
SWEEP_MARGINS_MM: tuple[float, ...] = (0.0, 5.0, 10.0)
SWEEP_THRESHOLD_METHODS: tuple[str, ...] = ("fraction", "absolute")
#: Default axes of the noise level / guidance scale sweep (:func:`sweep`).
SWEEP_NOISE_LEVELS: tuple[int, ...] = (200, 300, 400, 500)
SWEEP_GUIDANCE_SCALES: tuple[float, ...] = (0.0, 1.0, 3.0, 5.0)


def _slice_metrics(score: np.ndarray, truth: np.ndarray, binary: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of one slice: ``score`` map (any range) against ``truth``; ``binary`` for fixed-threshold methods."""
    if binary is None:
        dsc, thr = metrics.optimal_dice(score, truth)
        pred = metrics.scale_to_unit(score) >= thr
    else:
        pred, thr = binary, None
        dsc = metrics.dice(pred, truth)
    tp, n = metrics.detection_sensitivity(pred, truth)
    return {"dsc_opt": dsc, "threshold": thr, "hd95": metrics.hd95(pred, truth),
            "auprc": metrics.auprc(score, truth), "tp": tp, "lesions": n}


def _summarise(rows: list[dict[str, Any]], seconds: list[float]) -> dict[str, float]:
    def mean(key):
        vals = np.array([r[key] for r in rows], dtype=np.float64)
        return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")

    return {
        "dsc_opt": mean("dsc_opt"),
        "hd95": mean("hd95"),
        "auprc": mean("auprc"),
        "sensitivity": metrics.sensitivity([r["tp"] for r in rows], [r["lesions"] for r in rows]),
        "seconds_per_volume": float(np.mean(seconds)) if seconds else float("nan"),
        "slices": len(rows),
    }


def check_held_out(card: dict[str, Any], seeds: list[int], kinds: tuple[str, ...] = SEED_RANGE_KEYS,
                   what: str = "evaluation seeds", advice: str = "choose held-out seeds") -> None:
    """Refuse seeds that overlap the card's training, validation or tuning seeds (``kinds``: which ranges)."""
    prov = card.get("provenance", {})
    for key in kinds:
        rng = prov.get(key)
        if rng and any(rng[0] <= s < rng[1] for s in seeds):
            raise ValueError(
                f"{what} {seeds[0]}..{seeds[-1]} overlap the model's {key.replace('_', ' ')} "
                f"{rng[0]}..{rng[1] - 1}; {advice}."
            )


def card_with_best_defaults(card: dict[str, Any], sweep_result: dict[str, Any], command: str) -> dict[str, Any]:
    """A copy of ``card`` whose default D, w and steps are the sweep's best by mean DSC_opt.

    The sweep's phantom seeds are recorded as ``tuning_seeds`` so that ``evaluate`` refuses them:
    parameters chosen on a set of cases are never scored on the same cases.
    """
    rows = [r for r in sweep_result["grid"] if np.isfinite(r["dsc_opt"])]
    if not rows:
        raise ValueError("the sweep produced no finite DSC_opt (no unhealthy slices?); no defaults were written.")
    best = max(rows, key=lambda r: r["dsc_opt"])
    card = copy.deepcopy(card)
    card["inference_defaults"].update(
        noise_level=int(best["noise_level"]), guidance_scale=float(best["guidance_scale"]), steps=best["steps"])
    first, last = sweep_result["seeds"]
    prov = card.setdefault("provenance", {})
    prov["tuning_seeds"] = [int(first), int(last) + 1]
    prov["inference_defaults_chosen_by"] = (
        f"{command} (tuning phantom seeds {first}..{last}, {sweep_result['slices']} unhealthy slices); best mean "
        f"DSC_opt {best['dsc_opt']:.3f} at D={best['noise_level']}, w={best['guidance_scale']:g}")
    return card


def phantom_seeds(n_cases: Any, seed: Any) -> list[int]:
    """The phantom seeds ``seed .. seed + n_cases - 1``, after checking both are whole numbers
    (``n_cases`` >= 1, ``seed`` >= 0): the one check of the phantom count and first seed of evaluate and sweep."""
    n_cases = whole_number(n_cases, "the number of phantoms", 1)
    seed = whole_number(seed, "the first phantom seed", 0)
    return list(range(seed, seed + n_cases))


def _number_list(values: Any, what: str) -> list[Any]:
    """A sweep axis: a list, or comma-separated text as the CLI gives it; at least one entry."""
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",")]
    if isinstance(values, (int, float)):
        values = [values]
    values = list(values)
    if not values or any(v is None or v == "" for v in values):
        raise ValueError(f"the sweep needs a comma-separated list of {what} with no empty entries, got {values!r}.")
    return values


# =============================================================================================
# Whole-volume lesion detection: FROC and operating points (evaluate and the threshold sweep)
# =============================================================================================
@dataclass(frozen=True)
class CaseLesions:
    """A case's true lesions: the label image (lesion k = label k), and each lesion's voxels and radius (mm)."""

    labels: np.ndarray
    areas: np.ndarray
    radius_mm: np.ndarray

    @classmethod
    def of(cls, case) -> "CaseLesions":
        """The lesions of a phantom case (:class:`.phantoms.PhantomCase`): each phantom lesion is one lesion,
        even where two touch."""
        lesions = sorted(case.lesions, key=lambda les: les["id"])
        n = len(lesions)
        labels = case.lesion_labels.voxels
        areas = np.bincount(labels.ravel().astype(np.int64), minlength=n + 1)[1:n + 1]
        return cls(labels, areas, np.array([float(les["radius_mm"]) for les in lesions]))


def detection_points(score: Volume, lesions: CaseLesions, roi: np.ndarray | None,
                     rules: Sequence[tuple[str, float | None]],
                     min_sizes_ml: Sequence[float | None]) -> list[dict[str, Any]]:
    """Whole-volume detection on one case for each threshold rule (method, value) and each minimum size.

    The candidates are those of :func:`.postprocessing.segment` with that rule inside ``roi``
    (non-zero = inside; None: the whole volume): the threshold is segment's, of the map inside the
    ROI (:func:`.postprocessing.inside_roi`), the components are labelled once per rule, and each
    minimum size filters them with segment's size rule (here, so the sizes of a sweep cost one
    labelling). A candidate finds a lesion at IoU >= :data:`DETECTION_IOU`, one-to-one
    (:func:`.metrics.match_overlaps`). One dict per (rule, size), rules outermost: ``method``,
    ``value``, ``min_size_ml``, ``found`` (bool per lesion), ``candidates``, ``false_positives``,
    ``dice`` (of all kept candidates against all lesions).
    """
    shown = score if roi is None else score.with_voxels(inside_roi(score.voxels, roi))
    thresholds = [threshold_value(shown.voxels, method, value) for method, value in rules]
    # Every candidate of every rule lies in the box of the lowest threshold's voxels: label that box only.
    lowest = min((t for t in thresholds if t > 0), default=None)  # 0: the map is 0 inside the ROI, nothing above it
    box = None if lowest is None else bounding_box(shown.voxels > lowest)
    if box is not None:
        crop = shown.crop(box)
        truth = lesions.labels[box]
    voxel_ml = voxel_volume_ml(score.ijk_to_ras)
    n_lesions = len(lesions.areas)
    truth_voxels = int(lesions.areas.sum())
    points = []
    for (method, value), threshold in zip(rules, thresholds):
        if box is not None and threshold > 0:
            labels = segment(crop, method="absolute", value=threshold)
            inter, area_t, area_p = metrics.lesion_overlaps(labels, truth, n_truth=n_lesions, truth_areas=lesions.areas)
        else:
            inter, area_t, area_p = np.zeros((n_lesions, 0), np.int64), lesions.areas, np.zeros(0, np.int64)
        for min_size in min_sizes_ml:
            keep = large_enough(area_p, voxel_ml, min_size)
            found = metrics.match_overlaps(inter, area_t, area_p, DETECTION_IOU, keep)
            kept_voxels = int(area_p[keep].sum())
            overlap = int(inter[:, keep].sum())
            dice = 2.0 * overlap / (kept_voxels + truth_voxels) if kept_voxels + truth_voxels else 1.0
            points.append({"method": method, "value": value, "min_size_ml": min_size, "found": found,
                           "candidates": int(keep.sum()), "false_positives": int(keep.sum() - found.sum()),
                           "dice": dice})
    return points


class DetectionTally:
    """Whole-volume detection pooled over cases, per setting: the one aggregation of evaluate and the sweep.

    Sensitivity is pooled over lesions (found / lesions of all cases); false candidates are counted
    per volume (all false candidates / cases).
    """

    def __init__(self):
        self._rows: dict[Any, dict[str, Any]] = {}

    def add(self, key: Any, point: dict[str, Any], lesions: CaseLesions, seed: int) -> None:
        row = self._rows.setdefault(key, {"lesions": 0, "found": 0, "false_positives": 0, "cases": 0,
                                          "hits": [], "radius_mm": [], "per_case": []})
        found = point["found"]
        row["lesions"] += len(found)
        row["found"] += int(found.sum())
        row["false_positives"] += point["false_positives"]
        row["cases"] += 1
        row["hits"].extend(bool(f) for f in found)
        row["radius_mm"].extend(float(r) for r in lesions.radius_mm)
        row["per_case"].append({"seed": int(seed), "lesions": len(found), "found": int(found.sum()),
                                "false_positives": point["false_positives"], "dice": point["dice"]})

    def summary(self, key: Any, detail: bool = False) -> dict[str, Any]:
        """Lesions, found, false positives, sensitivity, false positives per volume (+ sizes and cases if ``detail``)."""
        row = self._rows[key]
        out = {"lesions": row["lesions"], "found": row["found"], "false_positives": row["false_positives"],
               "sensitivity": metrics.sensitivity(row["found"], row["lesions"]),
               "false_positives_per_volume": row["false_positives"] / row["cases"]}
        if detail:
            dices = [c["dice"] for c in row["per_case"] if c["lesions"]]
            out["mean_volume_dice"] = float(np.mean(dices)) if dices else float("nan")
            out["by_size"] = _by_size(np.array(row["hits"], dtype=bool), np.array(row["radius_mm"]))
            out["per_case"] = row["per_case"]
        return out


def size_bin_names() -> list[str]:
    """The names of the lesion size bins (:data:`SIZE_BINS_MM`, by the phantom lesion's radius)."""
    edges = SIZE_BINS_MM
    return ([f"r < {edges[0]:g} mm"] + [f"{a:g} <= r < {b:g} mm" for a, b in zip(edges, edges[1:])]
            + [f"r >= {edges[-1]:g} mm"])


def _by_size(hits: np.ndarray, radius_mm: np.ndarray) -> list[dict[str, Any]]:
    bins = np.digitize(radius_mm, SIZE_BINS_MM)
    out = []
    for b, name in enumerate(size_bin_names()):
        n, k = int(np.sum(bins == b)), int(np.sum(hits[bins == b]))
        out.append({"bin": name, "lesions": n, "found": k, "sensitivity": metrics.sensitivity(k, n)})
    return out


def default_exclusion(card: dict[str, Any]) -> tuple[OrganSelection, str]:
    """The organ exclusion evaluate compares against none: the card's default, else physiological uptake.

    Returns the selection and a note saying which; the names are checked against TotalSegmentator's
    class map here, before any network work.
    """
    chosen = OrganSelection.from_card(card)
    if chosen.exclude:
        note = "the model card's default organ exclusion"
    else:
        chosen = OrganSelection(exclude=FALLBACK_EXCLUSION, margin_mm=chosen.margin_mm)
        note = f"the model card has no default organ exclusion; {', '.join(FALLBACK_EXCLUSION)} used instead"
    organ_names(chosen.exclude)
    return chosen, note


def _curve_rules(method: str, value: float | None) -> tuple[list[tuple[str, float | None]], tuple[str, float | None]]:
    """The FROC's threshold rules for an operating point (method, value), and that point's rule.

    A fraction or absolute point lies on a curve over that method's values (:data:`FROC_FRACTIONS`,
    :data:`FROC_ABSOLUTE`, plus the point's own value); an Otsu point, which has no value, is shown
    beside the fraction curve.
    """
    curve_method = method if method in ("fraction", "absolute") else "fraction"
    values = set(FROC_FRACTIONS if curve_method == "fraction" else FROC_ABSOLUTE)
    if method == curve_method:
        values.add(float(value))
    rules = [(curve_method, v) for v in sorted(values)]
    op = (method, None if method == "otsu" else float(value))
    if op not in rules:
        rules.append(op)
    return rules, op


def _rule_words(method: str, value: float | None, min_size_ml: float | None) -> str:
    rule = "Otsu" if method == "otsu" else f"{method} {value:g}"
    return rule + ("" if min_size_ml is None else f", >= {min_size_ml:g} ml")


def _exclusion_words(exclude: Sequence[str], margin_mm: float) -> str:
    if not exclude:
        return "none"
    return ", ".join(exclude) + (f" + {margin_mm:g} mm" if margin_mm else "")


def _whole_volume_result(curves, tally: DetectionTally, exclusion: OrganSelection, note: str) -> dict[str, Any]:
    out = []
    for curve in curves:
        key = curve["key"]
        points = []
        for rule in curve["rules"]:
            if rule == curve["op"] and rule[0] == "otsu":
                continue
            points.append({"threshold_method": rule[0], "threshold_value": rule[1],
                           **tally.summary((key, rule))})
        op = {"threshold_method": curve["op"][0], "threshold_value": curve["op"][1],
              "min_size_ml": curve["min_size_ml"], **tally.summary((key, curve["op"]), detail=True)}
        fp = [p["false_positives_per_volume"] for p in points]
        sens = [p["sensitivity"] for p in points]
        out.append({"method": curve["method"], "organ_exclusion": curve["excluded"], "label": curve["label"],
                    "min_size_ml": curve["min_size_ml"], "points": points, "operating_point": op,
                    "sensitivity_at": {f"{limit:g}": metrics.sensitivity_at(fp, sens, limit) for limit in FP_LIMITS}})
    return {
        "criterion": f"3D candidates on the whole volume (postprocessing.segment) vs the phantom's lesions, matched "
                     f"one-to-one at IoU >= {DETECTION_IOU:g}; sensitivity pooled over lesions, false candidates "
                     "per volume; synthetic phantoms",
        "organ_labels": "the phantom's own anatomy with TotalSegmentator v2 ids (standing in for TotalSegmentator "
                        "output of a CT)",
        "exclusion": {**exclusion.as_parameters(), "note": note},
        "size_bins": {"by": "the phantom lesion's radius_mm, the equivalent-sphere radius of its ellipsoid",
                      "bins": size_bin_names()},
        "curves": out,
    }


def evaluate(model, n_cases: int, seed: int, out_dir: str | Path, *, noise_level=None, guidance_scale=None,
             steps: Steps | None = None, phantom_kwargs: dict[str, Any] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``model`` and the 41 % SUVmax baseline on ``n_cases`` phantoms from ``seed``; write results.

    Per-slice paper metrics (module docstring), and whole-volume lesion detection: a FROC curve
    (lesion sensitivity against false candidates per volume over the threshold value) and the
    default operating point (the card's thresholding), for the model and the baseline (the SUV
    volume itself at 0.41 of its maximum, the card's minimum size), each with and without the
    organ exclusion of :func:`default_exclusion`; sensitivity by lesion size at the operating
    point. The network runs once per case; every curve comes from its heat map (and the SUV).
    Writes metrics.json, metrics.md and froc.png. Every argument is checked (and the output
    folder made) before any phantom goes through the network.
    """
    seeds = phantom_seeds(n_cases, seed)
    check_held_out(model.card, seeds)
    model.resolve(noise_level, guidance_scale, steps)
    thresholding = Thresholding.from_card(model.card)
    exclusion, exclusion_note = default_exclusion(model.card)
    out = check_writable_dir(out_dir)
    prep = model.card["preprocessing"]
    raw_prep = {**prep, "intensity": {"scale": 1.0, "offset": 0.0, "clip": [None, None]}}
    name = model.card["method"]
    rows: dict[str, list[dict[str, Any]]] = {name: [], "suv41": []}
    seconds: dict[str, list[float]] = {name: [], "suv41": []}
    kwargs: dict[str, Any] = {"noise_level": noise_level, "guidance_scale": guidance_scale, "steps": steps}
    params, compute = None, {}
    curves = []
    for method, (rule, op_value), min_size in (
            (name, (thresholding.method, thresholding.value), thresholding.min_size_ml),
            ("suv41", ("fraction", BASELINE_FRACTION), thresholding.min_size_ml)):
        rules, op = _curve_rules(rule, op_value)
        for excluded in (False, True):
            label = ("model" if method == name else "41 % SUVmax") + (
                f", {_exclusion_words(exclusion.exclude, exclusion.margin_mm)} excluded" if excluded else "")
            curves.append({"key": (method, excluded), "method": method, "excluded": excluded, "label": label,
                           "rules": rules, "op": op, "min_size_ml": min_size})
    tally = DetectionTally()
    froc_seconds = []
    for s in seeds:
        case = make_phantom(s, **(phantom_kwargs or {}))
        t0 = time.perf_counter()
        res = model.run(case.pet, **kwargs)
        seconds[name].append(time.perf_counter() - t0)
        params, compute = res.parameters, res.compute
        truth = mask_to_model_space(case.lesion_labels, res.grid) >= 0.5
        t0 = time.perf_counter()
        suv, _ = to_model_space(case.pet, raw_prep, res.grid)
        baseline = suv_threshold_baseline(suv, BASELINE_FRACTION, axis=0)
        seconds["suv41"].append(time.perf_counter() - t0)
        unhealthy = np.flatnonzero(truth.reshape(len(truth), -1).any(axis=1))
        for k in unhealthy:
            common = {"seed": s, "slice": int(k)}
            rows[name].append({**common, **_slice_metrics(res.model_heat[k], truth[k])})
            rows["suv41"].append({**common, **_slice_metrics(suv[k], truth[k], binary=baseline[k])})
        # whole volumes: every curve from the cached heat map (model) or the SUV volume (baseline)
        t0 = time.perf_counter()
        lesions = CaseLesions.of(case)
        rois = {False: None, True: exclusion.mask(case.organs, grid=case.pet).voxels != 0}
        for curve in curves:
            score = res.heatmap if curve["method"] == name else case.pet
            points = detection_points(score, lesions, rois[curve["excluded"]], curve["rules"],
                                      [curve["min_size_ml"]])
            for rule, point in zip(curve["rules"], points):
                tally.add((curve["key"], rule), point, lesions, s)
        froc_seconds.append(time.perf_counter() - t0)
        log(f"case {s}: {len(case.lesions)} lesion(s), {len(unhealthy)} unhealthy slices, "
            f"{seconds[name][-1]:.1f} s network, {froc_seconds[-1]:.1f} s whole-volume curves")
    whole = _whole_volume_result(curves, tally, exclusion, exclusion_note)
    whole["seconds_per_volume"] = float(np.mean(froc_seconds))
    plain = tally.summary(((name, False), curves[0]["op"]), detail=True)
    result = {
        "protocol": "IgCONDA-PET section 3.4 on the model's slice space; synthetic phantoms (no real PET)",
        "checkpoint": model.card["id"],
        "seeds": [seeds[0], seeds[-1]],
        "parameters": params,
        "compute": compute,
        "methods": {m: _summarise(rows[m], seconds[m]) for m in rows},
        "per_slice": rows,
        "detection": {
            "criterion": "3D connected components of the whole-volume segmentation at the model's default "
                         f"threshold (no organ exclusion) vs true lesions, matched at IoU >= {DETECTION_IOU:g}",
            "threshold": thresholding.as_parameters(),
            "lesions": plain["lesions"], "found": plain["found"], "false_positives": plain["false_positives"],
            "lesion_sensitivity": plain["sensitivity"],
            "false_positives_per_volume": plain["false_positives_per_volume"],
            "mean_volume_dice": plain["mean_volume_dice"],
            "per_case": plain["per_case"],
        },
        "whole_volume": whole,
    }
    write_json(result, out / "metrics.json")
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(markdown_table(result), encoding="utf-8")
    with atomic_path(out / "froc.png", suffix=".png") as tmp:
        froc_png(tmp, _figure_curves(whole), max_fp=FP_LIMITS[-1],
                 title=f"Whole-volume FROC on synthetic phantoms (not clinical data)\n{model.card['id']}, "
                       f"seeds {seeds[0]}..{seeds[-1]}, {plain['lesions']} lesions")
    return result


def _figure_curves(whole: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for curve in whole["curves"]:
        points = sorted(curve["points"], key=lambda p: -p["threshold_value"])  # high threshold first: few candidates
        op = curve["operating_point"]
        out.append({"label": curve["label"], "baseline": curve["method"] == "suv41", "excluded": curve["organ_exclusion"],
                    "fp": [p["false_positives_per_volume"] for p in points],
                    "sensitivity": [p["sensitivity"] for p in points],
                    "operating_point": (op["false_positives_per_volume"], op["sensitivity"])})
    return out


def _fraction(found: int, lesions: int) -> str:
    return f"{found}/{lesions} ({found / lesions:.2f})" if lesions else "-"


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        f"Held-out phantom seeds {result['seeds'][0]}..{result['seeds'][1]}, parameters {result['parameters']}"
        + (f", {result['compute'].get('precision')} on {result['compute'].get('device')}" if result.get("compute") else ""),
        "",
        "| method | DSC_opt | HD95 (px) | AUPRC | sensitivity | s / volume | slices |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in result["methods"].items():
        lines.append(f"| {m} | {r['dsc_opt']:.3f} | {r['hd95']:.2f} | {r['auprc']:.3f} | {r['sensitivity']:.3f} | "
                     f"{r['seconds_per_volume']:.1f} | {r['slices']} |")
    det = result.get("detection")
    if det:
        th = det["threshold"]
        lines += ["", f"Whole volumes at the default threshold ({th['threshold_method']} "
                      f"{th['threshold_value']}, >= {th['min_size_ml']} ml): "
                      f"{det['found']}/{det['lesions']} lesions found (IoU >= {DETECTION_IOU:g}), "
                      f"{det['false_positives_per_volume']:.1f} false positives per volume, "
                      f"mean volume Dice {det['mean_volume_dice']:.3f} on cases with lesions"]
    whole = result.get("whole_volume")
    if whole:
        ex = whole["exclusion"]
        limits = " / ".join(f"{limit:g}" for limit in FP_LIMITS)
        lines += ["", "Whole-volume lesion detection (synthetic phantoms; FROC in froc.png). Organ exclusion: "
                      f"{_exclusion_words(ex['roi_exclude'], ex['roi_margin_mm'])} ({ex['note']}); organ labels: "
                      f"{whole['organ_labels']}; a candidate finds a lesion at IoU >= {DETECTION_IOU:g}.", "",
                  "| method | organs excluded | operating point | lesions found | false candidates / volume | "
                  f"sensitivity at <= {limits} false candidates / volume |",
                  "|---|---|---|---|---|---|"]
        for c in whole["curves"]:
            op = c["operating_point"]
            excluded = _exclusion_words(ex["roi_exclude"], ex["roi_margin_mm"]) if c["organ_exclusion"] else "none"
            at = " / ".join(f"{v:.2f}" for v in c["sensitivity_at"].values())
            lines.append(f"| {c['method']} | {excluded} | "
                         f"{_rule_words(op['threshold_method'], op['threshold_value'], op['min_size_ml'])} | "
                         f"{_fraction(op['found'], op['lesions'])} | {op['false_positives_per_volume']:.2f} | {at} |")
        bins = whole["size_bins"]["bins"]
        lines += ["", f"Sensitivity by lesion size at the operating point ({whole['size_bins']['by']}):", "",
                  "| method | organs excluded | " + " | ".join(bins) + " |", "|---|---|" + "---|" * len(bins)]
        for c in whole["curves"]:
            excluded = "yes" if c["organ_exclusion"] else "no"
            cells = " | ".join(_fraction(b["found"], b["lesions"]) for b in c["operating_point"]["by_size"])
            lines.append(f"| {c['method']} | {excluded} | {cells} |")
    return "\n".join(lines) + "\n"


def sweep(model, n_cases: int, seed: int, out_dir: str | Path, noise_levels: list[int], guidance_scales: list[float],
          steps: Steps | None = None, phantom_kwargs: dict[str, Any] | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Hyperparameter sensitivity (IgCONDA-PET figure 13): mean DSC_opt / AUPRC over a (D, w) grid.

    Only the unhealthy slices go through the network (the metrics need no others), and each
    noise level is encoded once for all guidance scales: the same cache logic the sliders use.
    ``noise_levels`` and ``guidance_scales``: lists, or comma-separated text; every value is
    checked by the model's ``resolve`` before any work, as are the total network evaluations.
    """
    seeds = phantom_seeds(n_cases, seed)
    check_tuning_seeds(model.card, seeds)
    noise_levels = [model.resolve(noise_level=d)["noise_level"] for d in _number_list(noise_levels, "noise levels")]
    guidance_scales = [model.resolve(guidance_scale=w)["guidance_scale"]
                       for w in _number_list(guidance_scales, "guidance scales")]
    steps = model.resolve(steps=steps)["steps"]
    images, truths = [], []
    for s in seeds:
        case = make_phantom(s, **(phantom_kwargs or {}))
        x, grid = model.prepare(case.pet)
        truth = mask_to_model_space(case.lesion_labels, grid) >= 0.5
        idx = np.flatnonzero(truth.reshape(len(truth), -1).any(axis=1))
        images.append(x[idx])
        truths.append(truth[idx])
    x = np.concatenate(images)
    truth = np.concatenate(truths)
    per_slice = sum(model.evaluations_per_slice({"noise_level": d, "steps": steps}, len(guidance_scales))
                    for d in noise_levels)
    check_evaluations(len(x) * per_slice, len(x))
    out = check_writable_dir(out_dir)
    batch = torch.from_numpy(x).unsqueeze(1)
    grid_rows = []
    for d in noise_levels:
        latents = model.encode(batch, int(d), steps)
        for w in guidance_scales:
            cf = model.decode(latents, int(d), float(w), steps).squeeze(1).numpy()
            heat = np.abs(x - cf)
            rows = [_slice_metrics(heat[k], truth[k]) for k in range(len(x))]
            summ = _summarise(rows, [])
            grid_rows.append({"noise_level": int(d), "guidance_scale": float(w), "steps": steps,
                              "dsc_opt": summ["dsc_opt"], "auprc": summ["auprc"], "sensitivity": summ["sensitivity"]})
            log(f"D={d} w={w}: DSC_opt {summ['dsc_opt']:.3f} AUPRC {summ['auprc']:.3f} on {len(x)} slices")
    result = {"seeds": [seeds[0], seeds[-1]], "slices": int(len(x)), "grid": grid_rows}
    write_json(result, out / "sweep.json")
    return result


# =============================================================================================
# Whole-volume defaults: threshold rule and value, minimum size, organ exclusion, margin
# =============================================================================================
def check_tuning_seeds(card: dict[str, Any], seeds: list[int]) -> None:
    """Refuse tuning seeds that overlap the model's training or validation seeds, or :data:`EVALUATION_SEEDS`.

    Re-tuning on the card's own tuning seeds is allowed; evaluation later refuses every tuning range.
    """
    check_held_out(card, seeds, kinds=("train_seeds", "val_seeds"), what="tuning seeds", advice="choose other seeds")
    lo, hi = EVALUATION_SEEDS
    if any(lo <= s < hi for s in seeds):
        raise ValueError(f"tuning seeds {seeds[0]}..{seeds[-1]} overlap the seeds kept for held-out evaluation "
                         f"({lo}..{hi - 1}); choose other seeds, e.g. --seed {SUGGESTED_TUNING_SEED}.")


def _checked_list(values: Any, what: str, check: Callable[[Any], Any]) -> list[Any]:
    """A sweep axis (:func:`_number_list`), each entry read as a number when it is one and checked; duplicates dropped."""
    out = []
    for v in _number_list(values, what):
        v = check(number_from_text(v))
        if v not in out:
            out.append(v)
    return out


def _sweep_methods(values: Any) -> list[str]:
    def check(method):
        if method not in ("fraction", "absolute"):
            raise ValueError(f"the whole-volume sweep's threshold methods must be fraction and/or absolute (Otsu has "
                             f"no value to tune), got {method!r}.")
        return method
    return _checked_list(values, "threshold methods", check)


def _organ_sets(values: Any) -> list[tuple[str, ...]]:
    """Organ exclusion sets: ';'-separated text (each set comma-separated names or groups; 'none': no
    exclusion) or a list of sets; each name checked against TotalSegmentator's class map."""
    items = values.split(";") if isinstance(values, str) else list(values or [])
    sets: list[tuple[str, ...]] = []
    for item in items:
        names = tuple(organ_list(item, "an organ exclusion set of the sweep"))
        organ_names(names)
        if names not in sets:
            sets.append(names)
    if not sets:
        raise ValueError("the sweep needs at least one organ exclusion set ('none' for no exclusion), "
                         f"separated by ';', got {values!r}.")
    return sets


def whole_volume_grid(methods: Any = SWEEP_THRESHOLD_METHODS, fractions: Any = FROC_FRACTIONS,
                      absolute_values: Any = FROC_ABSOLUTE, min_sizes_ml: Any = SWEEP_MIN_SIZES_ML,
                      organ_excludes: Any = SWEEP_ORGAN_EXCLUDES, margins_mm: Any = SWEEP_MARGINS_MM) -> dict[str, Any]:
    """The checked axes of a whole-volume sweep (lists, or the CLI's text: comma-separated, organ sets ';'-separated).

    Every value is held to the rule the card holds its defaults to (:func:`.card.check_threshold`,
    :func:`.card.check_min_size_ml`, :func:`.card.check_margin_mm`, organ names), so a sweep refuses
    before any network work what it could not write. The margin applies to exclusion sets only.
    """
    methods = _sweep_methods(methods)
    rules = []
    for method, values in (("fraction", fractions), ("absolute", absolute_values)):
        if method in methods:
            rules += [(method, v) for v in _checked_list(
                values, f"{method} threshold values", lambda v, m=method: check_threshold(m, v))]
    return {"rules": rules,
            "min_sizes_ml": _checked_list(min_sizes_ml, "minimum sizes (ml)", check_min_size_ml),
            "organ_excludes": _organ_sets(organ_excludes),
            "margins_mm": _checked_list(margins_mm, "organ margins (mm)", check_margin_mm)}


def best_whole_volume_setting(grid: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The sweep's choice: the highest lesion sensitivity with at most :data:`MAX_FALSE_PER_VOLUME` false
    candidates per volume; ties: fewer false candidates, then the simpler setting (no exclusion before one,
    smaller margin, smaller minimum size, fraction before absolute, lower threshold value). None if no row qualifies."""
    ok = [r for r in grid if r["sensitivity"] is not None and np.isfinite(r["sensitivity"])  # None: NaN from JSON
          and r["false_positives_per_volume"] <= MAX_FALSE_PER_VOLUME * (1.0 + 1e-12)]
    if not ok:
        return None
    return min(ok, key=lambda r: (-r["sensitivity"], r["false_positives_per_volume"], len(r["organ_exclude"]),
                                  r["organ_margin_mm"], r["min_size_ml"], THRESHOLD_METHODS.index(r["threshold_method"]),
                                  r["threshold_value"]))


def whole_volume_sweep(model, n_cases: int, seed: int, out_dir: str | Path, *, steps: Steps | None = None,
                       grid: dict[str, Any] | None = None, phantom_kwargs: dict[str, Any] | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Whole-volume detection over a grid of thresholding and organ-exclusion settings on tuning phantoms.

    The model runs once per phantom at the card's noise level and guidance scale (``steps``: the
    card's unless given); every setting of ``grid`` (:func:`whole_volume_grid`; None: its defaults)
    is then scored from the cached heat map with the code :func:`evaluate` uses
    (:func:`detection_points`, :class:`DetectionTally`), and :func:`best_whole_volume_setting`
    picks the defaults. Writes sweep.json (the whole grid and the choice). Seeds, parameters and
    grid are checked before any network work.
    """
    seeds = phantom_seeds(n_cases, seed)
    check_tuning_seeds(model.card, seeds)
    model.resolve(steps=steps)
    grid = whole_volume_grid() if grid is None else grid
    out = check_writable_dir(out_dir)
    settings = [((), 0.0)] if () in grid["organ_excludes"] else []
    settings += [(names, m) for names in grid["organ_excludes"] if names for m in grid["margins_mm"]]
    tally = DetectionTally()
    params, compute, lesions_total = None, {}, 0
    for s in seeds:
        case = make_phantom(s, **(phantom_kwargs or {}))
        t0 = time.perf_counter()
        res = model.run(case.pet, steps=steps)
        network = time.perf_counter() - t0
        params, compute = res.parameters, res.compute
        lesions = CaseLesions.of(case)
        lesions_total += len(lesions.areas)
        t0 = time.perf_counter()
        for names, margin in settings:
            roi = None if not names else \
                OrganSelection(exclude=names, margin_mm=margin).mask(case.organs, grid=case.pet).voxels != 0
            points = detection_points(res.heatmap, lesions, roi, grid["rules"], grid["min_sizes_ml"])
            for point in points:
                tally.add((point["method"], point["value"], point["min_size_ml"], names, margin), point, lesions, s)
        log(f"case {s}: {len(case.lesions)} lesion(s), {network:.1f} s network, "
            f"{time.perf_counter() - t0:.1f} s for {len(settings) * len(grid['rules']) * len(grid['min_sizes_ml'])} "
            "settings")
    rows = []
    for names, margin in settings:
        for method, value in grid["rules"]:
            for size in grid["min_sizes_ml"]:
                rows.append({"threshold_method": method, "threshold_value": value, "min_size_ml": size,
                             "organ_exclude": list(names), "organ_margin_mm": margin,
                             **tally.summary((method, value, size, names, margin))})
    best = best_whole_volume_setting(rows)
    result = {"kind": "whole-volume", "seeds": [seeds[0], seeds[-1]], "cases": len(seeds), "lesions": lesions_total,
              "parameters": params, "compute": compute,
              "criterion": f"highest lesion sensitivity (IoU >= {DETECTION_IOU:g}) with at most "
                           f"{MAX_FALSE_PER_VOLUME:g} false candidate(s) per volume; ties: fewer false candidates, "
                           "then the simpler setting",
              "organ_labels": "the phantom's own anatomy with TotalSegmentator v2 ids",
              "grid": rows, "best": best}
    write_json(result, out / "sweep.json")
    if best is not None:
        log(f"best: {_setting_words(best)}: {best['found']}/{best['lesions']} lesions, "
            f"{best['false_positives_per_volume']:.2f} false candidates per volume")
    return result


def _setting_words(row: dict[str, Any]) -> str:
    return (f"{_rule_words(row['threshold_method'], row['threshold_value'], row['min_size_ml'])}, organs excluded: "
            f"{_exclusion_words(row['organ_exclude'], row['organ_margin_mm'])}")


def card_with_threshold_defaults(card: dict[str, Any], result: dict[str, Any], command: str) -> dict[str, Any]:
    """A copy of ``card`` whose thresholding and organ-exclusion defaults are the whole-volume sweep's choice.

    Noise level, guidance scale and steps are left as they are. The sweep's seeds are recorded as
    ``threshold_tuning_seeds`` (evaluate refuses them) and the choice as ``threshold_defaults_chosen_by``.
    """
    best = result.get("best")
    if best is None or not best["found"]:
        raise ValueError(
            "no setting of the sweep found a lesion with at most "
            f"{MAX_FALSE_PER_VOLUME:g} false candidate(s) per volume on the tuning phantoms ({result['lesions']} "
            "lesions); no defaults were written: use more phantoms (--phantoms) or a wider grid.")
    card = copy.deepcopy(card)
    d = card["inference_defaults"]
    d["threshold"] = {"method": best["threshold_method"], "value": float(best["threshold_value"])}
    d["min_size_ml"] = float(best["min_size_ml"])
    d["organ_exclude"] = list(best["organ_exclude"])
    d["organ_margin_mm"] = float(best["organ_margin_mm"])
    first, last = result["seeds"]
    p = result["parameters"]
    prov = card.setdefault("provenance", {})
    prov["threshold_tuning_seeds"] = [int(first), int(last) + 1]
    prov["threshold_defaults_chosen_by"] = (
        f"{command} (tuning phantom seeds {first}..{last}, {result['lesions']} lesions, {len(result['grid'])} "
        f"settings, model at noise level {p['noise_level']}, guidance scale {p['guidance_scale']:g}, steps "
        f"{p['steps']}): {result['criterion']}: {_setting_words(best)} found "
        f"{best['found']}/{best['lesions']} lesions with {best['false_positives_per_volume']:.2f} false candidates "
        "per volume")
    return card
