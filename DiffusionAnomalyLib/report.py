"""A self-contained HTML report of one case: lesion table, key slices, parameters, input, model card.

One file with the figure embedded as base64 PNG (``figures.overview_png``: input, counterfactual,
heat map and lesion contours on the key slices), so it can be attached to a case record or
e-mailed as is. Every report carries the not-for-clinical-use notice. Written from a
:class:`~.pipeline.CaseResult`: the Slicer module's "HTML report" export and scripts use it alike.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .method_catalog import METHODS, parameter_words
from .card import NOT_FOR_CLINICAL_USE, NOT_FOR_CLINICAL_USE_SHORT, card_items
from .export import format_number
from .files import atomic_path
from .figures import key_slices, overview_png
from .pipeline import CaseResult
from .measurements import CT_LESION_COLUMNS, lesion_columns
from .version import __version__
from .volume import Volume

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


def lesion_table_html(rows: Sequence[dict[str, Any]], modality: str | None = None, units: str | None = None) -> str:
    """The lesion table in the columns of the image's ``modality`` / ``units`` (:func:`.measurements.lesion_columns`)."""
    if not rows:
        return "<p>No lesion candidates above the threshold.</p>"
    columns = lesion_columns(modality, units, rows)
    head = "".join(f"<th>{_e(c.title)}{_e(f' ({c.unit})') if c.unit else ''}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(format_number(r[c.name]))}</td>' for c in columns)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _table_note(modality: str | None, units: str | None) -> str:
    """The sentence under the lesion table: what its intensity columns are."""
    if lesion_columns(modality, units) is CT_LESION_COLUMNS:
        return "HU columns are the attenuation's mean and range over the lesion; centroids in RAS millimetres."
    return "SUV columns are intensity statistics in the input's units; centroids in RAS millimetres."


def key_slice_png(image: Volume, heatmap: Volume, labels: np.ndarray, counterfactual: Volume | None = None,
                  title: str = "", slices: list[int] | None = None, confidence: np.ndarray | None = None) -> bytes:
    """PNG bytes of the key-slice figure (figures.overview_png): input, counterfactual, heat map, contours,
    and the guidance classifier's p(unhealthy) per computed model slice (``confidence``) as a curve."""
    fd, tmp = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    try:
        aspect = float(image.spacing[1] / image.spacing[0])
        vmax = float(np.percentile(image.voxels, 99.5)) or None
        overview_png(tmp, image.voxels, None if counterfactual is None else counterfactual.voxels, heatmap.voxels,
                     labels, slices=slices or key_slices(labels), title=title, vmax=vmax, aspect=aspect,
                     confidence=confidence)
        return Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)


def report_html(case: CaseResult, title: str = "DiffusionAnomaly report",
                parameters: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> str:
    """The report of ``case`` as one HTML string (figure embedded).

    ``parameters``: what the caller adds to the case's own parameter record (e.g. the ROI);
    ``extra``: more lines for the input section.
    """
    image, heatmap, labels, table, card = case.volume, case.shown_heatmap, case.labels, case.table, case.card
    if labels is None or labels.shape != image.voxels.shape or not image.same_geometry(heatmap, atol=1e-4):
        raise ValueError("the report needs the image, heat map and labels on one grid.")
    png = key_slice_png(image, heatmap, labels, case.counterfactual,
                        title=f"{card.get('id', '')} ({case.method_run}) | {NOT_FOR_CLINICAL_USE_SHORT}",
                        confidence=None if case.confidence is None else case.confidence[:, 1])
    figure = base64.b64encode(png).decode("ascii")
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    params = {**case.parameter_record(), "network_evaluations": case.network_evaluations, **(parameters or {})}
    spec = METHODS.get(case.method_run)
    method = [("Method", spec.title if spec else case.method_run)]
    if spec is not None:
        method += [("What it does", spec.summary),
                   ("Parameters", parameter_words(spec.name, case.parameters) or "the defaults")]
    if case.classifier is not None:
        method.append(("Guidance classifier", str(case.classifier.get("id"))))
    if case.confidence is not None and len(case.confidence):
        p = case.confidence[:, 1]
        top = int(np.argmax(p))
        method.append(("Classifier confidence", f"p(unhealthy | slice) over {len(p)} model slices: median "
                       f"{np.median(p):.2f}, highest {p[top]:.2f} at z = {case.confidence[top, 0]:.0f} mm (RAS S)"))
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
{lesion_table_html(table, image.modality, image.units)}
<p class="small">{_e(_table_note(image.modality, image.units))}</p>
<h2>Key slices</h2>
<p class="small">Rows: input, healthy counterfactual (if computed), anomaly heat map, lesion contours (red); for a
classifier-guided method, the classifier's p(unhealthy) per computed model slice, inferior to superior.</p>
<img alt="key slices: input, heat map and lesion contours" src="data:image/png;base64,{figure}">
<h2>Method</h2>
{_kv_table(method)}
<h2>Parameters</h2>
{_kv_table(sorted((str(k), v if v is not None else "not used") for k, v in params.items()))}
<h2>Input</h2>
{_kv_table(inp + list((extra or {}).items()))}
<h2>Model card</h2>
{_kv_table(card_items(card))}
<p class="notice">{_e(NOT_FOR_CLINICAL_USE)}</p>
</body></html>
"""


def write_report(path: str | os.PathLike, case: CaseResult, **kwargs: Any) -> Path:
    """Write :func:`report_html` of ``case`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    text = report_html(case, **kwargs)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
