"""CT organ-lesion evaluation (METHODS.md section 4): per-lesion detection at IoU >= 0.2, precision / recall / F1
per case, FROC with bootstrap 95 % confidence intervals, recall by size stratum (largest diameter), Dice.

Two case sets, always reported apart: held-out abdominal CT phantoms (:mod:`.ct_phantoms`) and the real-anatomy
set (:func:`.ct_lesions.real_anatomy_set`: lesions inserted into the real CTs' TotalSegmentator kidneys and
pancreas; never trained on). Each case's organ map stands in for TotalSegmentator; the model runs with its
card's organs and margin (:meth:`.roi.OrganSelection.from_card`) and its default method and thresholding, as
``diffusion-anomaly run`` would. A phantom set also gets a ceiling row: the same cases and post-processing with
each phantom's noise-free healthy twin as the counterfactual (:func:`ceiling_case`), so a reader sees how much of a
shortfall is the model's and how much the post-processing's.
"""

from __future__ import annotations

import csv
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from . import metrics
from .ct_lesions import CtCase, LESION_ORGANS
from .ct_phantoms import make_ct_phantom
from .export import write_json
from .figures import froc_png
from .files import atomic_path
from .pipeline import analyse, method_name
from .postprocessing import Thresholding, inside_roi, threshold_value
from .preprocessing import model_units_to_input, model_values_to_input, normalise_intensity
from .roi import OrganSelection
from .volume import Volume

#: the files ``evaluate`` writes for a CT model (one set per case set: phantoms, real anatomy)
CT_EVALUATION_FILES = ("ct-metrics.json", "ct-metrics.md", "ct-froc.png", "ct-cases.csv")
#: METHODS.md section 4: a candidate finds a lesion at IoU >= 0.2
CT_DETECTION_IOU = 0.2
#: where the FROC is read (false candidates per scan), with its bootstrap interval
CT_FP_LIMITS = (0.5, 1.0, 2.0, 4.0, 8.0)
#: the FROC's candidates: the default chain at this fraction of the threshold actually applied, each scored by its
#: maximum heat (candidates of the operating point itself would cut the curve off at the operating point)
FROC_THRESHOLD_FACTOR = 0.5
BOOTSTRAP_RESAMPLES = 1000
#: the ceiling rows' method: each phantom's own healthy twin as the counterfactual (:func:`ceiling_case`)
CEILING_METHOD = "healthy twin (ceiling)"
#: a lesion's mean contrast against the healthy twin below which its share of contrast removed is not computed (HU)
MIN_CONTRAST_HU = 5.0
#: the issue's target at the default operating point on held-out phantoms: kidney-lesion recall and false candidates
KIDNEY_RECALL_TARGET, FP_PER_SCAN_TARGET = 0.6, 2.0


def _candidate_scores(heat: np.ndarray, labels: np.ndarray) -> np.ndarray:
    n = int(labels.max())
    if n == 0:
        return np.zeros(0)
    return np.asarray(ndimage.maximum(heat, labels, np.arange(1, n + 1)), dtype=np.float64)


def evaluate_case(model, case: CtCase, thresholding: Thresholding | None = None,
                  parameters: dict[str, Any] | None = None, twin: Volume | None = None) -> dict[str, Any]:
    """One case: the model at its defaults inside its card's organs, matched against the case's lesions; with the
    phantom's :func:`healthy_twin`, also how far the model's counterfactual is from it
    (:func:`counterfactual_error`)."""
    roi, region = OrganSelection.from_card(model.card).masks(case.organs, grid=case.ct)
    clock = time.perf_counter()
    result = analyse(model, case.ct, parameters=parameters, thresholding=thresholding, roi=roi, region=region)
    seconds = time.perf_counter() - clock
    row = {**_score(case, result.heatmap, result.thresholding, roi, seconds),
           "network_evaluations": int(result.network_evaluations),
           "method": method_name(model), "parameters": result.parameter_record()}
    if twin is not None and result.counterfactual is not None:
        row["counterfactual_error"] = counterfactual_error(model.card, case, result.counterfactual, twin, roi)
    return row


def counterfactual_error(card: dict[str, Any], case: CtCase, counterfactual: Volume, twin: Volume,
                         roi: np.ndarray) -> dict[str, Any]:
    """How far a counterfactual is from the phantom's healthy twin, in the card's intensity window (HU): the median
    and 90th percentile of |counterfactual - twin| in the card's organs (no margin) more than 2 voxels from any
    lesion (a perfect healthy counterfactual: 0), and per lesion the share of its contrast (input - twin) the
    counterfactual removed (1: healed, 0: copied; None for a lesion of less than :data:`MIN_CONTRAST_HU` mean
    contrast, whose share would be noise)."""
    prep = card["preprocessing"]
    window = [model_values_to_input(normalise_intensity(v.voxels, prep), prep) for v in (case.ct, counterfactual, twin)]
    x, cf, tw = window
    lesions = np.asarray(case.lesion_labels.voxels)
    organs = replace(OrganSelection.from_card(card), margin_mm=0.0).mask(case.organs, grid=case.ct).voxels
    normal = (np.asarray(roi) != 0) & (np.asarray(organs) != 0)
    normal &= ~ndimage.binary_dilation(lesions > 0, iterations=2)
    error = np.abs(cf - tw)[normal]
    healed = []
    for n in range(1, len(case.lesions) + 1):
        inside = lesions == n
        contrast = float((x - tw)[inside].mean()) if inside.any() else 0.0
        left = float((cf - tw)[inside].mean()) if inside.any() else 0.0
        healed.append(round(1.0 - left / contrast, 2) if abs(contrast) >= MIN_CONTRAST_HU else None)
    return {"normal_tissue_median_hu": round(float(np.median(error)), 1) if error.size else None,
            "normal_tissue_p90_hu": round(float(np.percentile(error, 90)), 1) if error.size else None,
            "lesion_contrast_removed": healed}


def healthy_twin(case: CtCase) -> Volume | None:
    """The phantom ``case`` without its lesions and without noise (same seed, phase and anatomy: the phantom's
    streams are separate, :mod:`.ct_phantoms`), on its grid; None for a case that is not a default-grid phantom."""
    if case.source != "phantom":
        return None
    twin = make_ct_phantom(case.seed, phase=case.phase, n_lesions=0, noise_sd_hu=0).ct
    same = twin.voxels.shape == case.ct.voxels.shape and np.allclose(twin.ijk_to_ras, case.ct.ijk_to_ras)
    return twin if same else None


def ceiling_case(card: dict[str, Any], case: CtCase, thresholding: Thresholding,
                 twin: Volume | None = None) -> dict[str, Any] | None:
    """One phantom case with its :func:`healthy_twin` (``twin`` when already made) as the counterfactual:
    |input - twin| in the card's intensity window, through the same organs and post-processing as the model; None
    without a twin. The best any healthy counterfactual could do (the input keeps its noise): what is left between
    it and the model is the model's."""
    twin = healthy_twin(case) if twin is None else twin
    if twin is None:
        return None
    prep = card["preprocessing"]
    roi, _ = OrganSelection.from_card(card).masks(case.organs, grid=case.ct)
    clock = time.perf_counter()
    diff = np.abs(normalise_intensity(case.ct.voxels, prep) - normalise_intensity(twin.voxels, prep))
    heat = case.ct.with_voxels(model_units_to_input(diff, prep), units=f"|{case.ct.units} difference|")
    return {**_score(case, heat, thresholding, roi, time.perf_counter() - clock),
            "network_evaluations": 0, "method": CEILING_METHOD, "parameters": {}}


def _score(case: CtCase, heat: Volume, thresholding: Thresholding, roi: np.ndarray, seconds: float) -> dict[str, Any]:
    """The detection record of one heat map of ``case``: ``thresholding`` inside ``roi`` at the operating point,
    and the FROC candidates at :data:`FROC_THRESHOLD_FACTOR` x its cut-off."""
    truth = np.asarray(case.lesion_labels.voxels)
    n_truth = len(case.lesions)
    labels = thresholding.apply(heat, roi)
    op = metrics.match_labels(labels, truth, CT_DETECTION_IOU, n_truth=n_truth)
    applied = threshold_value(inside_roi(heat.voxels, roi), thresholding.method, thresholding.value)
    low = replace(thresholding, method="absolute", value=FROC_THRESHOLD_FACTOR * applied)
    candidates = low.apply(heat, roi) if applied > 0 else np.zeros(truth.shape, np.int32)
    froc = metrics.match_labels(candidates, truth, CT_DETECTION_IOU, n_truth=n_truth)
    diameters = metrics.lesion_diameters_mm(truth, case.ct.ijk_to_ras, n=n_truth)
    pred, true = labels > 0, truth > 0
    dice = metrics.dice(pred, true) if true.any() else float("nan")
    return {
        "seed": case.seed, "source": case.source, "phase": case.phase, "lesions": n_truth,
        "tp": int(op["tp"]), "fp": int(op["fp"]), "fn": int(op["fn"]), "precision": float(op["precision"]),
        "recall": float(op["recall"]), "f1": float(op["f1"]), "dice": dice,
        "threshold": float(applied), "seconds": round(seconds, 2),
        "lesion_records": [{**les, "found": bool(found), "diameter_measured_mm": round(float(d), 1)}
                           for les, found, d in zip(case.lesions, op["found"], diameters)],
        "froc_scores": _candidate_scores(heat.voxels, candidates).tolist(),
        "froc_hits": [bool(h) for h in froc["hit"]],
    }


def _mean(values: list[float]) -> float:
    """The mean of the finite values (NaN when there are none: a case set without lesions, or no candidate)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _recall(lesions: list[dict[str, Any]]) -> dict[str, Any]:
    found = sum(les["found"] for les in lesions)
    return {"lesions": len(lesions), "found": int(found), "recall": found / len(lesions) if lesions else float("nan")}


def summarise(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Pooled and per-case figures of ``rows`` (:func:`evaluate_case`) of one case set."""
    lesions = [les for r in rows for les in r["lesion_records"]]
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    with_lesions = [r for r in rows if r["lesions"]]
    per_case = {k: _mean([r[k] for r in with_lesions]) for k in ("precision", "recall", "f1", "dice")}
    families = sorted({LESION_ORGANS.get(les["organ"], les["organ"]) for les in lesions})
    froc = metrics.froc_curve([r["froc_scores"] for r in rows], [r["froc_hits"] for r in rows],
                              [r["lesions"] for r in rows])
    band = metrics.froc_bootstrap([r["froc_scores"] for r in rows], [r["froc_hits"] for r in rows],
                                  [r["lesions"] for r in rows], CT_FP_LIMITS, n_resamples=BOOTSTRAP_RESAMPLES)
    sizes = [les["diameter_measured_mm"] for les in lesions]
    return {
        "set": name, "cases": len(rows), "cases_with_lesions": len(with_lesions), "lesions": len(lesions),
        "operating_point": {
            "tp": tp, "fp": fp, "fn": fn, "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
            "false_positives_per_scan": fp / len(rows) if rows else float("nan"),
            "per_case_mean": per_case,
            "by_organ": {fam: _recall([les for les in lesions if LESION_ORGANS.get(les["organ"]) == fam])
                         for fam in families},
            "by_kind": {kind: _recall([les for les in lesions if les["kind"] == kind])
                        for kind in sorted({les["kind"] for les in lesions})},
            "by_phase": {phase: _recall([les for r in rows if r["phase"] == phase for les in r["lesion_records"]])
                         for phase in sorted({r["phase"] for r in rows})},
            "by_size": metrics.recall_by_size([les["found"] for les in lesions], sizes) if lesions else [],
        },
        "froc": {"false_positives_per_scan": froc["false_positives_per_scan"].tolist(),
                 "sensitivity": froc["sensitivity"].tolist(), "read_at": band,
                 "candidates": f"the default chain at {FROC_THRESHOLD_FACTOR:g} x the threshold applied, scored by "
                               "their maximum heat"},
        "seconds_per_case": float(np.mean([r["seconds"] for r in rows])) if rows else float("nan"),
        **({"counterfactual_error": _pooled_error([r["counterfactual_error"] for r in rows])}
           if rows and all("counterfactual_error" in r for r in rows) else {}),
    }


def _pooled_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """A set's :func:`counterfactual_error`: the median over cases of each case's figures and over lesions of the
    share removed."""
    removed = [v for e in errors for v in e["lesion_contrast_removed"] if v is not None]
    medians = [e["normal_tissue_median_hu"] for e in errors if e["normal_tissue_median_hu"] is not None]
    p90s = [e["normal_tissue_p90_hu"] for e in errors if e["normal_tissue_p90_hu"] is not None]
    return {"normal_tissue_median_hu": round(float(np.median(medians)), 1) if medians else None,
            "normal_tissue_p90_hu": round(float(np.median(p90s)), 1) if p90s else None,
            "lesion_contrast_removed_median": round(float(np.median(removed)), 2) if removed else None,
            "lesions": len(removed)}


def evaluate_ct(model, case_sets: dict[str, Iterable[CtCase]], out_dir: str | Path, *,
                thresholding: Thresholding | None = None, parameters: dict[str, Any] | None = None,
                log=print) -> dict[str, Any]:
    """Evaluate a CT organ model on each named case set; writes :data:`CT_EVALUATION_FILES` (one FROC figure with
    a curve per set) into ``out_dir`` and returns the result."""
    out = Path(out_dir)
    sets, rows_of = {}, {}
    chain = (thresholding or Thresholding.for_method(model.card, method_name(model))).check()
    for name, cases in case_sets.items():
        rows, ceiling = [], []
        for case in cases:
            twin = healthy_twin(case)
            rows.append(evaluate_case(model, case, thresholding, parameters, twin=twin))
            r = rows[-1]
            log(f"{name} {r['source']} seed {r['seed']} ({r['phase']}): {r['tp']}/{r['lesions']} lesions found, "
                f"{r['fp']} false candidate(s), {r['seconds']:.0f} s")
            if "counterfactual_error" in r:
                e = r["counterfactual_error"]
                log(f"  counterfactual vs healthy twin: |difference| in normal organ tissue median "
                    f"{e['normal_tissue_median_hu']} HU, 90th percentile {e['normal_tissue_p90_hu']} HU; lesion "
                    f"contrast removed {e['lesion_contrast_removed']}")
            c = ceiling_case(model.card, case, chain, twin)
            if c is not None:
                ceiling.append(c)
                log(f"  {CEILING_METHOD}: {c['tp']}/{c['lesions']} lesions found, {c['fp']} false candidate(s)")
        rows_of[name] = rows
        sets[name] = summarise(rows, name)
        if ceiling and len(ceiling) == len(rows):  # a phantom set: the same cases, a perfect counterfactual
            ceiling_name = f"{name}, {CEILING_METHOD}"
            rows_of[ceiling_name] = ceiling
            sets[ceiling_name] = summarise(ceiling, ceiling_name)
    result = {"checkpoint": model.card["id"], "method": method_name(model),
              "parameters": next((r["parameters"] for rows in rows_of.values() for r in rows), {}),
              "iou": CT_DETECTION_IOU, "sets": sets,
              "note": "phantom and inserted-lesion results, not clinical data; see the README for why the real-anatomy "
                      "figures are not comparable with a clinical study."}
    write_json(result, out / "ct-metrics.json")
    with atomic_path(out / "ct-metrics.md") as tmp:
        tmp.write_text(ct_markdown(result), encoding="utf-8")
    _write_cases(out / "ct-cases.csv", rows_of)
    curves = []
    for n, (name, s) in enumerate(sets.items()):
        op = s["operating_point"]
        band = s["froc"]["read_at"]
        curves.append({"label": f"{name} ({s['cases']} scans, {s['lesions']} lesions)", "group": n, "excluded": True,
                       "fp": s["froc"]["false_positives_per_scan"], "sensitivity": s["froc"]["sensitivity"],
                       "operating_point": (op["false_positives_per_scan"], op["recall"]),
                       "ci": {"fp": band["fp_limits"], "low": band["low"], "high": band["high"]}})
    with atomic_path(out / "ct-froc.png", suffix=".png") as tmp:
        froc_png(tmp, curves, max_fp=CT_FP_LIMITS[-1],
                 title=f"CT organ lesions, FROC with bootstrap 95 % CI (IoU >= {CT_DETECTION_IOU:g}); "
                       f"{result['checkpoint']}, {result['method']}\nsynthetic phantoms and lesions inserted into "
                       "real anatomy, not clinical data")
    return result


_CASE_COLUMNS = ("set", "source", "seed", "phase", "lesions", "tp", "fp", "fn", "precision", "recall", "f1", "dice",
                 "threshold", "seconds")


def _write_cases(path: Path, rows_of: dict[str, list[dict[str, Any]]]) -> None:
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(_CASE_COLUMNS)
        for name, rows in rows_of.items():
            for r in rows:
                w.writerow([name if c == "set" else (f"{r[c]:.4g}" if isinstance(r[c], float) else r[c])
                            for c in _CASE_COLUMNS])


def _pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.2f}"


def _found(d: dict[str, Any]) -> str:
    return f"{d['found']}/{d['lesions']} ({_pct(d['recall'])})" if d["lesions"] else "none"


def ct_markdown(result: dict[str, Any]) -> str:
    """The CT result as Markdown tables: one row per case set, then recall by organ, kind, phase and size."""
    lines = [f"CT organ-lesion detection, {result['checkpoint']} ({result['method']}), IoU >= {result['iou']:g}; "
             f"{result['note']}", "",
             "| set | scans | lesions | recall | precision | F1 | false candidates / scan | kidney recall | "
             "pancreas recall | Dice (per case) | FROC sens. @1 / @2 FP (95 % CI) | s / scan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["sets"].values():
        op, band = s["operating_point"], s["froc"]["read_at"]
        reads = []
        for limit in (1.0, 2.0):
            i = list(CT_FP_LIMITS).index(limit)
            reads.append(f"{_pct(band['sensitivity'][i])} ({_pct(band['low'][i])}-{_pct(band['high'][i])})")
        organ = op["by_organ"]
        lines.append(f"| {s['set']} | {s['cases']} | {s['lesions']} | {_pct(op['recall'])} | {_pct(op['precision'])} | "
                     f"{_pct(op['f1'])} | {_pct(op['false_positives_per_scan'])} | "
                     f"{_found(organ['kidney']) if 'kidney' in organ else 'none'} | "
                     f"{_found(organ['pancreas']) if 'pancreas' in organ else 'none'} | "
                     f"{_pct(op['per_case_mean']['dice'])} | {' / '.join(reads)} | {s['seconds_per_case']:.0f} |")
    errors = [s for s in result["sets"].values() if "counterfactual_error" in s]
    if errors:
        lines += ["", "| set | counterfactual vs the phantom's healthy twin: \\|difference\\| in normal organ tissue, "
                      "median / 90th percentile (HU, median over scans) | "
                      "lesion contrast removed (median; 1 = healed) |",
                  "|---|---|---|"]
        for s in errors:
            e = s["counterfactual_error"]
            lines.append(f"| {s['set']} | {e['normal_tissue_median_hu']} / {e['normal_tissue_p90_hu']} | "
                         f"{_pct(e['lesion_contrast_removed_median'])} "
                         f"({e['lesions']} lesions) |")
    for title, key in (("kind", "by_kind"), ("phase", "by_phase")):
        lines += ["", f"| set | recall by lesion {title} |", "|---|---|"]
        for s in result["sets"].values():
            parts = ", ".join(f"{k}: {_found(v)}" for k, v in s["operating_point"][key].items())
            lines.append(f"| {s['set']} | {parts} |")
    lines += ["", "| set | " + " | ".join(metrics.diameter_strata_names()) + " |",
              "|---|" + "---|" * len(metrics.diameter_strata_names())]
    for s in result["sets"].values():
        strata = {b["bin"]: b for b in s["operating_point"]["by_size"]}
        cells = [f"{strata[n]['found']}/{strata[n]['lesions']}" if n in strata and strata[n]["lesions"] else "none"
                 for n in metrics.diameter_strata_names()]
        lines.append(f"| {s['set']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def phantom_cases(seeds: Sequence[int]) -> Iterable[CtCase]:
    """Held-out abdominal CT phantoms, made one at a time."""
    for seed in seeds:
        yield make_ct_phantom(int(seed))


__all__ = ["CEILING_METHOD", "CT_DETECTION_IOU", "CT_EVALUATION_FILES", "CT_FP_LIMITS", "ceiling_case",
           "counterfactual_error", "ct_markdown", "evaluate_case", "evaluate_ct", "healthy_twin", "phantom_cases",
           "summarise"]
