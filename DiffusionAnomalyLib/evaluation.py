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
TotalSegmentator's), for each method and for the 41 % SUVmax baseline on the SUV volume.
:func:`whole_volume_sweep` chooses those defaults on tuning seeds with the same code.

Several methods (:mod:`.method_catalog`) are evaluated on the same cases in one :func:`evaluate`
and compared pairwise (:func:`paired_comparison`: Wilcoxon signed-rank tests, Bonferroni);
:func:`sweep` grids any method's noise level against its guidance parameter.
"""

from __future__ import annotations

import copy
import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.stats import wilcoxon

from . import metrics
from .card import (SEED_RANGE_KEYS, THRESHOLD_METHODS, Steps, check_margin_mm, check_min_size_ml, check_threshold,
                   number_from_text, organ_list, whole_number)
from .export import write_json
from .figures import comparison_png, froc_png, sweep_png
from .files import atomic_path, check_writable_dir
from .method_catalog import BASELINES, method_spec, parameter_words
from .methods.base import check_evaluations
from .ct_phantoms import make_ct_phantom
from .phantoms import make_phantom
from .postprocessing import (Thresholding, bounding_box, inside_roi, large_enough, segment, suv_threshold_baseline, threshold_value,
                             voxel_volume_ml)
from .preprocessing import mask_to_model_space, to_model_space
from .roi import OrganSelection, organ_names
from .volume import Volume

METRIC_NAMES = ("dsc_opt", "hd95", "auprc", "sensitivity")

#: What :func:`evaluate` writes, and what :func:`sweep` writes (:func:`whole_volume_sweep`: sweep.json only).
EVALUATION_FILES: tuple[str, ...] = ("metrics.json", "metrics.md", "froc.png", "comparison.csv", "comparison.md",
                                     "comparison.png")
SWEEP_FILES: tuple[str, ...] = ("sweep.json", "sweep.png")
#: Unhealthy slices comparison.png shows, side by side for every method.
FIGURE_SLICES = 4
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
#: Default axes of the noise level / guidance sweep (:func:`sweep`, :func:`sweep_axes`): the noise levels, and the
#: values of each method's guidance parameter (:attr:`.method_catalog.MethodSpec.guidance`) around its default.
SWEEP_NOISE_LEVELS: tuple[int, ...] = (200, 300, 400, 500)
SWEEP_GUIDANCE_VALUES: dict[str, tuple[float, ...]] = {
    "guidance_scale": (0.0, 1.0, 3.0, 5.0),
    "classifier_scale": (0.0, 10.0, 100.0, 300.0),
    "tau": (0.8, 0.9, 0.95, 0.99),
}
SWEEP_GUIDANCE_SCALES: tuple[float, ...] = SWEEP_GUIDANCE_VALUES["guidance_scale"]


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
    """Refuse seeds that overlap the card's training, validation or tuning seeds (``kinds``: which ranges);
    a guidance classifier's card is named as the classifier's."""
    prov = card.get("provenance", {})
    whose = "the guidance classifier's" if card.get("method") == "classifier" else "the model's"
    for key in kinds:
        rng = prov.get(key)
        if rng and any(rng[0] <= s < rng[1] for s in seeds):
            raise ValueError(
                f"{what} {seeds[0]}..{seeds[-1]} overlap {whose} {key.replace('_', ' ')} "
                f"{rng[0]}..{rng[1] - 1}; {advice}."
            )


def card_with_best_defaults(card: dict[str, Any], sweep_result: dict[str, Any], command: str) -> dict[str, Any]:
    """A copy of ``card`` whose defaults for the swept method are the sweep's best grid point by mean DSC_opt.

    IgCONDA-PET's go to the card's top-level ``inference_defaults`` (noise_level, guidance_scale,
    steps), another method's to its section ``inference_defaults.<name>``
    (:attr:`.method_catalog.MethodSpec.card_defaults`): every parameter of the best grid point. The
    sweep's phantom seeds join ``tuning_seeds`` (the range is widened to cover earlier tuning too) so
    that ``evaluate`` refuses them: parameters chosen on a set of cases are never scored on the same
    cases. A sweep.json written before there were several methods is IgCONDA-PET's.
    """
    name = sweep_result.get("method") or card.get("method") or "igconda"
    spec = method_spec(name)
    rows = [r for r in sweep_result["grid"] if r.get("dsc_opt") is not None and np.isfinite(r["dsc_opt"])]
    if not rows:
        raise ValueError("the sweep produced no finite DSC_opt (no unhealthy slices?); no defaults were written.")
    best = max(rows, key=lambda r: r["dsc_opt"])
    chosen = {p: best[p] for p in spec.parameter_names if p in best}
    card = copy.deepcopy(card)
    defaults = card.setdefault("inference_defaults", {})
    if spec.card_defaults:
        defaults[spec.card_defaults] = {**(defaults.get(spec.card_defaults) or {}), **chosen}
    else:
        defaults.update(chosen)
    first, last = sweep_result["seeds"]
    prov = card.setdefault("provenance", {})
    earlier = prov.get("tuning_seeds")
    prov["tuning_seeds"] = [int(first), int(last) + 1] if not earlier else \
        [min(int(earlier[0]), int(first)), max(int(earlier[1]), int(last) + 1)]
    key = "inference_defaults_chosen_by" if not spec.card_defaults else f"{spec.card_defaults}_defaults_chosen_by"
    prov[key] = (f"{command} (tuning phantom seeds {first}..{last}, {sweep_result['slices']} unhealthy slices); best "
                 f"mean DSC_opt {best['dsc_opt']:.3f} at {parameter_words(name, chosen)}")
    return card


def sweep_axes(method: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The default axes of method ``method``'s :func:`sweep`: noise levels and values of its guidance parameter."""
    return SWEEP_NOISE_LEVELS, SWEEP_GUIDANCE_VALUES[method_spec(method).guidance]


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
        radius = [float(les["radius_mm"]) if "radius_mm" in les else float(les["diameter_mm"]) / 2 for les in lesions]
        return cls(labels, areas, np.array(radius))


def detection_points(score: Volume, lesions: CaseLesions, roi: np.ndarray | None,
                     rules: Sequence[tuple[str, float | None]],
                     min_sizes_ml: Sequence[float | None],
                     chain: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Whole-volume detection on one case for each threshold rule (method, value) and each minimum size.

    The candidates are those of :func:`.postprocessing.segment` with that rule inside ``roi``
    (non-zero = inside; None: the whole volume): the threshold is segment's, of the map inside the
    ROI (:func:`.postprocessing.inside_roi`), the components are labelled once per rule, and each
    minimum size filters them with segment's size rule (here, so the sizes of a sweep cost one
    labelling). A candidate finds a lesion at IoU >= :data:`DETECTION_IOU`, one-to-one
    (:func:`.metrics.match_overlaps`). One dict per (rule, size), rules outermost: ``method``,
    ``value``, ``min_size_ml``, ``found`` (bool per lesion), ``candidates``, ``false_positives``,
    ``dice`` (of all kept candidates against all lesions). ``chain``: the clean-up steps of METHODS.md
    section 4 (:meth:`.postprocessing.Thresholding.chain_arguments`), applied to every rule's candidates.
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
            labels = segment(crop, method="absolute", value=threshold, roi=None if roi is None else roi[box],
                             **(chain or {}))
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


# =============================================================================================
# evaluate: every method and baseline on the same held-out phantoms, compared pairwise
# =============================================================================================
@dataclass
class _Evaluated:
    """One method of an evaluation: its name, loaded object, parameters (as given and resolved) and operating point."""

    name: str
    model: Any
    given: dict[str, Any]
    parameters: dict[str, Any]
    thresholding: Thresholding


def _cards(model) -> list[dict[str, Any]]:
    """The model cards a method object runs on: its network's, and its guidance classifier's when it has one."""
    return [c for c in (model.card, getattr(getattr(model, "classifier", None), "card", None)) if c is not None]


def _classifier_id(model) -> str | None:
    cards = _cards(model)
    return cards[1].get("id") if len(cards) > 1 else None


def _checked_methods(methods: Any, parameters: Any, baselines: Any,
                     seeds: list[int]) -> tuple[list[_Evaluated], tuple[str, ...]]:
    """Every check of :func:`evaluate`'s methods, parameters and baselines (no phantom, no network work)."""
    if not isinstance(methods, dict) or not methods:
        raise ValueError("evaluate needs at least one method: a name and its loaded model.")
    baselines = tuple(baselines or ())
    for name in baselines:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; the baselines are: {', '.join(BASELINES)}.")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise ValueError(f"the parameters must map a method name to its parameters, got {parameters!r}.")
    extra = [name for name in parameters if name not in methods]
    if extra:
        raise ValueError(f"parameters are given for {', '.join(map(repr, extra))}, which "
                         f"{'is' if len(extra) == 1 else 'are'} not evaluated; the methods evaluated are "
                         f"{', '.join(methods)}.")
    cards: list[dict[str, Any]] = []
    for name, model in methods.items():
        method_spec(name)  # an unknown name: the list of methods
        runs = getattr(model, "method", name)
        if runs != name:
            raise ValueError(f"the model given for method {name} runs {runs}; load one for {name}.")
        cards += [c for c in _cards(model) if all(c is not seen for seen in cards)]
    for card in cards:  # every card the methods run on: no seed it was trained, validated or tuned on
        check_held_out(card, seeds)
    entries = []
    for name, model in methods.items():
        given = parameters.get(name) or {}
        if not isinstance(given, dict):
            raise ValueError(f"the parameters of {name} must map a parameter name to its value, got {given!r}.")
        given = {key: value for key, value in given.items() if value is not None}
        entries.append(_Evaluated(name, model, given, model.resolve(**given),
                                  Thresholding.for_method(model.card, name).check()))
    return entries, baselines


def _unhealthy(truth: np.ndarray) -> np.ndarray:
    """Indices of the model slices with ground-truth lesion pixels."""
    return np.flatnonzero(truth.reshape(len(truth), -1).any(axis=1))


class _FigureSlices:
    """The unhealthy slices comparison.png shows: each case's slices with the most lesion pixels (apart from
    each other), taken one case at a time, at most :data:`FIGURE_SLICES` in all."""

    def __init__(self):
        self.cases: list[list[dict[str, Any]]] = []

    def add(self, seed: int, image: np.ndarray, truth: np.ndarray, maps: dict[str, np.ndarray]) -> None:
        area = truth.reshape(len(truth), -1).sum(axis=1)
        chosen: list[dict[str, Any]] = []
        for k in np.argsort(-area, kind="stable"):
            if area[k] == 0 or len(chosen) == FIGURE_SLICES:
                break
            if all(abs(int(k) - c["slice"]) > 2 for c in chosen):
                chosen.append({"seed": seed, "slice": int(k), "image": image[k].copy(), "truth": truth[k].copy(),
                               "maps": {name: m[k].copy() for name, m in maps.items()}})  # not views: free the case
        if chosen:
            self.cases.append(chosen)

    def picked(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for rank in range(FIGURE_SLICES):
            out += [case[rank] for case in self.cases if rank < len(case)]
        return out[:FIGURE_SLICES]


def _confidence_means(per_case: list[dict[str, Any]]) -> tuple[float, float]:
    """Mean p(unhealthy) of the guidance classifier over the unhealthy and over the healthy slices (pooled)."""
    sick, healthy = [], []
    for case in per_case:
        p = np.array([np.nan if v is None else v for v in case["classifier_confidence"]], dtype=np.float64)
        mark = np.zeros(p.size, dtype=bool)
        mark[case["unhealthy_slices"]] = True
        sick += list(p[mark & np.isfinite(p)])
        healthy += list(p[~mark & np.isfinite(p)])
    return (float(np.mean(sick)) if sick else float("nan"), float(np.mean(healthy)) if healthy else float("nan"))


def evaluate(methods: dict[str, Any], n_cases: int, seed: int, out_dir: str | Path, *,
             parameters: dict[str, dict[str, Any]] | None = None, baselines: Sequence[str] = ("suv41",),
             phantom_kwargs: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate every method of ``methods`` (name -> loaded method object) and the ``baselines`` on the
    same ``n_cases`` held-out phantoms from ``seed``, compare them pairwise, and write the results.

    ``parameters``: method name -> its parameters (None or a missing name: the defaults), checked by
    the method's ``resolve``. Per method: the per-slice paper metrics (module docstring);
    whole-volume lesion detection as a FROC curve over the threshold value and at its default
    operating point (:meth:`.postprocessing.Thresholding.for_method`: the card's rule for the card's
    own method, the paper's rule for the others), each with and without the organ exclusion of
    :func:`default_exclusion` (the first method's card: every method is scored in the same ROI);
    sensitivity by lesion size; seconds, network and classifier evaluations per volume; the
    classifier's per-slice confidence when the method has one. The 41 % SUVmax baseline: the SUV
    volume at 0.41 of its maximum, the first card's minimum size. Then the paired Wilcoxon tests of
    :func:`paired_comparison`. Each method runs once per case; every curve comes from its heat map.
    Writes :data:`EVALUATION_FILES`. Every argument is checked (seeds against every card the methods
    run on) and the output folder made before any phantom goes through a network.
    """
    seeds = phantom_seeds(n_cases, seed)
    entries, baselines = _checked_methods(methods, parameters, baselines, seeds)
    first = entries[0]
    exclusion, exclusion_note = default_exclusion(first.model.card)
    out = check_writable_dir(out_dir)
    prep = first.model.card["preprocessing"]
    raw_prep = {**prep, "intensity": {"scale": 1.0, "offset": 0.0, "clip": [None, None]}}
    names = [e.name for e in entries] + list(baselines)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    runs: dict[str, dict[str, Any]] = {e.name: {"per_case": []} for e in entries}
    baseline_seconds: dict[str, list[float]] = {name: [] for name in baselines}
    curves = []
    for name, (rule, op_value), min_size in (
            [(e.name, (e.thresholding.method, e.thresholding.value), e.thresholding.min_size_ml) for e in entries]
            + [(b, ("fraction", BASELINE_FRACTION), first.thresholding.min_size_ml) for b in baselines]):
        rules, op = _curve_rules(rule, op_value)
        for excluded in (False, True):
            label = (BASELINES[name] if name in BASELINES else name) + (
                f", {_exclusion_words(exclusion.exclude, exclusion.margin_mm)} excluded" if excluded else "")
            curves.append({"key": (name, excluded), "method": name, "excluded": excluded, "label": label,
                           "rules": rules, "op": op, "min_size_ml": min_size})
    tally = DetectionTally()
    figure = _FigureSlices()
    froc_seconds = []
    for s in seeds:
        case = make_phantom(s, **(phantom_kwargs or {}))
        lesions = CaseLesions.of(case)
        rois = {False: None, True: exclusion.mask(case.organs, grid=case.pet).voxels != 0}
        grids, truths, shown = [], [], {}
        froc_seconds.append(0.0)

        def score_volume(name: str, score: Volume) -> None:
            t0 = time.perf_counter()
            for curve in curves:
                if curve["method"] == name:
                    points = detection_points(score, lesions, rois[curve["excluded"]], curve["rules"],
                                              [curve["min_size_ml"]])
                    for rule, point in zip(curve["rules"], points):
                        tally.add((curve["key"], rule), point, lesions, s)
            froc_seconds[-1] += time.perf_counter() - t0

        for e in entries:
            t0 = time.perf_counter()
            res = e.model.run(case.pet, **e.given)
            seconds = time.perf_counter() - t0
            if res.grid not in grids:  # methods on one model grid are paired slice by slice
                grids.append(res.grid)
                truths.append(mask_to_model_space(case.lesion_labels, res.grid) >= 0.5)
            g = grids.index(res.grid)
            truth = truths[g]
            unhealthy = _unhealthy(truth)
            for k in unhealthy:
                rows[e.name].append({"seed": s, "slice": int(k), "grid": g,
                                     **_slice_metrics(res.model_heat[k], truth[k])})
            if g == 0:
                shown[e.name] = res.model_heat
            conf = getattr(res, "classifier_confidence", None)
            runs[e.name]["per_case"].append({
                "seed": s, "seconds": seconds, "network_evaluations": int(res.network_evaluations),
                "classifier_evaluations": int(getattr(res, "classifier_evaluations", 0)),
                "unhealthy_slices": [int(k) for k in unhealthy],
                "classifier_confidence": None if conf is None else [float(v) for v in np.asarray(conf).ravel()]})
            runs[e.name].update(parameters=res.parameters, compute=res.compute)
            score_volume(e.name, res.heatmap)
            log(f"case {s}, {e.name}: {seconds:.1f} s, {res.network_evaluations} network evaluations")
            del res
        truth = truths[0]
        unhealthy = _unhealthy(truth)
        t0 = time.perf_counter()
        suv, _ = to_model_space(case.pet, raw_prep, grids[0])  # the SUV on the first method's model grid
        resample = time.perf_counter() - t0
        for b in baselines:  # BASELINES: the 41 % SUVmax baseline
            t0 = time.perf_counter()
            binary = suv_threshold_baseline(suv, BASELINE_FRACTION, axis=0)
            baseline_seconds[b].append(resample + time.perf_counter() - t0)
            for k in unhealthy:
                rows[b].append({"seed": s, "slice": int(k), "grid": 0,
                                **_slice_metrics(suv[k], truth[k], binary=binary[k])})
            shown[b] = binary.astype(np.float32)
            score_volume(b, case.pet)
        figure.add(s, suv, truth, shown)
        log(f"case {s}: {len(case.lesions)} lesion(s), {len(unhealthy)} unhealthy slices, "
            f"{froc_seconds[-1]:.1f} s whole-volume curves")
    whole = _whole_volume_result(curves, tally, exclusion, exclusion_note)
    whole["seconds_per_volume"] = float(np.mean(froc_seconds))
    summaries = {}
    for e in entries:
        per_case = runs[e.name]["per_case"]
        summary = _summarise(rows[e.name], [c["seconds"] for c in per_case])
        summary["network_evaluations_per_volume"] = float(np.mean([c["network_evaluations"] for c in per_case]))
        summary["classifier_evaluations_per_volume"] = float(np.mean([c["classifier_evaluations"]
                                                                      for c in per_case]))
        with_confidence = [c for c in per_case if c["classifier_confidence"] is not None]
        if with_confidence:
            summary["confidence_unhealthy"], summary["confidence_healthy"] = _confidence_means(with_confidence)
        summaries[e.name] = summary
    for b in baselines:
        summaries[b] = {**_summarise(rows[b], baseline_seconds[b]), "network_evaluations_per_volume": 0.0,
                        "classifier_evaluations_per_volume": 0.0}
    plain = tally.summary(((first.name, False), curves[0]["op"]), detail=True)
    result = {
        "protocol": "IgCONDA-PET section 3.4 on the model's slice space; synthetic phantoms (no real PET)",
        "checkpoint": first.model.card["id"],
        "seeds": [seeds[0], seeds[-1]],
        "parameters": runs[first.name]["parameters"],  # the first method's (one-method files read the same)
        "compute": runs[first.name]["compute"],
        "runs": {e.name: {"title": method_spec(e.name).title, "checkpoint": e.model.card["id"],
                          "classifier": _classifier_id(e.model),
                          "threshold": e.thresholding.as_parameters(), **runs[e.name]} for e in entries},
        "baselines": {b: BASELINES[b] for b in baselines},
        "methods": summaries,
        "per_slice": rows,
        "detection": {
            "method": first.name,
            "criterion": f"3D connected components of {first.name}'s whole-volume segmentation at its default "
                         f"threshold (no organ exclusion) vs true lesions, matched at IoU >= {DETECTION_IOU:g}",
            "threshold": first.thresholding.as_parameters(),
            "lesions": plain["lesions"], "found": plain["found"], "false_positives": plain["false_positives"],
            "lesion_sensitivity": plain["sensitivity"],
            "false_positives_per_volume": plain["false_positives_per_volume"],
            "mean_volume_dice": plain["mean_volume_dice"],
            "per_case": plain["per_case"],
        },
        "whole_volume": whole,
    }
    result["comparison"] = paired_comparison(_paired_values(result, names), names)
    _write_evaluation(out, result, figure.picked())
    return result


def _write_evaluation(out: Path, result: dict[str, Any], picked: list[dict[str, Any]]) -> None:
    """Write :data:`EVALUATION_FILES` of an :func:`evaluate` result; ``picked``: the slices comparison.png shows."""
    first, last = result["seeds"]
    write_json(result, out / "metrics.json")
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(markdown_table(result), encoding="utf-8")
    with atomic_path(out / "froc.png", suffix=".png") as tmp:
        froc_png(tmp, _figure_curves(result["whole_volume"]), max_fp=FP_LIMITS[-1],
                 title=f"Whole-volume FROC on synthetic phantoms (not clinical data)\n{result['checkpoint']}, "
                       f"seeds {first}..{last}, {result['detection']['lesions']} lesions")
    table = comparison_rows(result)
    with atomic_path(out / "comparison.csv", suffix=".csv") as tmp:
        _write_csv(tmp, table)
    with atomic_path(out / "comparison.md") as tmp:
        tmp.write_text(comparison_markdown(result, table), encoding="utf-8")
    header = [h for key, h, _ in COMPARISON_COLUMNS if key in FIGURE_COLUMNS]
    cells = [[_cell(row[key], fmt) for key, _, fmt in COMPARISON_COLUMNS if key in FIGURE_COLUMNS] for row in table]
    shown = [n for n in result["methods"] if picked and all(n in p["maps"] for p in picked)]
    with atomic_path(out / "comparison.png", suffix=".png") as tmp:
        comparison_png(tmp, np.array([p["image"] for p in picked]), np.array([p["truth"] for p in picked]),
                       {n: np.array([p["maps"][n] for p in picked]) for n in shown}, header, cells,
                       slice_names=[f"seed {p['seed']}, k={p['slice']}" for p in picked],
                       title="Methods on the same held-out phantom slices (synthetic, not clinical data): input "
                             f"(SUV), ground truth, each method's map; seeds {first}..{last}")


def _figure_curves(whole: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for curve in whole["curves"]:
        points = sorted(curve["points"], key=lambda p: -p["threshold_value"])  # high threshold first: few candidates
        op = curve["operating_point"]
        out.append({"label": curve["label"], "group": curve["method"], "excluded": curve["organ_exclusion"],
                    "fp": [p["false_positives_per_volume"] for p in points],
                    "sensitivity": [p["sensitivity"] for p in points],
                    "operating_point": (op["false_positives_per_volume"], op["sensitivity"])})
    return out


# ---- the paired comparison -----------------------------------------------------------------------
#: Fewest non-zero paired differences a Wilcoxon test is run on: with n of them even the exact two-sided
#: p is at least 2 / 2**n, so below 6 no difference could reach p < 0.05.
MIN_PAIRS = 6
#: Significance level of the comparison, after the Bonferroni correction.
ALPHA = 0.05
#: The paired figures: (key, name, what is paired). Per slice: the unhealthy model slices of every case;
#: per volume: each case at the method's default operating point without organ exclusion.
PAIRED_METRICS: tuple[tuple[str, str, str], ...] = (
    ("dsc_opt", "DSC_opt", "slice"), ("hd95", "HD95 (px)", "slice"), ("auprc", "AUPRC", "slice"),
    ("volume_sensitivity", "whole-volume sensitivity", "volume"),
    ("false_candidates", "false candidates", "volume"),
)


def _paired_values(result: dict[str, Any], names: Sequence[str]) -> dict[str, dict[str, dict[Any, float]]]:
    """metric -> method -> {pairing key: value}: slices keyed (seed, slice, model grid), volumes by seed."""
    out: dict[str, dict[str, dict[Any, float]]] = {key: {} for key, _, _ in PAIRED_METRICS}
    ops = {c["method"]: c["operating_point"] for c in result["whole_volume"]["curves"] if not c["organ_exclusion"]}
    for name in names:
        for key, _, unit in PAIRED_METRICS:
            if unit == "slice":
                out[key][name] = {(r["seed"], r["slice"], r["grid"]): r[key] for r in result["per_slice"][name]}
        cases = ops[name]["per_case"]
        out["volume_sensitivity"][name] = {c["seed"]: c["found"] / c["lesions"] if c["lesions"] else float("nan")
                                           for c in cases}
        out["false_candidates"][name] = {c["seed"]: float(c["false_positives"]) for c in cases}
    return out


def wilcoxon_pair(a: dict[Any, float], b: dict[Any, float]) -> dict[str, Any]:
    """The paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided) of ``a`` against ``b``
    on the keys both have, pairs with a non-finite value left out.

    Returns n (pairs), nonzero (pairs that differ), median_difference (of a - b), statistic and p;
    with no pair differing, or fewer than :data:`MIN_PAIRS` that do, statistic and p are None and
    ``note`` says why (no test is run).
    """
    keys = sorted(set(a) & set(b))
    x = np.array([a[k] for k in keys], dtype=np.float64)
    y = np.array([b[k] for k in keys], dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    diff = x - y
    nonzero = int(np.count_nonzero(diff))
    out = {"n": int(diff.size), "nonzero": nonzero,
           "median_difference": float(np.median(diff)) if diff.size else float("nan"),
           "statistic": None, "p": None, "note": ""}
    if not diff.size:
        out["note"] = "no pairs"
    elif nonzero == 0:
        out["note"] = f"all {diff.size} differences are zero"
    elif nonzero < MIN_PAIRS:
        out["note"] = f"too few pairs that differ ({nonzero} < {MIN_PAIRS})"
    else:
        test = wilcoxon(x, y)
        out["statistic"], out["p"] = float(test.statistic), float(test.pvalue)
    return out


def paired_comparison(values: dict[str, dict[str, dict[Any, float]]], names: Sequence[str]) -> dict[str, Any]:
    """Every pair of methods (in ``names`` order) on each metric of ``values`` (metric -> method -> {key:
    value}, the keys pairing the samples): :func:`wilcoxon_pair`, then the Bonferroni correction over all
    tests run (p x tests, at most 1; written out: it is one multiplication). A test is significant when
    its corrected p is below :data:`ALPHA`."""
    labels = {key: (label, unit) for key, label, unit in PAIRED_METRICS}
    tests = []
    for metric, by_method in values.items():
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if a in by_method and b in by_method:
                    label, unit = labels.get(metric, (metric, ""))
                    tests.append({"metric": metric, "label": label, "paired": unit, "a": a, "b": b,
                                  **wilcoxon_pair(by_method[a], by_method[b])})
    run = sum(t["p"] is not None for t in tests)
    for t in tests:
        t["p_corrected"] = None if t["p"] is None else min(1.0, t["p"] * run)
        t["significant"] = None if t["p"] is None else bool(t["p_corrected"] < ALPHA)
        t["result"] = t["note"] or (f"{'significant' if t['significant'] else 'not significant'} at {ALPHA:g} "
                                    "after Bonferroni")
    return {"test": "Paired Wilcoxon signed-rank tests (scipy.stats.wilcoxon, two-sided, zero differences dropped)",
            "correction": "Bonferroni", "alpha": ALPHA, "tests_run": run, "tests": tests}


# ---- the comparison table: one owner of its columns ---------------------------------------------
#: The columns of comparison.csv, comparison.md and (:data:`FIGURE_COLUMNS`) the table of comparison.png:
#: (key, header, format). Whole-volume figures are at each method's default operating point.
COMPARISON_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "s"),
    ("slices", "slices", "d"),
    ("dsc_opt", "DSC_opt", ".3f"),
    ("hd95", "HD95 (px)", ".2f"),
    ("auprc", "AUPRC", ".3f"),
    ("sensitivity", "slice detection sensitivity", ".3f"),
    ("lesions", "lesions", "d"),
    ("volume_sensitivity", "whole-volume sensitivity", ".3f"),
    ("false_candidates_per_volume", "false candidates / volume", ".2f"),
    ("volume_sensitivity_excluded", "whole-volume sensitivity, organs excluded", ".3f"),
    ("false_candidates_per_volume_excluded", "false candidates / volume, organs excluded", ".2f"),
    ("operating_point", "operating point", "s"),
    ("seconds_per_volume", "s / volume", ".2f"),
    ("network_evaluations_per_volume", "network evaluations / volume", ".0f"),
    ("classifier_evaluations_per_volume", "classifier evaluations / volume", ".0f"),
    ("confidence_unhealthy", "mean p(unhealthy), unhealthy slices", ".3f"),
    ("confidence_healthy", "mean p(unhealthy), healthy slices", ".3f"),
    ("parameters", "parameters", "s"),
)
#: The columns of :data:`COMPARISON_COLUMNS` the figure's table shows (the figure has room for few).
FIGURE_COLUMNS: tuple[str, ...] = ("method", "dsc_opt", "hd95", "auprc", "volume_sensitivity",
                                   "false_candidates_per_volume", "seconds_per_volume",
                                   "network_evaluations_per_volume")


def comparison_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method and baseline of an :func:`evaluate` result, keyed by :data:`COMPARISON_COLUMNS`."""
    ops = {(c["method"], c["organ_exclusion"]): c["operating_point"] for c in result["whole_volume"]["curves"]}
    rows = []
    for name, summary in result["methods"].items():
        plain, excluded = ops[(name, False)], ops[(name, True)]
        run = result.get("runs", {}).get(name)
        row = {**summary, "method": name, "lesions": plain["lesions"],
               "volume_sensitivity": plain["sensitivity"],
               "false_candidates_per_volume": plain["false_positives_per_volume"],
               "volume_sensitivity_excluded": excluded["sensitivity"],
               "false_candidates_per_volume_excluded": excluded["false_positives_per_volume"],
               "operating_point": _rule_words(plain["threshold_method"], plain["threshold_value"],
                                             plain["min_size_ml"]),
               "parameters": parameter_words(name, run["parameters"]) if run else result["baselines"][name]}
        rows.append({key: row.get(key, float("nan")) for key, _, _ in COMPARISON_COLUMNS})
    return rows


def _cell(value: Any, fmt: str) -> str:
    """A table cell: the value in its format, "-" for none."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, fmt)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """comparison.csv: a header of :data:`COMPARISON_COLUMNS` keys, numbers in full, an empty cell for none."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key for key, _, _ in COMPARISON_COLUMNS])
        for row in rows:
            writer.writerow(["" if v is None or (isinstance(v, float) and not np.isfinite(v)) else v
                             for v in (row[key] for key, _, _ in COMPARISON_COLUMNS)])


def _p_words(p: float | None) -> str:
    return "-" if p is None else ("< 0.0001" if p < 1e-4 else f"{p:.4f}")


def comparison_markdown(result: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> str:
    """comparison.md: the metric table (:data:`COMPARISON_COLUMNS`) and the paired tests."""
    rows = comparison_rows(result) if rows is None else rows
    comp = result["comparison"]
    lines = [f"Methods on the same held-out phantom cases (seeds {result['seeds'][0]}..{result['seeds'][1]}; "
             "synthetic phantoms, not clinical data). Per-slice metrics on the unhealthy model slices; whole-volume "
             "figures at each method's default operating point.", "",
             "| " + " | ".join(h for _, h, _ in COMPARISON_COLUMNS) + " |",
             "|" + "---|" * len(COMPARISON_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[key], fmt) for key, _, fmt in COMPARISON_COLUMNS) + " |")
    lines += ["", f"{comp['test']} between every pair of methods: per slice on the same unhealthy slices, "
                  "per volume on the same cases (no organ exclusion). "
                  f"{comp['correction']} correction over the {comp['tests_run']} tests run (corrected p = p x "
                  f"{comp['tests_run']}, at most 1); a pair with no differing values or fewer than {MIN_PAIRS} is "
                  "not tested.", "",
              "| metric | A | B | n | median A - B | p | corrected p | result |", "|---|---|---|---|---|---|---|---|"]
    for t in comp["tests"]:
        lines.append(f"| {t['label']} | {t['a']} | {t['b']} | {t['n']} | {_cell(t['median_difference'], '.3g')} | "
                     f"{_p_words(t['p'])} | {_p_words(t['p_corrected'])} | {t['result']} |")
    return "\n".join(lines) + "\n"


def _fraction(found: int, lesions: int) -> str:
    return f"{found}/{lesions} ({found / lesions:.2f})" if lesions else "-"


def markdown_table(result: dict[str, Any]) -> str:
    """metrics.md (and what ``evaluate`` prints): per-slice metrics, whole-volume detection, FROC read-outs."""
    runs = result.get("runs") or {}
    lines = [f"Held-out phantom seeds {result['seeds'][0]}..{result['seeds'][1]}"
             + (f", {result['compute'].get('precision')} on {result['compute'].get('device')}"
                if result.get("compute") else "")]
    if runs:
        lines += [f"- {name}: {run['title']}; {parameter_words(name, run['parameters'])}" for name, run in runs.items()]
    else:
        lines[0] += f", parameters {result['parameters']}"
    lines += ["",
              "| method | DSC_opt | HD95 (px) | AUPRC | sensitivity | s / volume | network evaluations / volume | "
              "slices |", "|---|---|---|---|---|---|---|---|"]
    for m, r in result["methods"].items():
        lines.append(f"| {m} | {r['dsc_opt']:.3f} | {r['hd95']:.2f} | {r['auprc']:.3f} | {r['sensitivity']:.3f} | "
                     f"{r['seconds_per_volume']:.1f} | {_cell(r.get('network_evaluations_per_volume'), '.0f')} | "
                     f"{r['slices']} |")
    sure = {m: r for m, r in result["methods"].items() if "confidence_unhealthy" in r}
    if sure:
        lines += ["", "Guidance classifier confidence (mean p(unhealthy | slice) at t = 0; per slice in metrics.json): "
                  + "; ".join(f"{m}: {_cell(r['confidence_unhealthy'], '.3f')} on unhealthy slices, "
                              f"{_cell(r['confidence_healthy'], '.3f')} on healthy slices" for m, r in sure.items())]
    det = result.get("detection")
    if det:
        th = det["threshold"]
        lines += ["", f"Whole volumes{' of ' + det['method'] if 'method' in det else ''} at the default threshold "
                      f"({th['threshold_method']} {th['threshold_value']}, >= {th['min_size_ml']} ml): "
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


def sweep(model, n_cases: int, seed: int, out_dir: str | Path, noise_levels: Any = None, guidance_values: Any = None,
          steps: Any = None, phantom_kwargs: dict[str, Any] | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Hyperparameter sensitivity (IgCONDA-PET figure 13) of any method: mean DSC_opt / AUPRC over a grid of
    noise level x the method's guidance parameter (:attr:`.method_catalog.MethodSpec.guidance`:
    guidance_scale, classifier_scale or tau).

    ``noise_levels`` and ``guidance_values``: lists, or comma-separated text (None:
    :data:`SWEEP_NOISE_LEVELS`, :data:`SWEEP_GUIDANCE_VALUES`); ``steps`` as the method takes it
    (None: its default); the other parameters are the method's defaults. Only the unhealthy slices
    go through the network, by ``model.compute`` one case at a time, every guidance value of a
    noise level in turn, so the method's cache does what a slider move does (IgCONDA-PET and
    classifier-guided DDIM invert each case once per noise level). Every grid point is checked by
    ``model.resolve`` and the network evaluations (``model.evaluations_per_slice`` of each noise
    level with all its guidance values) by :func:`.methods.base.check_evaluations` before any
    network work. Writes :data:`SWEEP_FILES`: sweep.json (rows name the axes by parameter name)
    and sweep.png.
    """
    seeds = phantom_seeds(n_cases, seed)
    for card in _cards(model):
        check_tuning_seeds(card, seeds)
    name = getattr(model, "method", None) or model.card["method"]
    spec = method_spec(name)
    axis = spec.guidance
    levels = _number_list(SWEEP_NOISE_LEVELS if noise_levels is None else noise_levels, "noise levels")
    values = _number_list(SWEEP_GUIDANCE_VALUES[axis] if guidance_values is None else guidance_values,
                          spec.parameter(axis).words.rsplit(" ", 1)[0] + "s")  # "guidance scale w" -> "guidance scales"
    fixed = {} if steps is None else {"steps": steps}
    grid = [[model.resolve(noise_level=d, **{axis: g}, **fixed) for g in values] for d in levels]
    levels = [row[0]["noise_level"] for row in grid]
    values = [p[axis] for p in grid[0]]
    cases = []
    for s in seeds:
        x, truth = _tuning_slices(model, s, phantom_kwargs)
        idx = _unhealthy(truth)
        if idx.size:
            cases.append((s, np.ascontiguousarray(x[idx]), idx, truth[idx]))
    slices = sum(len(c[2]) for c in cases)
    if not slices:
        raise ValueError(f"the tuning phantoms {seeds[0]}..{seeds[-1]} have no unhealthy model slice; use more "
                         "phantoms.")
    check_evaluations(slices * sum(model.evaluations_per_slice(row[0], guidance_values=len(row)) for row in grid),
                      slices)
    out = check_writable_dir(out_dir)
    before = getattr(model, "network_evaluations", None)
    t_start = time.perf_counter()
    scored: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for i, row in enumerate(grid):
        for s, x, idx, truth in cases:
            for j, params in enumerate(row):  # one noise level and case: the method's cache keeps its inversion
                maps = model.compute(x, idx, params)
                scored.setdefault((i, j), []).extend(_slice_metrics(maps.heat[k], truth[k]) for k in range(len(x)))
        for j, params in enumerate(row):
            summ = _summarise(scored[i, j], [])
            log(f"{parameter_words(name, {'noise_level': levels[i], axis: values[j]})}: DSC_opt "
                f"{summ['dsc_opt']:.3f} AUPRC {summ['auprc']:.3f} on {slices} slices")
    rows = []
    for i, row in enumerate(grid):
        for j, params in enumerate(row):
            summ = _summarise(scored[i, j], [])
            rows.append({**params, **{k: summ[k] for k in ("dsc_opt", "hd95", "auprc", "sensitivity")}})
    result = {"method": name, "noise_level": "noise_level", "guidance": axis, "noise_levels": levels,
              "guidance_values": values, "seeds": [seeds[0], seeds[-1]], "slices": int(slices),
              "seconds": time.perf_counter() - t_start,
              "network_evaluations": None if before is None else model.network_evaluations - before,
              "grid": rows}
    write_json(result, out / "sweep.json")
    panels = {f"mean {label}": np.array([[r[key] for r in rows[i * len(values):(i + 1) * len(values)]]
                                        for i in range(len(levels))], dtype=np.float64)
              for key, label in (("dsc_opt", "DSC_opt"), ("auprc", "AUPRC"))}
    with atomic_path(out / "sweep.png", suffix=".png") as tmp:
        sweep_png(tmp, levels, values, panels, noise_label=spec.parameter("noise_level").label,
                  guidance_label=spec.parameter(axis).label,
                  title=f"{spec.title} on tuning phantoms {seeds[0]}..{seeds[-1]} ({slices} unhealthy slices; "
                        "synthetic, not clinical data)")
    return result


# =============================================================================================
# Whole-volume defaults: threshold rule and value, minimum size, organ exclusion, margin
# =============================================================================================
def _tuning_slices(model, seed: int, phantom_kwargs: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(model slices, lesion truth per model pixel) of tuning phantom ``seed`` as ``model`` sees it: a whole-body
    PET phantom, or for a CT organ model (card ``preprocessing.crop``) the crops of an abdominal CT phantom around
    its card's organs (the phantom's organ map standing in for TotalSegmentator)."""
    if "crop" in model.card["preprocessing"]:
        case = make_ct_phantom(seed, **(phantom_kwargs or {}))
        _, region = OrganSelection.from_card(model.card).masks(case.organs, grid=case.ct)
        x, model_grid = model.prepare(case.ct, region=region)
    else:
        case = make_phantom(seed, **(phantom_kwargs or {}))
        x, model_grid = model.prepare(case.pet)
    return x, mask_to_model_space(case.lesion_labels, model_grid) >= 0.5


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
    crop = "crop" in model.card["preprocessing"]
    chain = Thresholding.from_card(model.card).chain_arguments()
    for s in seeds:
        t0 = time.perf_counter()
        if crop:  # a CT organ model: an abdominal CT phantom, analysed inside its card's organs, as run does
            case = make_ct_phantom(s, **(phantom_kwargs or {}))
            image = case.ct
            inside, region = OrganSelection.from_card(model.card).masks(case.organs, grid=image)
            inside = inside != 0
            res = model.run(image, steps=steps, region=region)
        else:
            case = make_phantom(s, **(phantom_kwargs or {}))
            image, inside = case.pet, None
            res = model.run(image, steps=steps)
        network = time.perf_counter() - t0
        params, compute = res.parameters, res.compute
        lesions = CaseLesions.of(case)
        lesions_total += len(lesions.areas)
        t0 = time.perf_counter()
        for names, margin in settings:
            roi = inside if not names else \
                OrganSelection(exclude=names, margin_mm=margin).mask(case.organs, grid=image).voxels != 0
            if names and inside is not None:
                roi &= inside
            points = detection_points(res.heatmap, lesions, roi, grid["rules"], grid["min_sizes_ml"], chain)
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
    result = {"kind": "whole-volume", "method": getattr(model, "method", None) or model.card["method"],
              "seeds": [seeds[0], seeds[-1]], "cases": len(seeds), "lesions": lesions_total,
              "parameters": params, "compute": compute,
              "criterion": f"highest lesion sensitivity (IoU >= {DETECTION_IOU:g}) with at most "
                           f"{MAX_FALSE_PER_VOLUME:g} false candidate(s) per volume; ties: fewer false candidates, "
                           "then the simpler setting",
              "organ_labels": "the phantom's own anatomy with TotalSegmentator v2 ids",
              **({"post_processing": chain} if any(chain.values()) else {}),
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
    chain = {k: v for k, v in d.get("threshold", {}).items() if k not in ("method", "value")}  # section 4 steps stay
    d["threshold"] = {"method": best["threshold_method"], "value": float(best["threshold_value"]), **chain}
    d["min_size_ml"] = float(best["min_size_ml"])
    d["organ_exclude"] = list(best["organ_exclude"])
    if best["organ_exclude"]:  # the margin of an exclusion; without one the card's margin (its included organs') stays
        d["organ_margin_mm"] = float(best["organ_margin_mm"])
    first, last = result["seeds"]
    p = result["parameters"]
    prov = card.setdefault("provenance", {})
    prov["threshold_tuning_seeds"] = [int(first), int(last) + 1]
    prov["threshold_defaults_chosen_by"] = (
        f"{command} (tuning phantom seeds {first}..{last}, {result['lesions']} lesions, {len(result['grid'])} "
        f"settings, model {result.get('method', card['method'])} at {parameter_words(result.get('method', card['method']), p)}"
        f"): {result['criterion']}: {_setting_words(best)} found "
        f"{best['found']}/{best['lesions']} lesions with {best['false_positives_per_volume']:.2f} false candidates "
        "per volume")
    return card
