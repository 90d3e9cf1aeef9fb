"""Evaluation on held-out phantoms with the IgCONDA-PET metrics (METHODS.md, "Evaluation metrics").

Protocol (IgCONDA-PET section 3.4): per unhealthy axial slice of the model's slice space (the
paper evaluates on its 64 x 64 resampled slices too), the anomaly map is scaled to [0, 1];
DSC_opt is the best Dice over thresholds 0.1..0.9, HD95 (pixels) and lesion detection
(criterion 2) are taken at that slice's DSC-optimal threshold, AUPRC on the unthresholded map.
The 41 % SUVmax baseline thresholds each slice's SUV at 0.41 x its maximum; there is nothing to
optimise, so its DSC_opt is its Dice, and its AUPRC uses SUV / SUVmax as the score.
Ground truth in slice space: model pixels at least half covered by a lesion.
Seeds used for training or validation (recorded in the model card) are refused.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import metrics
from .card import SEED_RANGE_KEYS, Steps, whole_number
from .export import write_json
from .files import atomic_path, check_writable_dir
from .methods.base import check_evaluations
from .phantoms import make_phantom
from .pipeline import lesions_from_heat
from .postprocessing import Thresholding, suv_threshold_baseline
from .preprocessing import mask_to_model_space, to_model_space

METRIC_NAMES = ("dsc_opt", "hd95", "auprc", "sensitivity")


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


def check_held_out(card: dict[str, Any], seeds: list[int],
                   kinds: tuple[str, ...] = SEED_RANGE_KEYS) -> None:
    """Refuse seeds that overlap the card's training, validation or parameter-tuning seeds."""
    prov = card.get("provenance", {})
    for key in kinds:
        rng = prov.get(key)
        if rng and any(rng[0] <= s < rng[1] for s in seeds):
            raise ValueError(
                f"evaluation seeds {seeds[0]}..{seeds[-1]} overlap the model's {key.replace('_', ' ')} "
                f"{rng[0]}..{rng[1] - 1}; choose held-out seeds."
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


def evaluate(model, n_cases: int, seed: int, out_dir: str | Path, *, noise_level=None, guidance_scale=None,
             steps: Steps | None = None, phantom_kwargs: dict[str, Any] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``model`` and the 41 % SUVmax baseline on ``n_cases`` phantoms from ``seed``; write results.

    Every argument is checked (and the output folder made) before any phantom goes through the network.
    """
    seeds = phantom_seeds(n_cases, seed)
    check_held_out(model.card, seeds)
    model.resolve(noise_level, guidance_scale, steps)
    out = check_writable_dir(out_dir)
    prep = model.card["preprocessing"]
    raw_prep = {**prep, "intensity": {"scale": 1.0, "offset": 0.0, "clip": [None, None]}}
    name = model.card["method"]
    rows: dict[str, list[dict[str, Any]]] = {name: [], "suv41": []}
    seconds: dict[str, list[float]] = {name: [], "suv41": []}
    kwargs: dict[str, Any] = {"noise_level": noise_level, "guidance_scale": guidance_scale, "steps": steps}
    params, compute = None, {}
    thresholding = Thresholding.from_card(model.card)
    detection_rows: list[dict[str, Any]] = []
    for s in seeds:
        case = make_phantom(s, **(phantom_kwargs or {}))
        t0 = time.perf_counter()
        res = model.run(case.pet, **kwargs)
        seconds[name].append(time.perf_counter() - t0)
        params, compute = res.parameters, res.compute
        # what a user sees: 3D lesion candidates at the card's default threshold, on the whole volume
        labels, _ = lesions_from_heat(res.heatmap, case.pet, thresholding)
        found = metrics.match_lesions(labels > 0, case.lesion_labels.voxels, iou_threshold=0.2)
        detection_rows.append({"seed": s, "lesions": found["tp"] + found["fn"], "found": found["tp"],
                               "false_positives": found["fp"],
                               "dice": metrics.dice(labels > 0, case.lesion_mask)})
        truth = mask_to_model_space(case.lesion_labels, res.grid) >= 0.5
        t0 = time.perf_counter()
        suv, _ = to_model_space(case.pet, raw_prep, res.grid)
        baseline = suv_threshold_baseline(suv, 0.41, axis=0)
        seconds["suv41"].append(time.perf_counter() - t0)
        unhealthy = np.flatnonzero(truth.reshape(len(truth), -1).any(axis=1))
        for k in unhealthy:
            common = {"seed": s, "slice": int(k)}
            rows[name].append({**common, **_slice_metrics(res.model_heat[k], truth[k])})
            rows["suv41"].append({**common, **_slice_metrics(suv[k], truth[k], binary=baseline[k])})
        log(f"case {s}: {len(case.lesions)} lesion(s), {len(unhealthy)} unhealthy slices, "
            f"{seconds[name][-1]:.1f} s")
    result = {
        "protocol": "IgCONDA-PET section 3.4 on the model's slice space; synthetic phantoms (no real PET)",
        "checkpoint": model.card["id"],
        "seeds": [seeds[0], seeds[-1]],
        "parameters": params,
        "compute": compute,
        "methods": {m: _summarise(rows[m], seconds[m]) for m in rows},
        "per_slice": rows,
        "detection": _detection_summary(detection_rows, thresholding),
    }
    write_json(result, out / "metrics.json")
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(markdown_table(result), encoding="utf-8")
    return result


def _detection_summary(rows: list[dict[str, Any]], thresholding) -> dict[str, Any]:
    """Whole-volume lesion detection at the default threshold (not part of the paper's protocol)."""
    lesions = sum(r["lesions"] for r in rows)
    found = sum(r["found"] for r in rows)
    fps = sum(r["false_positives"] for r in rows)
    dices = [r["dice"] for r in rows if r["lesions"] > 0]
    return {
        "criterion": "3D connected components of the whole-volume segmentation at the model's default "
                     "threshold vs true lesions, matched at IoU >= 0.2",
        "threshold": thresholding.as_parameters(),
        "lesions": lesions, "found": found, "false_positives": fps,
        "lesion_sensitivity": found / lesions if lesions else float("nan"),
        "false_positives_per_volume": fps / len(rows) if rows else float("nan"),
        "mean_volume_dice": float(np.mean(dices)) if dices else float("nan"),
        "per_case": rows,
    }


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
                      f"{det['found']}/{det['lesions']} lesions found (IoU >= 0.2), "
                      f"{det['false_positives_per_volume']:.1f} false positives per volume, "
                      f"mean volume Dice {det['mean_volume_dice']:.3f} on cases with lesions"]
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
    check_held_out(model.card, seeds, kinds=("train_seeds", "val_seeds"))  # re-tuning on tuning seeds is fine
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
