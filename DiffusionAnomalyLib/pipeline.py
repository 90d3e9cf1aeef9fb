"""The one path a case takes: volume -> method -> heat map -> lesions -> output files (no torch).

Used by the CLI (``run``, ``demo``), evaluation and the Slicer module's logic (whose worker
returns a method's :class:`MethodResult`), so all produce the same numbers. The method is passed
in (anything with the method interface: ``run(volume, ...) -> MethodResult``), so this module
never imports torch: thresholding and the lesion table run on the cached heat map only, which is
what makes a threshold slider cheap.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .card import Steps
from .export import write_json, write_segmentation, write_table_csv
from .files import OutputError, check_writable_dir
from .postprocessing import Thresholding, lesion_table, segment
from .preprocessing import ModelGrid
from .progress import Cancel, Progress
from .version import __version__
from .volume import Volume, write_volume


@dataclass
class MethodResult:
    """What a method's ``run`` returns: outputs on the input's exact grid, plus its model-space arrays."""

    heatmap: Volume
    counterfactual: Volume | None
    model_input: np.ndarray  # (N, H, W) model units
    model_counterfactual: np.ndarray | None
    model_heat: np.ndarray  # (N, H, W) model units
    grid: ModelGrid
    parameters: dict[str, Any]  # the method parameters as resolved (card defaults filled in)
    timings: dict[str, float] = field(default_factory=dict)
    network_evaluations: int = 0
    compute: dict[str, str] = field(default_factory=dict)  # device and arithmetic precision used


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

    @property
    def lesion_count(self) -> int:
        return len(self.table)

    def threshold(self, thresholding: Thresholding | None = None, roi: np.ndarray | None = None) -> "CaseResult":
        """(Re)compute labels and lesion table from the heat map: no network evaluation."""
        thresholding = thresholding or self.thresholding
        t0 = time.perf_counter()
        self.labels, self.table = lesions_from_heat(self.heatmap, self.volume, thresholding, roi)
        self.thresholding = thresholding
        self.timings["segment"] = time.perf_counter() - t0
        return self

    def parameter_record(self) -> dict[str, Any]:
        """Every parameter that produced this result: the method's and the thresholding's."""
        return {**self.parameters, **self.thresholding.as_parameters()}


def lesions_from_heat(heat: Volume, image: Volume, thresholding: Thresholding,
                      roi: np.ndarray | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Threshold + components + lesion table from a heat map: no network evaluation."""
    labels = segment(heat, method=thresholding.method, value=thresholding.value,
                     min_size_ml=thresholding.min_size_ml, roi=roi)
    return labels, lesion_table(labels, image, heat)


def analyse(model, volume: Volume, *, noise_level: int | None = None, guidance_scale: float | None = None,
            steps: Steps | None = None, thresholding: Thresholding | None = None, roi: np.ndarray | None = None,
            progress: Progress | None = None, cancel: Cancel | None = None) -> CaseResult:
    """Run ``model`` on ``volume`` and post-process; everything on the input's exact grid.

    A parameter left as None takes the model card's default.
    """
    res = model.run(volume, noise_level=noise_level, guidance_scale=guidance_scale, steps=steps,
                    progress=progress, cancel=cancel)
    case = CaseResult(volume=volume, heatmap=res.heatmap, counterfactual=res.counterfactual, card=model.card,
                      parameters=dict(res.parameters), thresholding=thresholding or Thresholding.from_card(model.card),
                      network_evaluations=res.network_evaluations, timings=dict(res.timings),
                      compute=dict(res.compute), checkpoint=getattr(model, "source", None), method=res)
    return case.threshold(roi=roi)


def summary(result: CaseResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of summary.json: software, model, parameters, lesion count, work done, input grid."""
    card = result.card
    return {
        "software": f"DiffusionAnomalyLib {__version__}",
        "model": {"id": card["id"], "method": card["method"], "modality": card["modality"],
                  "not_for_clinical_use": bool(card.get("not_for_clinical_use", True))},
        "parameters": result.parameter_record(),
        "lesion_count": result.lesion_count,
        "network_evaluations": result.network_evaluations,
        "compute": dict(result.compute),
        "timings_seconds": {k: round(v, 3) for k, v in result.timings.items()},
        "input": {"shape_ijk": list(result.volume.shape_ijk), "spacing_mm": [float(s) for s in result.volume.spacing],
                  "ijk_to_ras": result.volume.ijk_to_ras.tolist(), "units": result.volume.units,
                  "modality": result.volume.modality},
        **(extra or {}),
    }


def _move_into_place(stage: Path, out: Path) -> dict[str, Path]:
    """Move every staged file into ``out``; on any failure restore ``out`` exactly as it was."""
    files = sorted(f for f in stage.iterdir() if f.is_file())
    blocked = [f.name for f in files if (out / f.name).exists() and not (out / f.name).is_file()]
    if blocked:
        raise OutputError(f"Cannot write the results into {out}: {', '.join(blocked)} exist(s) there as a folder.")
    backup = stage / ".previous"
    backup.mkdir()
    moved: list[Path] = []
    try:
        for f in files:
            target = out / f.name
            if target.exists():
                target.replace(backup / f.name)  # keep the previous run's file until all succeeded
            f.replace(target)
            moved.append(target)
    except OSError:
        for target in moved:
            target.unlink(missing_ok=True)
        for old in backup.iterdir():
            old.replace(out / old.name)
        raise
    return {t.name: t for t in moved}


def write_outputs(result: CaseResult, out_dir: str | Path,
                  extra_summary: dict[str, Any] | None = None, write_counterfactual: bool = True,
                  extra_files: dict[str, Callable[[Path], Any]] | None = None) -> dict[str, Path]:
    """Write heatmap.nrrd, counterfactual.nrrd, lesions.seg.nrrd, lesions.csv, summary.json.

    Files are written into a hidden staging folder and moved into ``out_dir`` only when all of
    them succeeded, so a failure leaves no partial set of outputs.
    """
    out = check_writable_dir(out_dir)
    stage = out / f".staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        write_volume(result.heatmap, stage / "heatmap.nrrd")
        if write_counterfactual and result.counterfactual is not None:
            write_volume(result.counterfactual, stage / "counterfactual.nrrd")
        write_segmentation(result.labels, result.volume, stage / "lesions.seg.nrrd")
        write_table_csv(result.table, stage / "lesions.csv")
        for name, writer in (extra_files or {}).items():
            writer(stage / name)
        write_json(summary(result, extra_summary), stage / "summary.json")
        return _move_into_place(stage, out)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"Cannot write the results into {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
