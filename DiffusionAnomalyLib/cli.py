"""The ``diffusion-anomaly`` command: phantom, train, run, evaluate, sweep, demo, import-checkpoint, totalsegmentator.

Every refusal of every verb, argument errors included, ends the command with exit code 2 and one
``error:`` line (:func:`main`). The verbs that write a folder (phantom, run, evaluate, sweep, demo)
hold it for the whole run (:func:`.files.output_folder`): checked before any work, locked against
a second run, and left as it was found when the run fails.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from .method_catalog import BASELINES, METHODS, default_method, method_spec, parameter_words, served_method, unknown_owner
from .card import (NOT_FOR_CLINICAL_USE_SHORT, STEPS_HELP, card_items, check_margin_mm, check_threshold, classifier_card,
                   ct_card, default_card, fraction_from_text, organ_list,
                   number_from_text,
                   parse_steps, real_number, whole_number)
from .checkpoint import bundled_checkpoint, bundled_models, read_card
from .version import __version__
from .export import write_json, write_segmentation
from .errors import REFUSALS, refusal_sentence
from .figures import CT_WINDOW_HU
from .report import write_report
from .files import OutputError, check_writable_dir, output_folder, staged
from .pipeline import RESULT_FILES, CaseResult, analyse, method_name, write_outputs
from .measurements import DEFAULT_MTV_RULE, MTV_RULES, lesion_columns
from .postprocessing import THRESHOLD_RECORD_KEYS, THRESHOLD_RULE_WORDS, Thresholding
from .progress import Cancelled
from .roi import OrganLabels, OrganSelection, organ_names, read_organ_labels
from .totalsegmentator import DEVICES, ENV_VARIABLE, run_totalsegmentator, setup_environment
from .volume import canonical_modality, read_volume, write_volume

# torch, MONAI and the modules built on them (methods, networks, training, metrics, evaluation, the checkpoint
# importer) are imported inside the verbs that use them, so that rethreshold, models, card and --version start
# without them (seconds of start-up); the names tests replace (load_checkpoint, train, ...) stay on this module.


def load_checkpoint(*args, **kwargs):
    """:func:`.methods.load_checkpoint` (imported on first use: it brings torch)."""
    from .methods import load_checkpoint as load

    return load(*args, **kwargs)


def train(*args, **kwargs):
    """:func:`.training.train` (imported on first use: it brings torch)."""
    from .training import train as run

    return run(*args, **kwargs)


def train_classifier(*args, **kwargs):
    """:func:`.training.train_classifier` (imported on first use: it brings torch)."""
    from .training import train_classifier as run

    return run(*args, **kwargs)


#: what ``train --method`` builds
TRAIN_METHODS = ("igconda", "classifier")


#: the organ segmentation ``run --ct`` writes next to its results (TotalSegmentator's, on the CT's grid)
ORGANS_FILE = "organs.nii.gz"


def _cmd_phantom(args) -> int:
    from . import phantoms

    ext = ".nrrd" if args.format == "nrrd" else ".nii.gz"
    stems = [f"phantom_{args.seed + n:06d}" for n in range(args.count)]
    tails = (f"_pet{ext}", f"_lesions{ext}", f"_ct{ext}", f"_organs{ext}", ".json")
    names = [f"{stem}{tail}" for stem in stems for tail in tails]
    with output_folder(args.out, outputs=names) as out, staged(out) as stage:
        for n, stem in enumerate(stems):
            seed = args.seed + n
            case = phantoms.make_phantom(seed, n_lesions=args.lesions, ct=True)
            write_volume(case.pet, stage / f"{stem}_pet{ext}")
            write_volume(case.lesion_labels, stage / f"{stem}_lesions{ext}")
            write_volume(case.ct, stage / f"{stem}_ct{ext}")
            write_volume(case.ct_organs.volume, stage / f"{stem}_organs{ext}")  # on the CT's grid, as TotalSegmentator's
            write_json({"seed": seed, "lesions": case.lesions, **case.pet.meta,
                        "ct": f"{stem}_ct{ext}: the same anatomy on a CT grid of its own (synthetic HU)",
                        "organs": f"{stem}_organs{ext}: {case.ct_organs.source}"}, stage / f"{stem}.json")
            print(f"{stem}: {len(case.lesions)} lesion(s) -> {out}")
            if args.verbose:
                print(json.dumps(case.lesions, indent=1))
    return 0


def _train_config(args):
    """The :class:`.training.TrainConfig` ``train`` asks for, every number checked before any work (one sentence
    each)."""
    from .networks import pick_device
    from .training import TrainConfig

    steps = whole_number(args.steps, "--steps", 1)
    batch = whole_number(args.batch_size, "--batch-size", 2, why=" (half healthy, half unhealthy slices)")
    train_seed, val_seed = (whole_number(v, f"--{n}-seed", 0) for v, n in ((args.train_seed, "train"),
                                                                            (args.val_seed, "val")))
    train_cases = whole_number(args.train_cases, "--train-cases", 1)
    val_cases = whole_number(args.val_cases, "--val-cases", 1)
    if train_seed < val_seed + val_cases and val_seed < train_seed + train_cases:
        raise ValueError(f"the validation phantoms (seeds {val_seed}..{val_seed + val_cases - 1}) must not overlap "
                         f"the training phantoms (seeds {train_seed}..{train_seed + train_cases - 1}); "
                         "choose another --val-seed.")
    minutes = None if args.max_minutes is None else real_number(args.max_minutes, "--max-minutes", 0.0, lo_open=True)
    cfg = TrainConfig(
        out=Path(args.out), train_seeds=(train_seed, train_seed + train_cases),
        val_seeds=(val_seed, val_seed + val_cases), steps=steps, max_minutes=minutes, batch_size=batch,
        lr=real_number(args.lr, "--lr", 0.0, 1.0, lo_open=True), val_every=whole_number(args.val_every, "--val-every", 1),
        seed=whole_number(args.seed, "--seed", 0), device=args.device,
        workers=whole_number(args.workers, "--workers", 1), resume=not args.no_resume, healthy_only=args.healthy_only,
    )
    if cfg.healthy_only and args.method == "classifier":
        raise ValueError("--healthy-only trains the diffusion model on healthy slices; the classifier must see both "
                         "classes, so leave it out with --method classifier.")
    pick_device(cfg.device)
    check_writable_dir(cfg.out)
    return cfg


def _cmd_train(args) -> int:
    cfg = _train_config(args)
    log = lambda m: print(m, flush=True)  # noqa: E731
    diffusion = ct_card() if args.modality == "CT" else default_card()
    if args.method == "classifier":
        best = train_classifier(cfg, classifier_card(diffusion), log=log)
    else:
        best = train(cfg, diffusion, log=log)
    print(f"best checkpoint: {best}")
    return 0


def _load_model(args, method: str | None = None, modality: str | None = None):
    """The method object of ``--method`` (or ``method``; None: the checkpoint's default) on ``--checkpoint`` (default:
    the bundled model for ``modality``, the input's)."""
    path = args.checkpoint or bundled_checkpoint(modality=modality)
    return load_checkpoint(path, device=args.device, precision=args.precision,
                           method=method or getattr(args, "method", None), classifier=args.classifier)


def _progress_bar(desc: str):
    """A tqdm bar on a terminal; when the output is redirected (a log file, a pipe) one line per stage instead, so a
    log still shows what ran and for how long."""
    if not sys.stderr.isatty():
        lines = _progress_lines(desc)
        lines.close = lambda: None  # type: ignore[attr-defined]
        return lines
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", disable=None, mininterval=1.0, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * fraction))
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    update.close = bar.close  # type: ignore[attr-defined]
    return update


def _thresholding(args, model) -> Thresholding:
    return Thresholding.for_method(model.card, method_name(model), **_threshold_rule(args), min_size_ml=args.min_size_ml)


def _steps_argument(text: str):
    """argparse type of --steps: :func:`.card.parse_steps`, its sentence as the usage error."""
    try:
        return parse_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(field: str, minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum`` (:func:`.card.whole_number`'s sentence as the usage error)."""
    def parse(text: str) -> int:
        try:
            return whole_number(number_from_text(text), field, minimum)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).rstrip(".")) from None

    parse.__name__ = field
    return parse


def _print_table(result) -> None:
    """The lesion table on the console: the CSV's column keys, a line of units under them (the schema's, with the
    heat map's), then the rows; the columns' definitions are in the report and the README."""
    rows = result.table
    if not rows:
        print("no lesion candidates above the threshold")
        return
    columns = lesion_columns(result.volume.modality, result.volume.units, rows, heat_units=result.heat_units,
                             mtv_rule=result.mtv_rule)
    widths = [max(8, len(c.name), len(c.unit), *(len(str(r[c.name])) for r in rows if c.text)) for c in columns]
    print("  ".join(f"{c.name:>{w}}" for c, w in zip(columns, widths)))
    print("  ".join(f"{c.unit:>{w}}" for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(f"{r[c.name]:>{w}.2f}" if isinstance(r[c.name], float) else f"{r[c.name]:>{w}}"
                        for c, w in zip(columns, widths)))


_ROI_OPTIONS = ("roi_include", "roi_exclude", "roi_margin_mm")
_CT_OPTIONS = ("totalseg_fast", "totalseg_env")


def _check_organ_source(args) -> None:
    """Refuse an organ-ROI command line that cannot work, before anything is read or loaded."""
    if args.roi_seg is not None and args.ct is not None:
        raise ValueError("give either --roi-seg (an existing organ segmentation) or --ct (a CT to segment with "
                         "TotalSegmentator), not both.")
    if args.ct is None and _given(args, _CT_OPTIONS):
        raise ValueError(f"{', '.join(_given(args, _CT_OPTIONS))} only apply with --ct (the CT that TotalSegmentator "
                         "segments); add --ct, or leave them out.")
    if args.roi_seg is None and args.ct is None and _given(args, _ROI_OPTIONS):
        raise ValueError(f"{', '.join(_given(args, _ROI_OPTIONS))} need --roi-seg (a TotalSegmentator segmentation of "
                         "this patient: a multi-label NIfTI, a folder of <organ>.nii.gz files or a Slicer .seg.nrrd) "
                         "or --ct (the CT of the PET/CT, segmented with TotalSegmentator first).")


def _organ_selection(args, card) -> OrganSelection | None:
    """The organ choice of ``--roi-*`` with the card's default exclusion (None without a segmentation source).

    Names are checked against TotalSegmentator's class map here, before TotalSegmentator or the network runs.
    """
    if args.roi_seg is None and args.ct is None:
        return None
    selection = OrganSelection.from_card(card, args.roi_include, args.roi_exclude, args.roi_margin_mm)
    for names in (selection.include, selection.exclude):
        organ_names(names)  # an unknown name is refused here, with the closest valid ones
    if args.ct is not None and selection.is_whole_volume:
        raise ValueError("with --ct and no organ included or excluded (the model card has no default exclusion, or "
                         "--roi-exclude none) the organ ROI would be the whole volume; name organs with --roi-include "
                         "or --roi-exclude (e.g. physiological-uptake), or leave out --ct.")
    return selection


def _organ_labels(args, selection: OrganSelection, volume, stage: Path) -> OrganLabels:
    """The organ segmentation: ``--roi-seg`` read, or TotalSegmentator run on ``--ct`` into ``stage``.

    With ``--ct`` only the organs the selection names are segmented (``--roi_subset``); a CT that
    does not overlap the input is refused before TotalSegmentator starts.
    """
    if args.roi_seg is not None:
        return read_organ_labels(args.roi_seg)
    bar = _progress_bar("TotalSegmentator")
    try:
        path = run_totalsegmentator(args.ct, stage / ORGANS_FILE, organs=list(selection.include + selection.exclude),
                                    fast=args.totalseg_fast, device=args.device, progress=bar,
                                    environment=args.totalseg_env, overlapping=volume)
    finally:
        bar.close()
    return read_organ_labels(path)


def _cmd_run(args) -> int:
    # the folder is checked and locked before any computation, and held until the results are in place
    inputs = {"input": args.input, "checkpoint": args.checkpoint, "--classifier": args.classifier,
              "--roi-seg": args.roi_seg, "--ct": args.ct}
    _check_organ_source(args)
    with output_folder(args.out, outputs=(*RESULT_FILES, ORGANS_FILE), inputs=inputs) as out:
        volume = read_volume(args.input, modality=args.modality, units=args.units, suv_factor=args.suv_factor)
        model = _load_model(args, modality=canonical_modality(volume.modality))
        selection = _organ_selection(args, model.card)
        thresholding = _thresholding(args, model)
        parameters = _method_parameters(args, method_name(model))
        model.resolve(**parameters)  # refused before TotalSegmentator runs
        roi = region = labels = None
        _print_plan(model, parameters, thresholding, selection)
        extra: dict = {"input_path": str(Path(args.input).resolve()), "subject": args.subject,
                       "input_read_as": {"modality": args.modality, "units": args.units, "suv_factor": args.suv_factor}}
        with tempfile.TemporaryDirectory(prefix="diffusion-anomaly-organs-") as work:
            if selection is not None:
                labels = _organ_labels(args, selection, volume, Path(work))
                roi, region = selection.masks(labels, grid=volume)
                inside = int(np.count_nonzero(roi))
                extra["organ_roi"] = {
                    "segmentation": str(args.roi_seg) if args.roi_seg is not None else
                    f"TotalSegmentator on {args.ct} (written as {ORGANS_FILE})",
                    "organs_path": str(Path(args.roi_seg).resolve()) if args.roi_seg is not None else ORGANS_FILE,
                    **selection.as_parameters(), "voxels_inside": inside, "fraction_inside": inside / roi.size,
                    "heat_map": "shown inside the ROI only (0 outside)",
                    "computed": "the model slices the included organs need" if region is not None
                    else "the whole volume"}
            bar = _progress_bar("diffusion")
            try:
                result = analyse(model, volume, parameters=parameters, thresholding=thresholding, roi=roi,
                                 region=region, progress=bar, organs=labels, mtv_rule=args.mtv_rule or DEFAULT_MTV_RULE)
            finally:
                bar.close()
            files = {ORGANS_FILE: lambda path: write_volume(labels.volume, path)} if args.ct is not None else {}
            written = write_outputs(result, out, extra,
                                    extra_files={**files, **_report_files(result, args, extra.get("organ_roi"))},
                                    replaces=(ORGANS_FILE, *REPORT_FILES), command_line=args.command_line)
    _print_table(result)
    if selection is not None:
        done = result.method.model_slices
        print(f"organ ROI: {selection.words()}; {done['computed']} of {done['total']} model slices computed")
    _print_result(result, written, out)
    return 0


#: what ``rethreshold`` keeps of a result's summary.json besides what it recomputes (the run's own records)
_RUN_RECORDS = ("input_path", "input_read_as", "subject", "phantom_seed", "ground_truth_lesions")


def _result_record(folder: Path) -> dict:
    """The summary.json of a result folder, refused in one sentence when the folder is not one."""
    path = folder / "summary.json"
    if not folder.is_dir() or not path.is_file() or not (folder / "heatmap.nrrd").is_file():
        raise ValueError(f"--result {folder} is not a result folder of 'diffusion-anomaly run' or 'demo' (it lacks "
                         "summary.json or heatmap.nrrd); give the folder a run wrote.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["parameters"]["threshold_method"], record["model"]["id"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a summary this version can re-threshold (unreadable, or written before "
                         "re-thresholding existed); run the analysis again.") from None
    return record


def _recorded_file(folder: Path, path: str | None, what: str, option: str) -> Path:
    """A file a result refers to (relative paths: inside the result folder), refused when it is gone."""
    found = None if path is None else (folder / path if not Path(path).is_absolute() else Path(path))
    if found is None or not found.exists():
        raise ValueError(f"the {what} of this result ({path or 'not recorded'}) is not there; give it with {option}.")
    return found


def _cmd_rethreshold(args) -> int:
    """Threshold an existing heat map again: new lesion candidates, table, summary and report, no network."""
    clock = time.perf_counter()
    folder = Path(args.result)
    record = _result_record(folder)
    args.subject = args.subject or record.get("subject") or ""  # the run's pseudonym unless a new one is given
    with output_folder(folder, outputs=(*RESULT_FILES, *REPORT_FILES)) as out:
        read_as = record.get("input_read_as") or {}
        scan = args.input or _recorded_file(out, record.get("input_path"), "input", "--input")
        # both at once: ITK lets go of Python's lock while it reads and decodes (0.08 s instead of 0.11 s on the demo)
        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(read_volume, scan, modality=read_as.get("modality"), units=read_as.get("units"),
                                  suv_factor=read_as.get("suv_factor"))
            heat = read_volume(out / "heatmap.nrrd", validate=False)  # this program's own file, read as written
            volume = reading.result()
        if volume.voxels.shape != heat.voxels.shape or not volume.same_geometry(heat, atol=1e-4):
            raise ValueError("the input is not on the heat map's grid (another scan than the one analysed); give the "
                             "analysed scan with --input.")
        checkpoint = args.checkpoint or _recorded_file(out, (record.get("checkpoint") or {}).get("path"),
                                                       "model checkpoint", "--checkpoint")
        card = read_card(checkpoint)
        if card["id"] != record["model"]["id"]:
            raise ValueError(f"{checkpoint} holds model {card['id']}, but this result was made by "
                             f"{record['model']['id']}; give that model's checkpoint with --checkpoint.")
        params = record["parameters"]
        old = Thresholding.from_parameters(params)
        thresholding = Thresholding(**{**old.__dict__, **_threshold_rule(args),
                                       **({"min_size_ml": args.min_size_ml} if args.min_size_ml is not None else {})})
        thresholding.check()
        roi_record = record.get("organ_roi")
        organs = roi = None
        if roi_record is not None:
            organs = read_organ_labels(_recorded_file(out, roi_record.get("organs_path"), "organ segmentation",
                                                      "a new run (rethreshold keeps the run's organ map)"))
            # the run was accepted, so an included organ its scan lacks had been left out (skip_absent)
            before = OrganSelection(tuple(roi_record["roi_include"]), tuple(roi_record["roi_exclude"]),
                                    float(roi_record["roi_margin_mm"]), skip_absent=True)
            selection = OrganSelection(
                tuple(organ_list(args.roi_include, "--roi-include")) if args.roi_include is not None else before.include,
                tuple(organ_list(args.roi_exclude, "--roi-exclude")) if args.roi_exclude is not None else before.exclude,
                check_margin_mm(args.roi_margin_mm, "--roi-margin-mm") if args.roi_margin_mm is not None
                else before.margin_mm, skip_absent=args.roi_include is None)
            for names in (selection.include, selection.exclude):
                organ_names(names)
            roi = selection.mask(organs, grid=volume).voxels
            if selection != before and np.any(roi & ~before.mask(organs, grid=volume).voxels):
                raise ValueError(f"the ROI asked for ({selection.words()}) reaches beyond the run's ({before.words()}), "
                                 "where the heat map was not kept; narrow it, or run the analysis again with the "
                                 "wider ROI.")
            roi_record = {**roi_record, **selection.as_parameters(), "voxels_inside": int(np.count_nonzero(roi))}
        elif any(v is not None for v in (args.roi_include, args.roi_exclude, args.roi_margin_mm)):
            raise ValueError("this result was analysed without an organ segmentation, so it has no organ ROI to change; "
                             "run the analysis again with --roi-seg or --ct.")
        roi_changed = roi_record is not None and any(roi_record[k] != record["organ_roi"][k]
                                                     for k in selection.as_parameters())
        # the counterfactual is rewritten (so read) only with the heat map of a new ROI; else both stay as they are
        counterfactual = (read_volume(out / "counterfactual.nrrd", validate=False)
                          if roi_changed and (out / "counterfactual.nrrd").is_file() else None)
        method = {k: v for k, v in params.items() if k not in THRESHOLD_RECORD_KEYS and k != "mtv_rule"}
        result = CaseResult(volume=volume, heatmap=heat, counterfactual=counterfactual, card=card, parameters=method,
                            thresholding=thresholding, checkpoint=str(checkpoint), method_name=record["model"]["method"],
                            classifier=record.get("classifier"), organs=organs,
                            network_evaluations=int(record.get("network_evaluations", 0)),
                            mtv_rule=args.mtv_rule or params.get("mtv_rule") or DEFAULT_MTV_RULE).threshold(roi=roi)
        extra = {**{k: record[k] for k in _RUN_RECORDS if k in record}, "subject": args.subject,
                 **({"input_path": str(Path(args.input).resolve())} if args.input else {}),
                 **({"organ_roi": roi_record} if roi_record is not None else {}),
                 "rethresholded_from": {k: record.get(k) for k in ("created", "command_line", "threshold",
                                                                      "lesion_count", "network_evaluations")}}
        written = write_outputs(result, out, extra, extra_files=_report_files(result, args, roi_record),
                                replaces=REPORT_FILES,
                                command_line=args.command_line, write_maps=roi_changed)
    _print_table(result)
    _print_result(result, written, out)
    print(f"re-thresholded in {time.perf_counter() - clock:.2f} s (no network)")
    return 0


def _print_plan(model, parameters: dict, thresholding: Thresholding, selection: OrganSelection | None = None) -> None:
    """What is about to run, before any work: model, method, the parameters actually used (card defaults filled in),
    device and arithmetic, threshold rule, organ ROI."""
    name = method_name(model)
    print(f"model {model.card['id']} ({model.source}); method {name}: {METHODS[name].title}; "
          f"on {model.device} in {model.precision}", flush=True)
    print(f"parameters: {parameter_words(name, model.resolve(**parameters))}", flush=True)
    print(f"threshold: {thresholding.words()} (the cut-off in heat-map units is printed after the run)", flush=True)
    if selection is not None:
        print(f"organ ROI: {selection.words()}", flush=True)


def _print_result(result, written: dict, out: Path) -> None:
    """The closing lines of a run: candidates, the absolute cut-off applied with its units, the files."""
    print(f"threshold applied: {result.threshold_words()}")
    print(f"{result.lesion_count} lesion candidate(s); wrote {', '.join(sorted(written))} to {out}")


def _evaluation_methods(args, card: dict) -> tuple[list[str], list[str]]:
    """(methods, baselines) of ``evaluate --methods``: known names, each once; default the model's own and suv41."""
    if args.methods is None:
        return [served_method(card)], list(BASELINES)
    names = [n.strip() for n in str(args.methods).split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS and n not in BASELINES]
    if unknown or not names:
        raise ValueError(f"--methods must list methods and baselines out of {', '.join((*METHODS, *BASELINES))}, "
                         f"comma-separated; got {', '.join(map(repr, unknown)) or 'none'}.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--methods lists {', '.join(twice)} more than once; name each method once.")
    methods = [n for n in names if n in METHODS]
    if not methods:
        raise ValueError("--methods names no diffusion method; add at least one of " + ", ".join(METHODS) + ".")
    given = [n for n in PARAMETER_NAMES if getattr(args, _dest(n), None) is not None]
    if given and len(methods) > 1:
        raise ValueError(f"{', '.join(PARAMETER_OPTIONS[n].option for n in given)}: method parameters apply to one "
                         "method; with several --methods each runs at its own defaults (compare them at equal "
                         "footing), or evaluate one method at a time.")
    return methods, [n for n in names if n in BASELINES]


def _cmd_evaluate_ct(args, card: dict) -> int:
    """``evaluate`` of a CT organ model: METHODS.md section 4 detection on held-out CT phantoms and, with --real-ct,
    on lesions inserted into the real CTs (reported apart)."""
    from .ct_evaluation import CT_EVALUATION_FILES, ct_markdown, evaluate_ct, phantom_cases
    from .ct_lesions import REAL_CTS, real_anatomy_set
    from .evaluation import check_held_out, phantom_seeds

    if args.methods is not None:
        raise ValueError("--methods compares methods on PET phantoms; a CT organ model is evaluated one method at a "
                         "time: give it with --method.")
    seeds = phantom_seeds(args.phantoms, args.seed)
    check_held_out(card, seeds)
    real = None if args.real_ct is None else Path(args.real_ct)
    if real is not None and not all((real / ct).exists() and (real / labels).exists() for ct, labels in REAL_CTS):
        raise ValueError(f"--real-ct {real} does not hold the real CTs and their TotalSegmentator labels "
                         f"({', '.join(n for pair in REAL_CTS for n in pair)}); give the shared/data/real-ct folder.")
    real_seeds = phantom_seeds(args.real_cases, 0) if real is not None else []
    with output_folder(args.out, outputs=CT_EVALUATION_FILES, inputs={"checkpoint": args.checkpoint,
                                                                      "--classifier": args.classifier}) as out:
        model = _load_model(args, modality="CT")
        parameters = _method_parameters(args, method_name(model))
        model.resolve(**parameters)
        sets = {"held-out phantoms": phantom_cases(seeds)}
        if real is not None:
            sets["real anatomy"] = real_anatomy_set(real, real_seeds)
        with staged(out) as stage:
            result = evaluate_ct(model, sets, stage, parameters=parameters,
                                 log=lambda m: print(m, flush=True))
    print(ct_markdown(result))
    print(f"wrote {args.out}/{', '.join(CT_EVALUATION_FILES)}")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluation import EVALUATION_FILES, evaluate, markdown_table

    card = read_card(args.checkpoint or bundled_checkpoint())
    if card["modality"] == "CT":
        return _cmd_evaluate_ct(args, card)
    with output_folder(args.out, outputs=EVALUATION_FILES, inputs={"checkpoint": args.checkpoint,
                                                                   "--classifier": args.classifier}) as out:
        names, baselines = _evaluation_methods(args, card)
        # every method object before any phantom: a method the checkpoint cannot serve is refused first
        models = {name: _load_model(args, name) for name in names}
        parameters = {name: _method_parameters(args, name) for name in names}
        with staged(out) as stage:  # all files, or none; evaluate checks its arguments before any work
            result = evaluate(models, args.phantoms, args.seed, stage, parameters=parameters,
                              baselines=tuple(baselines))
    print(markdown_table(result))
    print(f"wrote {args.out}/{', '.join(EVALUATION_FILES)}")
    return 0


#: the options of ``sweep --whole-volume`` (the axes of :func:`.evaluation.whole_volume_grid`), and of the (D, w) sweep
_WHOLE_VOLUME_OPTIONS = ("threshold_methods", "fractions", "absolute_values", "min_sizes_ml", "organ_excludes",
                         "margins_mm")
_DW_OPTIONS = ("noise_levels", "guidance_values")


def _given(args, names) -> list[str]:
    """The options of ``names`` given on the command line ("--roi-include", ...)."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, False)]


def _options(args, names) -> str:
    """The options of ``names`` given on the command line, with their verb: "--a, --b belong" / "--a belongs"."""
    given = _given(args, names)
    return f"{', '.join(given)} {'belong' if len(given) > 1 else 'belongs'}" if given else ""


def _sweep_grid(args, model):
    """The checked whole-volume grid of ``sweep --whole-volume`` (None for the (D, w) sweep); refusals before any work."""
    from .evaluation import whole_volume_grid

    if not args.whole_volume:
        if _options(args, _WHOLE_VOLUME_OPTIONS):
            raise ValueError(f"{_options(args, _WHOLE_VOLUME_OPTIONS)} to a whole-volume sweep; add --whole-volume.")
        return None
    if _options(args, _DW_OPTIONS):
        raise ValueError(f"{_options(args, _DW_OPTIONS)} to the noise level / guidance sweep; a whole-volume "
                         "sweep (--whole-volume) runs the model at the card's defaults.")
    if args.write_defaults is not None and method_name(model) != default_method(model.card):
        raise ValueError(f"--write-defaults with --whole-volume tunes the model card's thresholds, which belong to its "
                         f"default method {default_method(model.card)}; method {method_name(model)} uses its paper's "
                         "threshold rule. Leave out --write-defaults (sweep.json still reports every setting).")
    if args.write_defaults is not None and args.method_steps is not None:
        card_steps, given = model.resolve()["steps"], model.resolve(steps=args.method_steps)["steps"]
        if given != card_steps:
            raise ValueError(f"--write-defaults keeps the model card's {card_steps} steps, so the thresholds must be "
                             f"tuned at them; leave out --steps (given {given}).")
    given = {n: getattr(args, n) for n in _WHOLE_VOLUME_OPTIONS if getattr(args, n) is not None}
    return whole_volume_grid(**{("methods" if n == "threshold_methods" else n): v for n, v in given.items()})


def _cmd_sweep(args) -> int:
    from .evaluation import SWEEP_FILES, card_with_best_defaults, card_with_threshold_defaults, sweep, whole_volume_sweep
    from .networks import save_checkpoint

    inputs = {"checkpoint": args.checkpoint, "--classifier": args.classifier,
              "--write-defaults file": args.write_defaults}
    with output_folder(args.out, outputs=SWEEP_FILES, inputs=inputs) as out:
        model = _load_model(args)
        grid = _sweep_grid(args, model)
        if args.write_defaults is not None:
            _check_new_checkpoint_path(args.write_defaults, model.source)
        with staged(out) as stage:  # sweep checks every grid point before any work
            if grid is None:
                result = sweep(model, args.phantoms, args.seed, stage, args.noise_levels, args.guidance_values,
                               steps=args.method_steps)
                with_defaults = card_with_best_defaults
            else:
                result = whole_volume_sweep(model, args.phantoms, args.seed, stage, steps=args.method_steps, grid=grid)
                with_defaults = card_with_threshold_defaults
            if args.write_defaults is not None:  # before sweep.json is in place: both, or neither
                card = with_defaults(model.card, result, args.command_line)
                save_checkpoint(model.model, card, args.write_defaults)
    print(f"wrote {', '.join(f'{args.out}/{name}' for name in SWEEP_FILES if (Path(args.out) / name).exists())}")
    if args.write_defaults is not None:
        d = card["inference_defaults"]
        if grid is None:
            spec = method_spec(method_name(model))
            chosen = d if not spec.card_defaults else d[spec.card_defaults]
            print(f"wrote {args.write_defaults}: {spec.name} defaults {parameter_words(spec.name, chosen)}")
        else:
            print(f"wrote {args.write_defaults}: defaults threshold {d['threshold']['method']} "
                  f"{d['threshold']['value']:g}, minimum size {d['min_size_ml']:g} ml, organs excluded "
                  f"{', '.join(d['organ_exclude']) or 'none'}, margin {d['organ_margin_mm']:g} mm")
    return 0


def _progress_lines(desc: str = ""):
    """A progress callback printing one line per new message, with the seconds since it started (no bar to redraw:
    long child programs, redirected output)."""
    last = [None]
    clock = time.perf_counter()
    prefix = f"{desc}: " if desc else ""

    def update(fraction: float, message: str) -> None:
        if message != last[0]:
            last[0] = message
            print(f"{prefix}{100 * fraction:3.0f}% {message} ({time.perf_counter() - clock:.0f} s)", flush=True)

    return update


def _cmd_totalsegmentator(args) -> int:
    out = run_totalsegmentator(args.ct, args.out, organs=args.organs, fast=args.fast, device=args.device,
                               progress=_progress_lines(), environment=args.env)
    print(f"wrote {out}")
    return 0


def _cmd_totalsegmentator_setup(args) -> int:
    env = setup_environment(args.env, progress=_progress_lines())
    print(f"TotalSegmentator environment: {env}")
    return 0


def _check_new_checkpoint_path(path: str, source: str | None) -> None:
    target = Path(path)
    check_writable_dir(target.parent, create=False)  # before the sweep's minutes of work
    if source is not None and target.exists() and target.resolve() == Path(source).resolve():
        raise OutputError(f"--write-defaults must name a new file, not the checkpoint being swept ({target}).")


#: what run, demo and rethreshold write besides :data:`.pipeline.RESULT_FILES`: the report (its PDF when a renderer
#: is found) and, for a DICOM input with lesion candidates, a DICOM Segmentation referencing the input series
REPORT_FILES = ("report.html", "report.pdf", "lesions.seg.dcm")


def _report_files(result, args, organ_roi: dict | None = None) -> dict:
    """The writers of :data:`REPORT_FILES` for :func:`.pipeline.write_outputs` (the PDF is rendered from the HTML
    written just before it); ``organ_roi``: the run's organ ROI record, shown with the parameters."""
    pdf = getattr(args, "pdf", True)  # rethreshold renders the PDF only when asked (it takes longer than the rest)
    shown = {k: v for k, v in (organ_roi or {}).items() if k in ("segmentation", *OrganSelection().as_parameters())}
    files = {REPORT_FILES[0]: lambda path: write_report(path, result, subject=args.subject, pdf=pdf, say=print,
                                                        parameters=shown)}
    if result.volume.meta.get("format") == "dicom" and result.lesion_count:
        from .dicom_seg import write_dicom_seg

        files[REPORT_FILES[2]] = lambda path: write_dicom_seg(result.labels, result.volume, path)
    return files


DEMO_FILES = ("input_pet.nrrd", "ground_truth.seg.nrrd", "overview.png", "input_organs.nrrd")
#: the CT demo's files: the same, with the input named for its modality
CT_DEMO_FILES = ("input_ct.nrrd",) + DEMO_FILES[1:]
#: how the demo shows its input: PET in SUV from 0 (inverted grey), CT in the abdominal window of the CT model's card
DEMO_DISPLAY = {"PT": {"vmin": 0.0, "vmax": 8.0, "image_cmap": "gray_r"},
                "CT": {"vmin": CT_WINDOW_HU[0], "vmax": CT_WINDOW_HU[1], "image_cmap": "gray"}}


def _cmd_demo(args) -> int:
    names = CT_DEMO_FILES if args.modality == "CT" else DEMO_FILES
    with output_folder(args.out, outputs=RESULT_FILES + names,
                       inputs={"checkpoint": args.checkpoint, "--classifier": args.classifier}) as out:
        return _demo(args, out, names)


def _demo_case(args):
    """(image, organs, lesion labels, lesion records, lesion names, words) of the demo's phantom."""
    from . import phantoms
    from .ct_phantoms import make_ct_phantom

    if args.modality == "CT":
        case = make_ct_phantom(args.seed, n_lesions=args.lesions)
        words = ", ".join(f"{les['kind']} {les['diameter_mm']:.0f} mm in {les['organ']}" for les in case.lesions)
        names = [f"True lesion {les['id']} ({les['kind']}, {les['organ']})" for les in case.lesions]
        return case.ct, case.organs, case.lesion_labels, case.lesions, names, f"{case.phase} CT; {words or 'healthy'}"
    case = phantoms.make_phantom(args.seed, n_lesions=args.lesions)
    words = ", ".join("%s r=%.0f mm" % (les["site"], les["radius_mm"]) for les in case.lesions)
    names = [f"True lesion {les['id']} ({les['site']})" for les in case.lesions]
    return case.pet, case.organs, case.lesion_labels, case.lesions, names, words


def _demo(args, out: Path, names: tuple[str, ...] = DEMO_FILES) -> int:
    from . import metrics
    from .figures import overview_png
    from .preprocessing import mask_to_model_space

    t0 = time.perf_counter()
    model = _load_model(args, modality=args.modality)
    image, organs, lesion_labels, lesions, lesion_names, words = _demo_case(args)
    print(f"phantom seed {args.seed}: {len(lesions)} lesion(s) ({words}); "
          f"model {model.card['id']}, method {method_name(model)}, on {model.device}")
    # the phantom's organ map stands in for TotalSegmentator's: the model card's default organs and exclusion apply
    selection = OrganSelection.from_card(model.card)
    roi, region = (None, None) if selection.is_whole_volume else selection.masks(organs, grid=image)
    parameters, thresholding = _method_parameters(args, method_name(model)), _thresholding(args, model)
    _print_plan(model, parameters, thresholding)
    if roi is not None:
        print(f"organ ROI: {selection.words()} (the phantom's organ map, standing in for TotalSegmentator)")
    bar = _progress_bar("diffusion")
    try:
        result = analyse(model, image, parameters=parameters, thresholding=thresholding, roi=roi, region=region,
                         progress=bar, organs=organs, mtv_rule=args.mtv_rule or DEFAULT_MTV_RULE)
    finally:
        bar.close()
    truth = lesion_labels.voxels > 0
    pred = result.labels > 0
    dsc = metrics.dice(pred, truth)
    found = metrics.match_labels(result.labels, lesion_labels.voxels, DEMO_IOU, n_truth=len(lesions))
    matches = metrics.lesion_matches(result.labels, lesion_labels.voxels, DEMO_IOU, n_truth=len(lesions))
    heat_dsc, _ = metrics.optimal_dice(result.shown_heatmap.voxels, truth)
    extra = {"phantom_seed": args.seed, "input_path": names[0], "subject": args.subject, "ground_truth_lesions": lesions,
             "organ_roi": {"segmentation": f"{names[3]}: {organs.source}", "organs_path": names[3],
                           **selection.as_parameters()},
             "dice_vs_ground_truth": dsc, "optimal_dice_of_heatmap": heat_dsc,
             "lesion_detection": {"rule": metrics.match_rule_words(DEMO_IOU),
                                  **{k: found[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1")},
                                  "lesions": matches}}
    cf = result.counterfactual.voxels if result.counterfactual is not None else None
    unhealthy = None  # the model slices the ground truth calls unhealthy, marked on the classifier's curve
    if result.method.classifier_confidence is not None:
        lesion = mask_to_model_space(lesion_labels, result.method.grid) >= 0.5
        unhealthy = lesion.reshape(len(lesion), -1).any(axis=1)
    files = {
        names[0]: lambda p: write_volume(image, p),
        names[1]: lambda p: write_segmentation(lesion_labels.voxels, image, p, names=lesion_names),
        names[2]: lambda p: overview_png(
            p, image.voxels, cf, result.shown_heatmap.voxels, result.labels, lesion_labels.voxels,
            title=f"{model.card['id']} ({method_name(model)}) | phantom seed {args.seed} | found {found['tp']}/"
                  f"{len(lesions)} (IoU >= {DEMO_IOU:g}), {found['fp']} false | cut-off {result.applied_threshold:.3g} "
                  f"{result.heat_units} | Dice {dsc:.2f} | "
                  f"{NOT_FOR_CLINICAL_USE_SHORT}",
            aspect=float(image.spacing[1] / image.spacing[0]),
            confidence=result.method.classifier_confidence, confidence_unhealthy=unhealthy,
            ijk_to_ras=image.ijk_to_ras, image_units=image.units or "", heat_units=result.heat_units,
            **DEMO_DISPLAY[model.card["modality"]]),
        names[3]: lambda p: write_volume(organs.volume, p),
    }
    written = write_outputs(result, out, extra, extra_files={**files, **_report_files(result, args, extra["organ_roi"])},
                            replaces=REPORT_FILES, command_line=args.command_line)
    _print_table(result)
    for match, name in zip(matches, lesion_names):
        print(f"{name}: {_match_words(match)}")
    print(f"lesions found {found['tp']}/{len(lesions)}, false candidates {found['fp']}; rule: "
          f"{metrics.match_rule_words(DEMO_IOU)}")
    print(f"Dice vs ground truth: {dsc:.3f} (heat map DSC_opt {heat_dsc:.3f})")
    print(f"threshold applied: {result.threshold_words()}")
    print(f"wrote {len(written)} files to {out} in {time.perf_counter() - t0:.0f} s "
          f"(synthetic phantom, demo model: not for clinical use)")
    return 0


#: the demo's detection rule: METHODS.md section 4's IoU, as the CT evaluation uses it
DEMO_IOU = 0.2


def _match_words(match: dict) -> str:
    """How one true lesion fared under the demo's rule (:func:`.metrics.lesion_matches`), in words."""
    if match["candidate"] is None:
        return "missed: no candidate overlaps it"
    covered = f"{100 * match['covered']:.0f} %" if match["covered"] >= 0.01 else "under 1 %"
    overlap = (f"candidate {match['candidate']} (IoU {match['iou']:.2f}, covers {covered} of the lesion, "
               f"{match['size_ratio']:.1f}x its volume)")
    if match["found"]:
        return f"found by {overlap}"
    return f"not counted as found: best overlap {overlap}, IoU below {DEMO_IOU:g}"


def _first_records() -> dict:
    records: dict = {}
    for spec in METHODS.values():
        for param in spec.parameters:
            records.setdefault(param.name, param)
    return records


#: every method parameter's name -> its first record (one command-line option each: Parameter.option)
PARAMETER_OPTIONS = _first_records()
PARAMETER_NAMES = tuple(PARAMETER_OPTIONS)


def _dest(name: str) -> str:
    """Where argparse keeps a method parameter (apart from the verbs' own options: ``--seed`` is a phantom seed)."""
    return f"method_{name}"


def _parameter_help(name: str) -> str:
    """--help of a method parameter: which methods take it, under which label, and its range."""
    uses = [(m, spec.parameter(name)) for m, spec in METHODS.items() if name in spec.parameter_names]
    first = uses[0][1]
    labels = "; ".join(f"{p.label} for {m}" for m, p in uses)
    return f"{first.help} ({labels}; default: the method's, see the model card)"


def _add_inference_args(p, with_threshold: bool = True, parameters: tuple[str, ...] | None = None,
                        several: bool = False) -> None:
    """The options every verb that runs a model shares: checkpoint, method(s), classifier, the method
    parameters (``parameters``: their names; None: every one of :data:`.method_catalog.METHODS`), device,
    precision and, ``with_threshold``, the thresholding."""
    p.add_argument("--checkpoint", default=None, help="model file (.safetensors, or an IgCONDA-PET .pth); default: bundled demo model")
    if several:
        p.add_argument("--methods", default=None, metavar="LIST",
                       help=f"comma-separated methods and baselines to compare ({', '.join((*METHODS, *BASELINES))}); "
                            "default: the model's own method and suv41")
    else:
        p.add_argument("--method", choices=tuple(METHODS), default=None,
                       help="the analysis method (default: the one the model was trained for); "
                            + "; ".join(f"{m}: {spec.title}" for m, spec in METHODS.items()))
    p.add_argument("--classifier", default=None, metavar="CLASSIFIER.safetensors",
                   help="noise-conditioned classifier for the classifier-guided methods (default: the bundled one "
                        "that fits the model)")
    for name in PARAMETER_NAMES if parameters is None else parameters:
        param = PARAMETER_OPTIONS[name]
        steps = param.kind == "steps"
        p.add_argument(param.option, dest=_dest(name), type=_steps_argument if steps else number_from_text,
                       default=None, help=_parameter_help(name) + (f"; {STEPS_HELP}" if steps else ""))
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="network arithmetic: auto = bf16 on CPUs with native bf16 (1.5-2x faster), else fp32")
    if with_threshold:
        _add_threshold_args(p)


def _add_threshold_args(p) -> None:
    """The threshold rules, one option each with its unit (at most one), and the minimum candidate size."""
    rule = p.add_argument_group("lesion threshold (one rule at most; default: the model card's)")
    one = rule.add_mutually_exclusive_group()
    one.add_argument("--threshold-fraction", type=_rule_value("fraction"), default=None, metavar="F",
                     help=THRESHOLD_RULE_WORDS["fraction"].replace("%", "%%") + "; '35%%' is read as 0.35")
    one.add_argument("--threshold-absolute", type=_rule_value("absolute"), default=None, metavar="V",
                     help=THRESHOLD_RULE_WORDS["absolute"])
    one.add_argument("--threshold-otsu", action="store_true", help=THRESHOLD_RULE_WORDS["otsu"])
    rule.add_argument("--min-size-ml", type=number_from_text, default=None, metavar="ML",
                      help="drop lesion candidates smaller than this volume in ml (>= 0; default: the model card's)")


def _add_report_args(p) -> None:
    """How the lesion table measures a PET candidate's metabolic volume, and the report's subject field."""
    p.add_argument("--mtv-rule", choices=tuple(MTV_RULES), default=None,
                   help="PET metabolic tumour volume (MTV, TLG) of each candidate: "
                        + "; ".join(f"{k}: {v.rstrip('.')}" for k, v in MTV_RULES.items()).replace("%", "%%")
                        + f" (default: {DEFAULT_MTV_RULE})")
    p.add_argument("--subject", default="", metavar="CODE",
                   help="a pseudonymised subject or study code for the report's case identity (nothing identifying "
                        "is read from the input; default: a blank line to fill in)")


def _rule_value(method: str) -> Callable[[str], float]:
    """argparse type of a threshold rule's value: :func:`.card.check_threshold`'s range, refused while parsing (before
    anything is read or loaded)."""
    def parse(text: str) -> float:
        try:
            return check_threshold(method, fraction_from_text(text) if method == "fraction" else number_from_text(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).rstrip(".")) from None

    parse.__name__ = f"{method} threshold"
    return parse


def _threshold_rule(args) -> dict:
    """``method`` and ``value`` of the threshold option given (none: {}, the card's rule)."""
    if args.threshold_otsu:
        return {"method": "otsu", "value": None}  # Otsu has no value: none carried over from an earlier rule
    for method in ("fraction", "absolute"):
        if getattr(args, f"threshold_{method}") is not None:
            return {"method": method, "value": getattr(args, f"threshold_{method}")}
    return {}




def _method_parameters(args, method: str) -> dict:
    """The method parameters given on the command line, refusing one that ``method`` does not take."""
    given = {n: getattr(args, _dest(n)) for n in PARAMETER_NAMES if getattr(args, _dest(n), None) is not None}
    spec = method_spec(method)
    foreign = [n for n in given if n not in spec.parameter_names]
    if foreign:
        options = ", ".join(PARAMETER_OPTIONS[n].option for n in foreign)
        takes = ", ".join(p.option for p in spec.parameters)
        raise ValueError(f"{options} {'do' if len(foreign) > 1 else 'does'} not apply to method {method} (it takes "
                         f"{takes}; {unknown_owner(foreign)}).")
    return given


class _Help(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default appended when it has one and its text does not already say it, and the
    verb's examples (its epilog) kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, "", argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with the refusal format of every other error: the usage, then one ``error:`` line, exit 2.

    ``arguments`` (a function of the parser) adds a verb's options when the verb is parsed or its help shown: the
    option texts of evaluate, sweep and import-checkpoint come from modules that bring torch, which the other verbs
    then never import.
    """

    def __init__(self, *args, arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._arguments = arguments

    def _complete(self) -> None:
        if self._arguments is not None:
            arguments, self._arguments = self._arguments, None
            arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {self.prog}: {_one_line(message)}\n")


def _listed(values) -> str:
    """A default axis as the command line takes it: "0,0.1,0.25" (no trailing .0)."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _cmd_models(args) -> int:
    """List the bundled models (and the checkpoints of ``--dir``) with a line of their card each."""
    rows = [(e["id"], Path(e["path"])) for e in bundled_models()]
    if args.dir is not None:
        folder = Path(args.dir)
        if not folder.is_dir():
            raise ValueError(f"--dir {folder} is not a folder; give the folder that holds your .safetensors checkpoints.")
        rows += [(path.stem, path) for path in sorted(folder.glob("*.safetensors"))]
    for name, path in rows:
        try:
            card = read_card(path)
            words = (f"{card.get('modality', '?')}, {default_method(card) if card['method'] != 'classifier' else 'classifier'}"
                     f": {card.get('name', '')}")
        except ValueError as exc:  # a user's file that is not a checkpoint: listed with the reason
            words = f"not usable: {_one_line(str(exc))}"
        print(f"{name}  ({path})\n    {words}")
    return 0


def _cmd_card(args) -> int:
    """Show one model's card (a bundled id or a checkpoint file) as a reader sees it."""
    path = Path(args.model) if Path(args.model).suffix == ".safetensors" else bundled_checkpoint(args.model)
    for label, text in card_items(read_card(path)):
        print(f"{label}: {text}")
    return 0


def _evaluate_arguments(ev) -> None:
    """The options of ``evaluate`` (their defaults come from :mod:`.evaluation`, which brings torch)."""
    from .evaluation import EVALUATION_SEEDS

    ev.add_argument("--phantoms", type=number_from_text, default=10, help="held-out phantoms to evaluate on")
    ev.add_argument("--seed", type=number_from_text, default=EVALUATION_SEEDS[0], help="first held-out phantom seed (refused if the model was trained or tuned on it)")
    ev.add_argument("--out", required=True, help="folder for metrics.json/.md, figures and tables")
    ev.add_argument("--real-ct", default=None, metavar="DIR",
                    help="a CT organ model: also evaluate on lesions inserted into the real CTs of this folder "
                         "(shared/data/real-ct), reported apart from the phantoms")
    ev.add_argument("--real-cases", type=number_from_text, default=10,
                    help="--real-ct: insertion seeds 0..N-1 (each gives one case per real CT)")
    _add_inference_args(ev, with_threshold=False, several=True)


def _sweep_arguments(sw) -> None:
    """The options of ``sweep`` (their defaults come from :mod:`.evaluation`, which brings torch)."""
    from . import evaluation

    sw.add_argument("--phantoms", type=number_from_text, default=3, help="tuning phantoms")
    sw.add_argument("--seed", type=number_from_text, default=800_000,
                    help="first tuning phantom seed (never a training, validation or evaluation seed)")
    sw.add_argument("--noise-levels", default=None, help="comma-separated noise levels (default: "
                    + "; ".join(f"{m} {_listed(evaluation.sweep_axes(m)[0])}" for m in METHODS) + ")")
    sw.add_argument("--guidance-values", default=None, metavar="LIST",
                    help="comma-separated values of the method's guidance parameter: "
                         + "; ".join(f"{m}: {METHODS[m].parameter(METHODS[m].guidance).label} "
                                     f"(default {_listed(evaluation.sweep_axes(m)[1])})" for m in METHODS))
    sw.add_argument("--whole-volume", action="store_true",
                    help="run the model once per phantom at the card's defaults and grid the thresholding and organ "
                         "exclusion; best = highest lesion sensitivity with at most "
                         f"{evaluation.MAX_FALSE_PER_VOLUME:g} false candidate per volume")
    sw.add_argument("--threshold-methods", default=None, metavar="LIST",
                    help=f"--whole-volume: threshold rules, comma-separated (default {_listed(evaluation.SWEEP_THRESHOLD_METHODS)})")
    sw.add_argument("--fractions", default=None, metavar="LIST",
                    help=f"--whole-volume: fractions of the heat map's maximum (default {_listed(evaluation.FROC_FRACTIONS)})")
    sw.add_argument("--absolute-values", default=None, metavar="LIST",
                    help=f"--whole-volume: absolute thresholds in heat-map units (default {_listed(evaluation.FROC_ABSOLUTE)})")
    sw.add_argument("--min-sizes-ml", default=None, metavar="LIST",
                    help=f"--whole-volume: minimum lesion sizes in ml (default {_listed(evaluation.SWEEP_MIN_SIZES_ML)})")
    sw.add_argument("--organ-excludes", default=None, metavar="SETS",
                    help="--whole-volume: organ exclusion sets separated by ';', each comma-separated names or groups, "
                         f"'none' for no exclusion (default: {';'.join(evaluation.SWEEP_ORGAN_EXCLUDES)})")
    sw.add_argument("--margins-mm", default=None, metavar="LIST",
                    help=f"--whole-volume: margins (mm) around the excluded organs (default {_listed(evaluation.SWEEP_MARGINS_MM)})")
    sw.add_argument("--out", required=True, help="folder for sweep.json and sweep.png")
    sw.add_argument("--write-defaults", default=None, metavar="NEW.safetensors",
                    help="also write a copy of the checkpoint with the sweep's best defaults (noise level, guidance "
                         "scale and steps by mean DSC_opt; with --whole-volume threshold rule and value, minimum size, "
                         "organ exclusion and margin), the sweep recorded in its provenance")
    _add_inference_args(sw, with_threshold=False, parameters=("steps",))


def _import_arguments(p) -> None:
    """The options of ``import-checkpoint`` (:mod:`.reference_import`, which brings torch)."""
    from .reference_import import add_import_arguments

    add_import_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffusion-anomaly", description=__doc__.split("\n\n")[0],
                formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"diffusion-anomaly {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    mo = sub.add_parser("models", help="list the bundled models (and the checkpoints in --dir) with their modality, "
                                       "default method and name")
    mo.add_argument("--dir", default=None, help="also list the .safetensors checkpoints in this folder")
    mo.set_defaults(func=_cmd_models)
    cd = sub.add_parser("card", help="show a model's card: what it was trained on, its validation figures and notes")
    cd.add_argument("model", help="a bundled model id (see 'models') or a .safetensors checkpoint file")
    cd.set_defaults(func=_cmd_card)

    ph = sub.add_parser("phantom", help="write seeded synthetic PET phantoms with lesion masks")
    ph.add_argument("--out", required=True, help="folder to write the phantoms into")
    ph.add_argument("--seed", type=int, default=0, help="first phantom seed (each seed gives one reproducible phantom)")
    ph.add_argument("--count", type=_count("the number of phantoms", 1), default=1, help="phantoms to write (seeds SEED, SEED+1, ...)")
    ph.add_argument("--lesions", type=_count("the number of lesions", 0), default=None,
                    help="number of lesions (default: random 0..4)")
    ph.add_argument("--format", choices=("nrrd", "nifti"), default="nrrd", help="file format")
    ph.add_argument("--verbose", action="store_true", help="print each phantom's lesions")
    ph.set_defaults(func=_cmd_phantom)

    tr = sub.add_parser("train", help="train (or resume) an IgCONDA-PET model or a noise-conditioned classifier "
                                      "on phantoms")
    tr.add_argument("--method", choices=TRAIN_METHODS, default="igconda",
                    help="igconda: the conditional diffusion model; classifier: healthy vs unhealthy on x_t at a "
                         "random t of the same noise schedule (for classifier guidance)")
    tr.add_argument("--modality", choices=("PT", "CT"), default="PT",
                    help="PT: whole-body PET phantoms (SUV); CT: crops around the kidneys and pancreas of abdominal "
                         "CT phantoms (HU), the CT organ model's card")
    tr.add_argument("--out", required=True, help="work folder: best.safetensors, state.safetensors, cache/")
    tr.add_argument("--steps", type=number_from_text, default=2000, help="optimiser steps in total (a resumed run continues to it)")
    tr.add_argument("--max-minutes", type=number_from_text, default=None, help="stop after this many minutes (state saved; run again to resume)")
    tr.add_argument("--batch-size", type=number_from_text, default=32, help="slices per step, half healthy and half unhealthy")
    tr.add_argument("--lr", type=number_from_text, default=3e-4, help="Adam learning rate")
    tr.add_argument("--train-seed", type=number_from_text, default=1000, help="first training phantom seed")
    tr.add_argument("--train-cases", type=number_from_text, default=160, help="training phantoms")
    tr.add_argument("--val-seed", type=number_from_text, default=900000, help="first validation phantom seed (must not overlap the training seeds)")
    tr.add_argument("--val-cases", type=number_from_text, default=12, help="validation phantoms")
    tr.add_argument("--val-every", type=number_from_text, default=100, help="validate (and save the state) every this many steps")
    tr.add_argument("--seed", type=number_from_text, default=0, help="random seed of initialisation, batches and noise")
    tr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    tr.add_argument("--workers", type=number_from_text, default=2, help="processes making phantoms (once; they are cached)")
    tr.add_argument("--no-resume", action="store_true", help="start afresh even if the folder holds a saved state")
    tr.add_argument("--healthy-only", action="store_true",
                    help="the diffusion model learns healthy slices only (METHODS.md section 2 allows this or all "
                         "slices); not with --method classifier, which needs both")
    tr.set_defaults(func=_cmd_train)

    rn = sub.add_parser("run", help="analyse a PET volume (file or DICOM folder) and write the results")
    rn.add_argument("--input", required=True, help="NRRD, NIfTI, a DICOM file or a DICOM series folder")
    rn.add_argument("--out", required=True, help="folder for the results (created; a previous result there is replaced)")
    rn.add_argument("--modality", choices=("PT", "CT"), default=None, help="modality of a NRRD/NIfTI input")
    rn.add_argument("--units", default=None,
                    help="voxel units of an input that does not say (e.g. SUVbw, BQML, HU); must agree with the file")
    rn.add_argument("--roi-seg", default=None, metavar="SEG",
                    help="TotalSegmentator segmentation of this patient (multi-label NIfTI, folder of <organ>.nii.gz "
                         "or Slicer .seg.nrrd): lesion candidates outside the organ ROI are dropped and the heat map "
                         "is shown inside it; with --roi-include only the slices those organs need are computed")
    rn.add_argument("--roi-include", default=None, metavar="NAMES|GROUP",
                    help="organs the ROI keeps (TotalSegmentator names or groups such as kidneys; default: all)")
    rn.add_argument("--roi-exclude", default=None, metavar="NAMES|GROUP",
                    help="organs the ROI leaves out, e.g. physiological-uptake (brain, heart, kidneys, bladder); "
                         "default: the model card's default exclusion; 'none' switches it off")
    rn.add_argument("--roi-margin-mm", type=number_from_text, default=None, metavar="MM",
                    help="grow the included and excluded organs by this margin (mm; default: the model card's, or 0)")
    rn.add_argument("--ct", default=None, metavar="CT",
                    help="the CT of the PET/CT: TotalSegmentator segments its organs first (in its own environment), "
                         f"for the organ ROI; its segmentation is written as {ORGANS_FILE}")
    rn.add_argument("--totalseg-fast", action="store_true", help="with --ct: TotalSegmentator's 3 mm model")
    rn.add_argument("--totalseg-env", default=None, help=f"with --ct: TotalSegmentator's environment (default: "
                                                         f"${ENV_VARIABLE} or ~/.diffusion-anomaly/totalsegmentator-venv)")
    rn.add_argument("--suv-factor", type=number_from_text, default=None,
                    help="SUVbw per voxel unit, for PET activity whose file lacks the SUV tags (DICOM, NRRD or NIfTI)")
    _add_inference_args(rn)
    _add_report_args(rn)
    rn.set_defaults(func=_cmd_run)

    rt = sub.add_parser("rethreshold", help="threshold an existing result's heat map again (new lesions, table, "
                                            "summary and report; no network)")
    rt.add_argument("--result", required=True, metavar="DIR", help="a folder 'run' or 'demo' wrote")
    rt.add_argument("--input", default=None, help="the analysed scan, if it moved since the run (default: the path "
                                                  "summary.json records)")
    rt.add_argument("--checkpoint", default=None, help="the model's checkpoint, if it moved since the run (its card "
                                                       "gives the report's model section)")
    rt.add_argument("--roi-include", default=None, metavar="NAMES|GROUP",
                    help="narrow the organ ROI to these organs (default: the run's)")
    rt.add_argument("--roi-exclude", default=None, metavar="NAMES|GROUP",
                    help="organs to leave out of the ROI, 'none' for none (default: the run's)")
    rt.add_argument("--roi-margin-mm", type=number_from_text, default=None, metavar="MM",
                    help="margin around included and excluded organs, mm (default: the run's)")
    _add_threshold_args(rt)
    _add_report_args(rt)
    rt.add_argument("--pdf", action="store_true",
                    help="also print the report to report.pdf with headless Chromium (about 1.5 s more); without it "
                         "an earlier report.pdf, which no longer matches, is removed")
    rt.set_defaults(func=_cmd_rethreshold)

    ev = sub.add_parser("evaluate", help="metrics of a model and the 41%% SUVmax baseline on held-out phantoms: "
                                         "per-slice paper metrics, whole-volume FROC (froc.png) and operating points",
                        arguments=_evaluate_arguments)
    ev.set_defaults(func=_cmd_evaluate)

    sw = sub.add_parser("sweep", help="DSC_opt over a grid of noise levels and guidance scales (unhealthy slices), "
                                      "or with --whole-volume the thresholding and organ exclusion by whole-volume "
                                      "lesion detection", arguments=_sweep_arguments)
    sw.set_defaults(func=_cmd_sweep)

    sub.add_parser("import-checkpoint", help="convert an IgCONDA-PET reference .pth to .safetensors",
                   arguments=_import_arguments)

    ts = sub.add_parser("totalsegmentator",
                        help="segment the organs of a CT with TotalSegmentator (in an environment of its own)")
    ts.add_argument("--ct", required=True, help="the CT: NIfTI, NRRD, a DICOM file or a DICOM series folder")
    ts.add_argument("--out", required=True, metavar="SEG.nii.gz", help="the multi-label segmentation to write")
    ts.add_argument("--organs", default=None, metavar="NAMES",
                    help="TotalSegmentator structure names, comma-separated (default: all of them)")
    ts.add_argument("--fast", action="store_true", help="TotalSegmentator's 3 mm model (faster, coarser)")
    ts.add_argument("--device", choices=tuple(DEVICES), default="auto", help="auto (a GPU when present), cpu or cuda")
    ts.add_argument("--env", default=None, help=f"the TotalSegmentator environment (default: ${ENV_VARIABLE} or "
                                                "~/.diffusion-anomaly/totalsegmentator-venv)")
    ts.set_defaults(func=_cmd_totalsegmentator)

    tss = sub.add_parser("totalsegmentator-setup",
                         help="install TotalSegmentator into a virtual environment of its own (once, about 2.6 GB)")
    tss.add_argument("--env", default=None, help=f"where (default: ${ENV_VARIABLE} or "
                                                 "~/.diffusion-anomaly/totalsegmentator-venv)")
    tss.set_defaults(func=_cmd_totalsegmentator_setup)

    dm = sub.add_parser("demo", help="one phantom case through the bundled model, with overview.png")
    dm.add_argument("--out", default="diffusion-anomaly-demo", help="folder for the demo's input, results, figure and report")
    dm.add_argument("--seed", type=int, default=7_000_001, help="phantom seed")
    dm.add_argument("--lesions", type=_count("the number of lesions", 0), default=3, help="lesions in the phantom")
    dm.add_argument("--modality", choices=("PT", "CT"), default="PT",
                    help="PT: a whole-body PET phantom through the bundled PET model; CT: an abdominal CT phantom "
                         "through the bundled CT organ model (kidneys, pancreas)")
    _add_inference_args(dm)
    _add_report_args(dm)
    dm.set_defaults(func=_cmd_demo)
    for name, verb in sub.choices.items():
        verb.formatter_class = _Help
        verb.epilog = _examples(*EXAMPLES[name])
    return p


#: each verb's --help examples
EXAMPLES: dict[str, tuple[str, ...]] = {
    "models": ("diffusion-anomaly models", "diffusion-anomaly models --dir my-models"),
    "card": ("diffusion-anomaly card cg-ct-organs-demo", "diffusion-anomaly card my-models/best.safetensors"),
    "phantom": ("diffusion-anomaly phantom --out phantoms --seed 100 --count 3 --lesions 2",),
    "train": ("diffusion-anomaly train --out runs/pet --steps 2000 --max-minutes 60",
              "diffusion-anomaly train --method classifier --modality CT --out runs/ct-classifier"),
    "run": ("diffusion-anomaly run --input pet.nii.gz --out out",
            "diffusion-anomaly run --input PET_DICOM_DIR --out out --ct CT_DICOM_DIR --roi-exclude physiological-uptake",
            "diffusion-anomaly run --input ct.nii.gz --modality CT --roi-seg totalseg.nii.gz --out out "
            "--threshold-absolute 40 --subject P-017"),
    "rethreshold": ("diffusion-anomaly rethreshold --result out --threshold-fraction 35%",
                    "diffusion-anomaly rethreshold --result out --threshold-absolute 1.5 --min-size-ml 1",
                    "diffusion-anomaly rethreshold --result out --threshold-otsu --roi-exclude physiological-uptake,liver"),
    "evaluate": ("diffusion-anomaly evaluate --out eval --phantoms 10",
                 "diffusion-anomaly evaluate --checkpoint Resources/models/cg-ct-organs-demo.safetensors --out eval-ct "
                 "--real-ct ../shared/data/real-ct --real-cases 5"),
    "sweep": ("diffusion-anomaly sweep --out sweep --noise-levels 200,400 --guidance-values 1,3,7",
              "diffusion-anomaly sweep --whole-volume --out sweep-wv --write-defaults tuned.safetensors"),
    "import-checkpoint": ("diffusion-anomaly import-checkpoint --input model.pth --output model.safetensors",),
    "totalsegmentator": ("diffusion-anomaly totalsegmentator --ct ct.nii.gz --out organs.nii.gz --fast",),
    "totalsegmentator-setup": ("diffusion-anomaly totalsegmentator-setup",),
    "demo": ("diffusion-anomaly demo", "diffusion-anomaly demo --modality CT --out demo-ct",
             "diffusion-anomaly demo --seed 7000002 --threshold-otsu"),
}


def _examples(*lines: str) -> str:
    """A verb's --help epilog: its examples, one command per line."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _one_line(text: str) -> str:
    """``text`` on one line (a reader's message may span several lines)."""
    return " ".join(str(text).split())


def _gpu_out_of_memory(exc: BaseException) -> bool:
    """True for torch's CUDA out-of-memory error (torch is asked only when a verb has imported it: a verb that did
    not cannot have filled a GPU)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def _refusal(exc: BaseException) -> str:
    """The one sentence of an expected failure: :func:`.errors.refusal_sentence`, plus the GPU's out-of-memory."""
    if _gpu_out_of_memory(exc):
        first = str(exc).split(".")[0]
        return (f"the GPU ran out of memory ({first}); close other GPU programs, use --device cpu "
                "or a smaller input")
    return refusal_sentence(exc)


def _expected(exc: BaseException) -> bool:
    """What the CLI refuses with one sentence instead of a traceback: the package's refusals and a full GPU."""
    return isinstance(exc, REFUSALS) or _gpu_out_of_memory(exc)


def _command_process() -> None:
    """This process is the command, and ends with its verb: what it imported and made is freed with the process,
    so the garbage collector is told to leave those objects alone (:func:`gc.freeze`), now and at exit (at exit
    Python's collections would walk every object the imported libraries made; it was 0.15 s of a 2 s re-threshold
    when the report was drawn with matplotlib)."""
    gc.freeze()
    atexit.register(gc.freeze)


def main(argv: list[str] | None = None) -> int:
    """Run a verb; every refusal (argument errors included) prints one ``error:`` sentence and returns 2.

    No traceback for expected failures (:func:`_expected`); Ctrl-C returns 130 after the
    verb has left its output folder as it found it. Run as the command (``argv`` None), see :func:`_command_process`.
    """
    if argv is None:
        _command_process()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, printed by _Parser.error)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    args.command_line = " ".join(["diffusion-anomaly"] + [shlex.quote(a) for a in argv])
    try:
        return int(args.func(args) or 0)
    except (KeyboardInterrupt, Cancelled):
        print("cancelled", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _expected(exc):
            raise
        print(f"error: {_one_line(_refusal(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
