"""A self-contained HTML report of one case: parameters, model card, lesion table, key slices.

One file with the figures embedded as base64 PNG (``figures.overview_png``: input, counterfactual,
heat map and lesion contours on the key slices), so it can be attached to a case record or
e-mailed as is. Every report carries the not-for-clinical-use notice. Used by the Slicer module's
"HTML report" export; usable from Python on any :class:`~.pipeline.CaseResult`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .export import OutputError, format_number
from .figures import key_slices, overview_png
from .postprocessing import LESION_TABLE_COLUMNS
from .volume import Volume

NOT_FOR_CLINICAL_USE = (
    "Research software. Not for clinical use: these results come from an experimental model and "
    "must not be used for diagnosis, treatment or any clinical decision."
)

_COLUMN_TITLES = {
    "id": "Lesion", "voxels": "Voxels", "volume_ml": "Volume (ml)", "suv_max": "SUVmax", "suv_mean": "SUVmean",
    "suv_peak": "SUVpeak", "tlg": "TLG (SUV·ml)", "max_heat": "Max. heat", "centroid_r": "R (mm)",
    "centroid_a": "A (mm)", "centroid_s": "S (mm)",
}

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.notice { border: 2px solid #b00; background: #fee; color: #900; padding: 0.6em 1em; font-weight: bold; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #bbb; padding: 0.2em 0.6em; }
th { background: #eee; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .small { color: #666; font-size: 0.85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _kv_table(items: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(format_number(v) if not isinstance(v, str) else v)}</td></tr>"
                   for k, v in items)
    return f"<table>{rows}</table>"


def card_items(card: dict[str, Any]) -> list[tuple[str, Any]]:
    """The model card lines shown in reports (and in the Slicer panel's summary)."""
    prov = card.get("provenance", {}) or {}
    items = [("Model", card.get("id", "?")), ("Method", card.get("method", "?")), ("Modality", card.get("modality", "?")),
             ("Training data", prov.get("training_data") or "not stated in the model card")]
    if prov.get("validation_data"):
        items.append(("Validation data", prov["validation_data"]))
    if prov.get("validation_metrics"):
        items.append(("Validation metrics", ", ".join(f"{k} {format_number(v)}" for k, v in prov["validation_metrics"].items())))
    if prov.get("note"):
        items.append(("Note", prov["note"]))
    items.append(("Not for clinical use", "yes" if card.get("not_for_clinical_use", True) else "not flagged by the card"))
    return items


def lesion_table_html(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No lesion candidates above the threshold.</p>"
    head = "".join(f"<th>{_e(_COLUMN_TITLES.get(c, c))}</th>" for c in LESION_TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(format_number(r[c]))}</td>' for c in LESION_TABLE_COLUMNS)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def key_slice_png(image: Volume, heatmap: Volume, labels: np.ndarray, counterfactual: Volume | None = None,
                  title: str = "", slices: list[int] | None = None) -> bytes:
    """PNG bytes of the key-slice figure (figures.overview_png): input, counterfactual, heat map, contours."""
    fd, tmp = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    try:
        aspect = float(image.spacing[1] / image.spacing[0])
        vmax = float(np.percentile(image.voxels, 99.5)) or None
        overview_png(tmp, image.voxels, None if counterfactual is None else counterfactual.voxels, heatmap.voxels,
                     labels, slices=slices or key_slices(labels), title=title, vmax=vmax, aspect=aspect)
        return Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)


def report_html(*, image: Volume, heatmap: Volume, labels: np.ndarray, table: Sequence[dict[str, Any]],
                card: dict[str, Any], parameters: dict[str, Any], title: str = "DiffusionAnomaly report",
                counterfactual: Volume | None = None, extra: dict[str, Any] | None = None) -> str:
    """The report as one HTML string (figures embedded)."""
    if labels.shape != image.voxels.shape or not image.same_geometry(heatmap, atol=1e-4):
        raise ValueError("the report needs the image, heat map and labels on one grid.")
    png = key_slice_png(image, heatmap, labels, counterfactual, title=f"{card.get('id', '')} | NOT FOR CLINICAL USE")
    figure = base64.b64encode(png).decode("ascii")
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    inp = [("Grid (i, j, k)", " x ".join(str(s) for s in image.shape_ijk)),
           ("Spacing (mm)", " x ".join(format_number(float(s)) for s in image.spacing)),
           ("Modality", image.modality or "unknown"), ("Units", image.units or "unknown")]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="notice">{_e(NOT_FOR_CLINICAL_USE)}</p>
<p class="small">Generated {_e(when)} by DiffusionAnomalyLib {_e(__version__)}.</p>
<h2>Lesion candidates ({len(table)})</h2>
{lesion_table_html(table)}
<p class="small">Volumes in ml; SUV columns are intensity statistics in the input's units; centroids in RAS millimetres.</p>
<h2>Key slices</h2>
<p class="small">Rows: input, healthy counterfactual (if computed), anomaly heat map, lesion contours (red).</p>
<img alt="key slices: input, heat map and lesion contours" src="data:image/png;base64,{figure}">
<h2>Parameters</h2>
{_kv_table(sorted((str(k), v if v is not None else "default") for k, v in parameters.items()))}
<h2>Input</h2>
{_kv_table(inp + list((extra or {}).items()))}
<h2>Model card</h2>
{_kv_table(card_items(card))}
<p class="notice">{_e(NOT_FOR_CLINICAL_USE)}</p>
</body></html>
"""


def write_report(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`report_html` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    text = report_html(**kwargs)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"Cannot write {path}: {exc.strerror or exc}. Choose a writable folder.") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_case_report(path: str | os.PathLike, result, card: dict[str, Any], title: str = "DiffusionAnomaly report",
                      extra: dict[str, Any] | None = None) -> Path:
    """The report of a :class:`~.pipeline.CaseResult` (what the CLI and scripts have at hand)."""
    th = result.thresholding
    params = {**result.method.parameters, "threshold_method": th.method, "threshold_value": th.value,
              "min_size_ml": th.min_size_ml, "network_evaluations": result.method.network_evaluations}
    return write_report(path, image=result.volume, heatmap=result.method.heatmap, labels=result.labels,
                        table=result.table, card=card, parameters=params, title=title,
                        counterfactual=result.method.counterfactual, extra=extra)
