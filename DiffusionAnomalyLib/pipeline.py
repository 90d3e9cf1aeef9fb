"""The one path a case takes: volume -> method -> heat map -> lesions -> output files (no torch).

Used by the CLI (``run``, ``demo``), evaluation and the Slicer module's logic (whose worker
returns a method's :class:`MethodResult`), so all produce the same numbers. The method is passed
in (anything with the method interface: ``run(volume, ...) -> MethodResult``), so this module
never imports torch: thresholding and the lesion table run on the cached heat map only, which is
what makes a threshold slider cheap.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .export import write_json, write_segmentation, write_table_csv
from .files import OutputError, output_folder, sha256_of, staged
from .measurements import DEFAULT_MTV_RULE, check_mtv_rule, lesion_table, reference_region, totals
from .postprocessing import Thresholding, inside_roi
from .preprocessing import Grid
from .progress import Cancel, Progress
from .roi import OrganLabels
from .version import software
from .volume import Volume, write_volume

#: what summary.json's classifier_confidence column holds
CONFIDENCE_DEFINITION = ("p(unhealthy | slice) of the guidance classifier at t = 0 for each computed model slice; "
                         "z_mm: the slice's LPS z (= RAS S) in millimetres")

#: the files of one case's result set, as :func:`write_outputs` writes them
RESULT_FILES = ("heatmap.nrrd", "counterfactual.nrrd", "lesions.seg.nrrd", "lesions.csv", "summary.json")
#: a heat map or counterfactual with a smaller share of zero voxels than this is written without gzip: a dense
#: float map gains about 10 % from it (PET demo: 30 of 35 MB) and reads 4 times slower (0.12 against 0.03 s), which
#: is a re-threshold's time; a map that is mostly zeros (an organ ROI) shrinks many times and stays compressed
COMPRESS_ZERO_SHARE = 0.5


@dataclass
class MethodResult:
    """What a method's ``run`` returns: outputs on the input's exact grid, plus its model-space arrays."""

    heatmap: Volume
    counterfactual: Volume | None
    model_input: np.ndarray  # (N, H, W) model units
    model_counterfactual: np.ndarray | None
    model_heat: np.ndarray  # (N, H, W) model units
    grid: Grid  # a ModelGrid, or a CropStack for an organ-crop model
    parameters: dict[str, Any]  # the method parameters as resolved (card defaults filled in)
    timings: dict[str, float] = field(default_factory=dict)
    network_evaluations: int = 0
    compute: dict[str, str] = field(default_factory=dict)  # device and arithmetic precision used
    computed_slices: int | None = None  # model slices that went through the network (None: all of them)
    method: str = ""  # the method that ran (:data:`.method_catalog.METHODS`), e.g. "cg-ddim"
    classifier_evaluations: int = 0  # classifier gradient evaluations (images), for the classifier-guided methods
    #: p(unhealthy | slice) of the guidance classifier at t = 0 for each model slice (NaN where not computed);
    #: None for the methods without a classifier
    classifier_confidence: np.ndarray | None = None

    @property
    def model_slices(self) -> dict[str, int]:
        """Model slices computed and in total (an organ ROI that includes organs computes only its own)."""
        total = int(len(self.model_input))
        return {"computed": total if self.computed_slices is None else int(self.computed_slices), "total": total}


@dataclass
class CaseResult:
    """One analysed case, on the input's exact grid: what the CLI writes, Slicer shows and reports print.

    ``method`` keeps the method's model-space arrays (evaluation, figures); it is None for a case
    rebuilt from files or scene nodes, which can still be re-thresholded and exported.
    """

    volume: Volume
    heatmap: Volume
    counterfactual: Volume | None
    card: dict[str, Any]
    parameters: dict[str, Any]
    thresholding: Thresholding
    labels: np.ndarray | None = None
    table: list[dict[str, Any]] = field(default_factory=list)
    network_evaluations: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    compute: dict[str, str] = field(default_factory=dict)
    checkpoint: str | None = None
    method: MethodResult | None = None
    roi: np.ndarray | None = None  # the organ ROI ([k, j, i], non-zero = inside) the lesions were kept in
    method_name: str = ""  # the method that made the heat map ("" for a case rebuilt without one: the card's)
    classifier: dict[str, Any] | None = None  # the guidance classifier (id, checkpoint) of a classifier-guided run
    #: (n, 2) rows of [z_mm (LPS z of a computed model slice), p(unhealthy | slice)] of the guidance classifier
    confidence: np.ndarray | None = None
    #: the patient's organ map (TotalSegmentator ids, any grid): the organ of each candidate, the reference region
    organs: OrganLabels | None = None
    #: how each candidate's metabolic tumour volume is delimited (:data:`.measurements.MTV_RULES`; PET only)
    mtv_rule: str = DEFAULT_MTV_RULE
    #: the absolute cut-off the thresholding applied, in heat-map units (set by :meth:`threshold`)
    applied_threshold: float | None = None
    #: the reference region's value (:func:`.measurements.reference_region`: liver SUVmean away from the candidates),
    #: None without one (set by :meth:`threshold`)
    reference: dict[str, Any] | None = None

    @property
    def method_run(self) -> str:
        """The name of the method that made the heat map (the card's own when not recorded)."""
        return self.method_name or self.card["method"]

    @property
    def lesion_count(self) -> int:
        return len(self.table)

    @property
    def shown_heatmap(self) -> Volume:
        """The heat map as shown and written: inside the organ ROI only (:func:`.postprocessing.inside_roi`).

        :attr:`heatmap` keeps the whole map, so a new ROI re-filters without a network call.
        """
        if self.roi is None:
            return self.heatmap
        return self.heatmap.with_voxels(inside_roi(self.heatmap.voxels, self.roi))

    def threshold(self, thresholding: Thresholding | None = None, roi: np.ndarray | Volume | None = None) -> "CaseResult":
        """(Re)compute labels and lesion table from the heat map inside ``roi`` (None: the whole map),
        with ``thresholding`` (None: the current one): no network evaluation."""
        thresholding = thresholding or self.thresholding
        roi = roi.voxels if isinstance(roi, Volume) else roi
        t0 = time.perf_counter()
        self.labels, self.table = lesions_from_heat(self.heatmap, self.volume, thresholding, roi, organs=self.organs,
                                                    mtv_rule=self.mtv_rule)
        self.applied_threshold = thresholding.cut_off(self.heatmap, roi)
        self.reference = reference_region(self.volume, self.organs, self.labels)
        self.thresholding, self.roi = thresholding, roi
        self.timings["segment"] = time.perf_counter() - t0
        return self

    @property
    def heat_units(self) -> str:
        """The heat map's units, as its method states them (e.g. "|SUVbw difference|")."""
        return self.heatmap.units or "heat-map units"

    @property
    def totals(self) -> Any:
        """Whole-scan totals of the lesion table (:func:`.measurements.totals`)."""
        return totals(self.table, self.volume.modality, self.volume.units)

    def threshold_words(self) -> str:
        """The thresholding in words with units and the absolute cut-off applied (:meth:`Thresholding.words`)."""
        return self.thresholding.words(self.heat_units, self.applied_threshold)

    def parameter_record(self) -> dict[str, Any]:
        """Every parameter that produced this result: the method's and the thresholding's."""
        return {**self.parameters, **self.thresholding.as_parameters()}


def lesions_from_heat(heat: Volume, image: Volume, thresholding: Thresholding, roi: np.ndarray | None = None,
                      organs: OrganLabels | None = None,
                      mtv_rule: str = DEFAULT_MTV_RULE) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Threshold + components (+ the card's clean-up chain, :meth:`Thresholding.apply`) + lesion table (with each
    candidate's organ from ``organs``) from a heat map: no network evaluation."""
    labels = thresholding.apply(heat, roi)
    return labels, lesion_table(labels, image, heat, organs=organs, mtv_rule=mtv_rule)


def analyse(model, volume: Volume, *, parameters: dict[str, Any] | None = None,
            thresholding: Thresholding | None = None, roi: np.ndarray | Volume | None = None,
            region: np.ndarray | Volume | None = None, progress: Progress | None = None,
            cancel: Cancel | None = None, organs: OrganLabels | None = None,
            mtv_rule: str = DEFAULT_MTV_RULE) -> CaseResult:
    """Run ``model`` (any method object: ``model.method`` names it) on ``volume`` and post-process;
    everything on the input's exact grid.

    ``parameters``: the method's parameters by name (:data:`.method_catalog.METHODS`); one left out
    or None takes its default. The parameters and the thresholding (None: the method's default,
    :meth:`Thresholding.for_method`) are checked before any network evaluation. ``roi``: lesions
    are kept, and the heat map shown, inside it. ``region``: the method computes only what this
    region needs (an organ ROI that includes organs; None: the whole volume). ``organs``: the patient's organ map
    (each candidate's organ, the reference region); ``mtv_rule``: :data:`.measurements.MTV_RULES` (PET).
    """
    check_mtv_rule(mtv_rule)
    given = dict(parameters or {})
    thresholding = (thresholding or Thresholding.for_method(model.card, method_name(model))).check()
    model.resolve(**given)
    res = model.run(volume, progress=progress, cancel=cancel, region=region, **given)
    if volume.modality is None:  # accepted by the model (check_modality): a NIfTI/NRRD of the model's modality
        volume = volume.with_voxels(volume.voxels, modality=model.card["modality"])
    case = CaseResult(volume=volume, heatmap=res.heatmap, counterfactual=res.counterfactual, card=model.card,
                      parameters=dict(res.parameters), thresholding=thresholding,
                      network_evaluations=res.network_evaluations, timings=dict(res.timings),
                      compute=dict(res.compute), checkpoint=getattr(model, "source", None), method=res,
                      method_name=method_name(model), classifier=classifier_record(model),
                      confidence=slice_confidence(res), organs=organs, mtv_rule=mtv_rule)
    return case.threshold(roi=roi)


def slice_confidence(res: MethodResult) -> np.ndarray | None:
    """[z_mm, p(unhealthy)] rows of the computed model slices of a classifier-guided run (None without one)."""
    if res.classifier_confidence is None:
        return None
    p = np.asarray(res.classifier_confidence, dtype=float)
    z = res.grid.slice_z()
    keep = np.isfinite(p)
    return np.stack([z[keep], p[keep]], axis=1)


def method_name(model) -> str:
    """The name of the method a method object runs (its card's own method for an object without one)."""
    return getattr(model, "method", None) or model.card["method"]


def classifier_record(model) -> dict[str, Any] | None:
    """The guidance classifier of a method object (id and file), None for a method without one."""
    guidance = getattr(model, "classifier", None)
    if guidance is None:
        return None
    return {"id": guidance.card["id"], "checkpoint": getattr(guidance, "source", None)}


def _file_record(path: str | None) -> dict[str, Any]:
    """A file a result depends on: its path and SHA-256 (None when it is not a file on disk)."""
    if path is None or not Path(path).is_file():
        return {"path": path, "sha256": None}
    return {"path": str(Path(path).resolve()), "sha256": sha256_of(path)}


def summary(result: CaseResult, extra: dict[str, Any] | None = None, command_line: str | None = None) -> dict[str, Any]:
    """The content of summary.json: when, by what (software, command line), model and checkpoint (with SHA-256),
    every parameter, the absolute cut-off applied and the heat map's units, lesion count and totals, work done,
    input grid."""
    card = result.card
    classifier = result.classifier
    if classifier is not None:
        classifier = {**classifier, "sha256": _file_record(classifier.get("checkpoint"))["sha256"]}
    return {
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "software": software(),
        "command_line": command_line,
        "model": {"id": card["id"], "method": result.method_run, "network": card["method"],
                  "modality": card["modality"], "not_for_clinical_use": bool(card.get("not_for_clinical_use", True))},
        "checkpoint": _file_record(result.checkpoint),
        **({"classifier": classifier} if classifier is not None else {}),
        "parameters": {**result.parameter_record(), "mtv_rule": result.mtv_rule},
        "threshold": {"rule": result.threshold_words(), "applied_cut_off": result.applied_threshold,
                      "heat_map_units": result.heat_units},
        "lesion_count": result.lesion_count,
        "totals": result.totals,
        **({"reference_region": result.reference} if result.reference is not None else {}),
        "network_evaluations": result.network_evaluations,
        **({"model_slices": result.method.model_slices} if result.method is not None else {}),
        **({"classifier_evaluations": int(result.method.classifier_evaluations)}
           if result.method is not None and result.classifier is not None else {}),
        **({"classifier_confidence": {"definition": CONFIDENCE_DEFINITION, "slices": [
            {"z_mm": round(float(z), 2), "p_unhealthy": round(float(p), 4)} for z, p in result.confidence]}}
           if result.confidence is not None else {}),
        "compute": dict(result.compute),
        "timings_seconds": {k: round(v, 3) for k, v in result.timings.items()},
        "input": {"shape_ijk": list(result.volume.shape_ijk), "spacing_mm": [float(s) for s in result.volume.spacing],
                  "ijk_to_ras": result.volume.ijk_to_ras.tolist(), "units": result.volume.units,
                  "modality": result.volume.modality},
        **(extra or {}),
    }


def _worth_compressing(volume: Volume) -> bool:
    """Whether a map is written with gzip: when at least :data:`COMPRESS_ZERO_SHARE` of its voxels are 0."""
    voxels = volume.voxels
    return bool(voxels.size - np.count_nonzero(voxels) >= COMPRESS_ZERO_SHARE * voxels.size)


def write_outputs(result: CaseResult, out_dir: str | Path,
                  extra_summary: dict[str, Any] | None = None, write_counterfactual: bool = True,
                  extra_files: dict[str, Callable[[Path], Any]] | None = None,
                  replaces: tuple[str, ...] = (), command_line: str | None = None,
                  write_maps: bool = True) -> dict[str, Path]:
    """Write heatmap.nrrd, counterfactual.nrrd, lesions.seg.nrrd, lesions.csv, summary.json (+ ``extra_files``).

    The folder is held for the writing (:func:`.files.output_folder`: created if missing, locked
    against a second run, removed again if this call created it and fails) and the files are
    written into a hidden staging folder (:func:`.files.staged`) and moved into ``out_dir`` only
    when all of them succeeded, so a failure leaves no partial set; a counterfactual of an
    earlier run is removed when this set has none, so the folder always holds one run's set
    (``replaces``: more files of such a set, e.g. ``run --ct``'s organ segmentation). ``write_maps=False``
    (re-thresholding) leaves the folder's heat map and counterfactual as they are. The maps are gzipped only
    where that pays (:data:`COMPRESS_ZERO_SHARE`).
    """
    maps = ("heatmap.nrrd", "counterfactual.nrrd")
    kept = () if write_maps else maps
    with output_folder(out_dir, outputs=(*RESULT_FILES, *(extra_files or {}))) as out:
        try:
            with staged(out, replaces=[n for n in (*RESULT_FILES, *replaces) if n not in kept]) as stage:
                if write_maps:
                    write_volume(result.shown_heatmap, stage / maps[0], compress=_worth_compressing(result.shown_heatmap))
                    if write_counterfactual and result.counterfactual is not None:
                        write_volume(result.counterfactual, stage / maps[1],
                                     compress=_worth_compressing(result.counterfactual))
                write_segmentation(result.labels, result.volume, stage / "lesions.seg.nrrd")
                write_table_csv(result.table, stage / "lesions.csv", modality=result.volume.modality,
                                units=result.volume.units)
                for name, writer in (extra_files or {}).items():
                    writer(stage / name)
                write_json(summary(result, extra_summary, command_line), stage / "summary.json")
                names = sorted(f.name for f in stage.iterdir() if f.is_file())
        except OSError as exc:
            if isinstance(exc, OutputError):
                raise
            raise OutputError(f"Cannot write the results into {out}: {exc.strerror or exc}") from exc
    return {name: out / name for name in names}
