"""The one path a case takes: volume -> method -> heat map -> lesions -> output files.

Used by the CLI (``run``, ``demo``) and the Slicer module's logic, so both produce the same
numbers. Thresholding and the lesion table run on the cached heat map only, which is what
makes a threshold slider cheap (no network call).
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .diffusion import Progress
from .export import OutputError, check_writable_dir, write_json, write_segmentation, write_table_csv
from .methods.base import MethodResult
from .postprocessing import lesion_table, segment
from .volume import Volume, write_volume


@dataclass
class Thresholding:
    """How a heat map becomes lesions (METHODS.md post-processing)."""

    method: str = "fraction"  # fraction | absolute | otsu
    value: float | None = 0.5
    min_size_ml: float | None = 0.5

    @classmethod
    def from_card(cls, card: dict[str, Any], **overrides: Any) -> "Thresholding":
        d = card.get("inference_defaults", {})
        th = d.get("threshold", {})
        out = cls(method=th.get("method", "fraction"), value=th.get("value", 0.5), min_size_ml=d.get("min_size_ml", 0.5))
        for k, v in overrides.items():
            if v is not None:
                setattr(out, k, v)
        if out.method == "otsu":
            out.value = None
        return out


@dataclass
class CaseResult:
    volume: Volume
    method: MethodResult
    thresholding: Thresholding
    labels: np.ndarray
    table: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def lesion_count(self) -> int:
        return len(self.table)


def lesions_from_heat(heat: Volume, image: Volume, thresholding: Thresholding,
                      roi: np.ndarray | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Threshold + components + lesion table from a heat map: no network evaluation."""
    labels = segment(heat, method=thresholding.method, value=thresholding.value,
                     min_size_ml=thresholding.min_size_ml, roi=roi)
    return labels, lesion_table(labels, image, heat)


def analyse(model, volume: Volume, *, noise_level: int | None = None, guidance_scale: float | None = None,
            steps: Any = "default", thresholding: Thresholding | None = None, roi: np.ndarray | None = None,
            progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> CaseResult:
    """Run ``model`` on ``volume`` and post-process; everything on the input's exact grid."""
    kwargs: dict[str, Any] = {"noise_level": noise_level, "guidance_scale": guidance_scale}
    if steps != "default":
        kwargs["steps"] = steps
    res = model.run(volume, progress=progress, cancel=cancel, **kwargs)
    thresholding = thresholding or Thresholding.from_card(model.card)
    t0 = time.perf_counter()
    labels, table = lesions_from_heat(res.heatmap, volume, thresholding, roi)
    timings = dict(res.timings)
    timings["segment"] = time.perf_counter() - t0
    return CaseResult(volume=volume, method=res, thresholding=thresholding, labels=labels, table=table, timings=timings)


def summary(result: CaseResult, card: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    th = result.thresholding
    return {
        "software": f"DiffusionAnomalyLib {__version__}",
        "model": {"id": card["id"], "method": card["method"], "modality": card["modality"],
                  "not_for_clinical_use": bool(card.get("not_for_clinical_use", True))},
        "parameters": {**result.method.parameters, "threshold_method": th.method, "threshold_value": th.value,
                       "min_size_ml": th.min_size_ml},
        "lesion_count": result.lesion_count,
        "network_evaluations": result.method.network_evaluations,
        "compute": dict(result.method.compute),
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


def write_outputs(result: CaseResult, card: dict[str, Any], out_dir: str | Path,
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
        write_volume(result.method.heatmap, stage / "heatmap.nrrd")
        if write_counterfactual and result.method.counterfactual is not None:
            write_volume(result.method.counterfactual, stage / "counterfactual.nrrd")
        write_segmentation(result.labels, result.volume, stage / "lesions.seg.nrrd")
        write_table_csv(result.table, stage / "lesions.csv")
        for name, writer in (extra_files or {}).items():
            writer(stage / name)
        write_json(summary(result, card, extra_summary), stage / "summary.json")
        return _move_into_place(stage, out)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"Cannot write the results into {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
