"""A self-contained report of one case a clinician can attach to a research record: HTML, and PDF where a
headless Chromium is installed.

One HTML file with every figure embedded as base64 PNG (:class:`.figures.CaseFigures`): case identity (series
description and UID, study date, a pseudonymised subject field to fill; nothing identifying is copied), SUV
provenance, the software's version and commit, the model card, the parameters in words with units and the
absolute cut-off applied, a coronal MIP with every candidate, one axial key image per candidate through its
SUVmax (CT: its maximum heat) with its id in the colour of its Slicer segment, orientation markers in the
radiological convention whatever the storage order, the lesion table with units, definitions, totals and the
reference region, and the not-for-clinical-use notice. Written from a :class:`~.pipeline.CaseResult`: the
command line and the Slicer module's "HTML report" export use it alike. The PDF is Chromium's print of the
same HTML (:func:`render_pdf`), with no network.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .card import NOT_FOR_CLINICAL_USE, card_items
from .export import format_number, lesion_colors
from .figures import CaseFigures
from .files import OutputError, atomic_path
from .measurements import DEFAULT_MTV_RULE, MTV_RULES, definitions, lesion_columns
from .method_catalog import METHODS, parameter_words
from .pipeline import CaseResult
from .processes import end_tree, start_tree
from .version import software
from .volume import is_suv, modality_words

__all__ = ["CHROMIUM_NAMES", "KEY_IMAGE_LIMIT", "PDF_TIMEOUT_S", "find_chromium", "lesion_colours", "lesion_table_html",
           "render_pdf", "render_png", "report_html", "write_report"]

_log = logging.getLogger(__name__)

#: At most this many key images (candidates 1.. in table order: the most anomalous first); the rest are in the table.
KEY_IMAGE_LIMIT = 24
#: The browsers that print the report to PDF (headless), looked for on PATH in this order.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: How long (seconds) the browser may take to print one report before it is stopped.
PDF_TIMEOUT_S = 60.0
#: What the subject field shows when the caller gives no pseudonym: a line to write on.
_BLANK = '<span class="fill" aria-label="to be filled in">&nbsp;</span>'

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 60em;
       color: #222; line-height: 1.35; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.4em; border-bottom: 1px solid #ccc; }
.notice { border: 2px solid #b00; background: #fee; color: #900; padding: 0.5em 1em; font-weight: bold; }
table { border-collapse: collapse; margin: 0.4em 0; } td, th { border: 1px solid #bbb; padding: 0.15em 0.5em; }
th { background: #eee; text-align: left; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.lesions { font-size: 0.8em; } table.lesions th { vertical-align: bottom; } table.lesions td, table.lesions th
{ padding: 0.1em 0.3em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #333; vertical-align: -0.1em;
          margin-right: 0.3em; }
.fill { display: inline-block; min-width: 18em; border-bottom: 1px solid #333; }
figure { margin: 0.8em 0; break-inside: avoid; page-break-inside: avoid; }
figure img { max-width: 100%; display: block; } figcaption { font-size: 0.9em; margin-top: 0.2em; }
figure.key { display: flex; align-items: center; gap: 0.8em; } figure.key img { max-width: 72%; }
figure.mip img { max-height: 28em; } figure.key img { max-height: 17em; }
dl.definitions dt { font-weight: 600; margin-top: 0.3em; } dl.definitions dd { margin-left: 1.5em; }
.small { color: #555; font-size: 0.85em; }
@page { size: A4; margin: 12mm; }
@media print { body { margin: 0; max-width: none; font-size: 10pt; } h2 { break-after: avoid; }
               figure.mip img { max-height: 105mm; width: auto; } figure.key img { max-height: 62mm; width: auto; } }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    return _e(value if isinstance(value, str) else format_number(value))


def _kv_table(items: Sequence[tuple[str, Any]], raw: Sequence[str] = ()) -> str:
    """A two-column table of (label, value); values whose label is in ``raw`` are HTML already."""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v if k in raw else _cell(v)}</td></tr>" for k, v in items)
    return f"<table>{rows}</table>"


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{int(round(255 * float(c))):02x}" for c in rgb[:3])


def _swatch(rgb: Sequence[float] | None) -> str:
    return "" if rgb is None else f'<span class="swatch" style="background:{_hex(rgb)}"></span>'


def lesion_colours(ids: Sequence[int]) -> dict[int, tuple[float, float, float]]:
    """Label value -> the colour of its Slicer segment (:func:`.export.lesion_colors`, in label order, as
    :func:`.export.write_segmentation` assigns them) for the label values ``ids`` (a lesion table's)."""
    ids = sorted(int(v) for v in ids)
    return dict(zip(ids, lesion_colors(len(ids))))


def lesion_table_html(rows: Sequence[dict[str, Any]], modality: str | None = None, units: str | None = None,
                      colours: dict[int, Sequence[float]] | None = None, heat_units: str | None = None,
                      mtv_rule: str = DEFAULT_MTV_RULE) -> str:
    """The lesion table in the columns of :func:`.measurements.lesion_columns` (headings with units), each id
    beside a swatch of its segment colour when ``colours`` (label value -> RGB) are given."""
    if not rows:
        return "<p>No lesion candidates above the threshold.</p>"
    columns = lesion_columns(modality, units, rows, heat_units=heat_units, mtv_rule=mtv_rule)
    head = "".join(f"<th>{_e(c.heading)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            if c.name == "id":
                cells.append(f'<td class="num">{_swatch((colours or {}).get(int(r["id"])))}{_cell(r["id"])}</td>')
            elif c.text:  # TotalSegmentator names may break after their underscores
                cells.append(f"<td>{_e(r[c.name]).replace('_', '_<wbr>')}</td>")
            else:
                cells.append(f'<td class="num">{_cell(r[c.name])}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="lesions"><tr>{head}</tr>{"".join(body)}</table>'


def _definitions_html(columns) -> str:
    items = "".join(f"<dt>{_e(heading)}</dt><dd>{_e(sentence)}</dd>" for heading, sentence in definitions(columns))
    return f'<dl class="definitions">{items}</dl>'


# ---- sections ------------------------------------------------------------------------------------
def _identity(case: CaseResult, subject: str) -> list[tuple[str, Any]]:
    meta, image = case.volume.meta, case.volume
    not_recorded = "not recorded in the input"
    items: list[tuple[str, Any]] = [("Subject (pseudonym)", _e(subject) if subject.strip() else _BLANK)]
    items += [("Series description", meta.get("series_description") or not_recorded),
              ("Series instance UID", meta.get("series_instance_uid") or not_recorded),
              ("Study date", meta.get("study_date") or not_recorded)]
    if meta.get("study_description"):
        items.append(("Study description", meta["study_description"]))
    files = meta.get("files") or []
    source = f"DICOM series of {len(files)} files" if meta.get("format") == "dicom" and files else (
        meta.get("format") or "image file")
    items += [("Input", source), ("Modality", modality_words(image.modality) if image.modality else "unknown"),
              ("Units", image.units or "unknown")]
    return items


def _suv_provenance(case: CaseResult, uptake: bool) -> list[tuple[str, Any]] | None:
    """The SUV provenance rows of a PET input (``uptake``: the table has uptake columns; None when not)."""
    image = case.volume
    if not uptake:
        return None
    record = image.meta.get("suv_provenance")
    if not record:
        return [("SUV", f"how the voxels came to be in {image.units or 'their units'} is not recorded in the input "
                        "(a file already in these units, not a DICOM series read here)")]

    def span(value, fmt):
        if isinstance(value, (list, tuple)):
            return f"per slice, {fmt(min(value))} to {fmt(max(value))}" if len(set(value)) > 1 else fmt(value[0])
        return fmt(value)

    rows: list[tuple[str, Any]] = [("SUV from", record.get("source") or "not recorded")]
    shown = (("weight_kg", "Patient weight", lambda v: f"{v:g} kg"),
             ("injected_dose_bq", "Injected dose", lambda v: f"{v / 1e6:.4g} MBq ({v:.6g} Bq)"),
             ("decay_correction", "Decay correction (0054,1102)", str),
             ("half_life_s", "Half-life", lambda v: f"{v:g} s ({v / 60:.4g} min)"),
             ("injection_time", "Injection time", str),
             ("reference_time", "Dose decayed to", str),
             ("factor", "SUVbw factor", lambda v: f"{v:.6g} (SUVbw per Bq/ml)"))
    for key, label, fmt in shown:
        if record.get(key) is not None:
            rows.append((label, span(record[key], fmt)))
    return rows


def _method(case: CaseResult, mtv: bool) -> list[tuple[str, Any]]:
    spec = METHODS.get(case.method_run)
    items: list[tuple[str, Any]] = [("Method", spec.title if spec else case.method_run)]
    if spec is not None:
        items += [("What it does", spec.summary),
                  ("Its parameters", parameter_words(spec.name, case.parameters) or "the defaults")]
    if case.classifier is not None:
        items.append(("Guidance classifier", str(case.classifier.get("id"))))
    if case.confidence is not None and len(case.confidence):
        p = case.confidence[:, 1]
        top = int(np.argmax(p))
        items.append(("Classifier confidence", f"p(unhealthy | slice) over {len(p)} model slices: median "
                      f"{np.median(p):.2f}, highest {p[top]:.2f} at z = {case.confidence[top, 0]:.0f} mm (RAS S)"))
    cut = case.applied_threshold
    items.append(("Threshold", case.thresholding.words(case.heat_units, cut)))
    items.append(("Absolute cut-off applied", "none (no candidate could be thresholded)" if cut is None
                  else f"{cut:.4g} {case.heat_units}"))
    if case.roi is not None:
        items.append(("Organ region", "candidates kept, and the heat map shown, inside the organ ROI (see "
                                      "roi_include / roi_exclude / roi_margin_mm below)"))
    if mtv:
        items.append(("MTV rule", MTV_RULES.get(case.mtv_rule, case.mtv_rule)))
    if case.compute:
        items.append(("Computed on", ", ".join(f"{k} {v}" for k, v in case.compute.items())))
    items.append(("Network evaluations", case.network_evaluations))
    return items


def _reference_html(case: CaseResult, uptake: bool) -> str:
    if not uptake:
        return ""
    ref = case.reference
    if ref is None:
        why = ("no organ map was given" if case.organs is None else
               "the organ map has no liver, or none of it lies more than the erosion margin inside its edge")
        return f"<p><b>Reference region</b>: none ({_e(why)}).</p>"
    return (f"<p><b>Reference region</b>: {_e(ref['label'])} {_cell(ref['mean'])} {_e(ref['units'])} (SD "
            f"{_cell(ref['sd'])}; {_cell(ref['volume_ml'])} ml, {ref['voxels']} voxels). "
            f'<span class="small">{_e(ref["definition"])}</span></p>')


def _totals_html(case: CaseResult) -> str:
    rows = case.totals
    if isinstance(rows, dict):
        rows = [(k, v, "") for k, v in rows.items()]
    cells = "".join(f"<tr><th>{_e(label)}</th><td class=\"num\">{_cell(value)}</td><td>{_e(unit)}</td></tr>"
                    for label, value, unit in rows)
    return f"<table>{cells}</table>"


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _key_images(case: CaseResult, figures: CaseFigures, colours: dict, limit: int, ct: bool) -> str:
    image = case.volume
    parts = []
    for row in case.table[:limit]:
        lesion = int(row["id"])
        if lesion not in figures.boxes:
            continue
        at = figures.hottest(lesion, "heat" if ct else "image")
        kji = figures.stored_index(at)
        ras = image.ijk_to_ras_points([kji[::-1]])[0]
        what = "maximum heat" if ct else ("SUVmax" if is_suv(image.units) else "maximum")
        value = figures.heat[at] if ct else figures.image[at]
        unit = case.heat_units if ct else (image.units or "")
        organ = f", {row['organ']}" if row.get("organ") not in (None, "", "none") else ""
        caption = (f"{_swatch(colours.get(lesion))}<b>Candidate {lesion}</b>{_e(organ)}: axial slice through its "
                   f"{_e(what)} ({_cell(float(value))} {_e(unit)}) at R {ras[0]:.1f}, A {ras[1]:.1f}, "
                   f"S {ras[2]:.1f} mm; right: {figures.zoom_mm:g} mm around it.")
        picture = _png(figures.key_image(lesion, at))
        parts.append(f'<figure class="key"><img alt="key image of candidate {lesion}" src="{picture}">'
                     f"<figcaption>{caption}</figcaption></figure>")
    left = len(case.table) - min(len(case.table), limit)
    if left > 0:
        parts.append(f"<p>{left} more candidates have no key image here (the first {limit}, most anomalous first, "
                     "are shown); all are in the table.</p>")
    return "".join(parts) or "<p>No candidates, no key images.</p>"


def report_html(case: CaseResult, title: str = "DiffusionAnomaly report", parameters: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None, subject: str = "", max_key_images: int = KEY_IMAGE_LIMIT) -> str:
    """The report of ``case`` as one HTML string (figures embedded).

    ``parameters``: what the caller adds to the case's own parameter record (e.g. the ROI); ``extra``: more
    lines for the input section; ``subject``: the pseudonymised subject (empty: a line to fill in by hand);
    ``max_key_images``: key images of at most this many candidates (table order).
    """
    image, heatmap, labels, table, card = case.volume, case.shown_heatmap, case.labels, case.table, case.card
    if labels is None or labels.shape != image.voxels.shape or not image.same_geometry(heatmap, atol=1e-4):
        raise ValueError("the report needs the image, heat map and labels on one grid.")
    columns = lesion_columns(image.modality, image.units, table, heat_units=case.heat_units, mtv_rule=case.mtv_rule)
    names = {c.name for c in columns}
    ct, uptake, mtv = "hu_mean" in names, "suv_max" in names, "mtv_ml" in names
    colours = lesion_colours([row["id"] for row in table])
    figures = CaseFigures(image, heatmap, labels, colours, cut_off=case.applied_threshold,
                          image_units=image.units or "", heat_units=case.heat_units, ct=ct)
    orientation = figures.orientation
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    params = {**case.parameter_record(), "network_evaluations": case.network_evaluations, **(parameters or {})}
    grid = [("Grid (i, j, k)", " x ".join(str(s) for s in image.shape_ijk)),
            ("Spacing (mm)", " x ".join(format_number(float(s)) for s in image.spacing)),
            ("Orientation", orientation.words())]
    suv = _suv_provenance(case, uptake)
    identity = _identity(case, subject)
    mip = _png(figures.coronal())
    overview = (("Left: the coronal CT slice through candidate 1's maximum heat (soft-tissue window) with every "
                 "candidate's outline projected onto it" if case.table else "Left: the middle coronal CT slice")
                if ct else "Left: the image's coronal maximum-intensity projection (anterior to posterior) with every "
                           "candidate's outline") + (
        ", each numbered in the colour of its Slicer segment. Right: the heat map's maximum-intensity projection "
        f"({case.heat_units}), the cut-off marked on its colour bar. Superior up, patient right on the image's left.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="notice">{_e(NOT_FOR_CLINICAL_USE)}</p>
<p class="small">Generated {_e(when)} by {_e(software())}.</p>
<h2>Case</h2>
{_kv_table(identity, raw=("Subject (pseudonym)",))}
<h2>Result</h2>
<p><b>{len(table)} lesion candidate{'s' if len(table) != 1 else ''}</b>; threshold:
{_e(case.thresholding.words(case.heat_units, case.applied_threshold))}.</p>
{_totals_html(case)}
{_reference_html(case, uptake)}
<figure class="mip"><img alt="coronal view of the image and maximum-intensity projection of the heat map"
src="{mip}"><figcaption>{_e(overview)}</figcaption></figure>
<h2>Lesion candidates ({len(table)})</h2>
{lesion_table_html(table, image.modality, image.units, colours, case.heat_units, case.mtv_rule)}
<h3>Definitions</h3>
{_definitions_html(columns)}
<h2>Key images</h2>
<p class="small">{_e(orientation.words())} Each candidate is outlined in the colour of its Slicer segment and
numbered; the candidate of the image is drawn thicker.</p>
{_key_images(case, figures, colours, max_key_images, ct)}
<h2>Method and parameters</h2>
{_kv_table(_method(case, mtv))}
<h3>Parameter record</h3>
{_kv_table(sorted((str(k), v if v is not None else "not used") for k, v in params.items()))}
<h2>Input</h2>
{_kv_table(grid + list((extra or {}).items()))}
{"" if suv is None else "<h3>SUV provenance</h3>" + _kv_table(suv)}
<h2>Model card</h2>
{_kv_table(card_items(card))}
<h2>Software</h2>
{_kv_table([("Software", software()), ("Report generated", when)])}
<p class="notice">{_e(NOT_FOR_CLINICAL_USE)}</p>
</body></html>
"""


# ---- files: HTML, and PDF through a headless Chromium ---------------------------------------------
def find_chromium() -> str | None:
    """The first of :data:`CHROMIUM_NAMES` on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(html_path: Path, target: Path, flags: Sequence[str], timeout: float, binary: str | None) -> Path:
    """Run a headless Chromium on the local file ``html_path`` with output ``flags`` writing ``target``
    (atomically); no network (every host name fails to resolve), a throw-away profile, the whole process tree
    ended afterwards (:func:`.processes.end_tree`). Raises OutputError with one sentence when it fails."""
    binary = binary or find_chromium()
    if binary is None:
        raise OutputError(f"Cannot write {target.name}: no Chromium or Google Chrome found on PATH "
                          f"(looked for {', '.join(CHROMIUM_NAMES)}).")
    with tempfile.TemporaryDirectory(prefix="diffusion-anomaly-chromium-") as profile, \
            atomic_path(target, suffix=target.suffix) as tmp:
        cmd = [binary, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
               "--disable-extensions", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-default-apps", "--disable-breakpad", "--mute-audio", "--hide-scrollbars",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
               *(["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # root: no sandbox
               *(flag.format(out=tmp) for flag in flags), html_path.resolve().as_uri()]
        env = {**os.environ, "HOME": profile, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile}
        proc = start_tree(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise OutputError(f"Cannot write {target.name}: the browser did not finish within {timeout:g} s.") from None
        finally:
            end_tree(proc)
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip() and "dbus" not in ln]
            why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
            raise OutputError(f"Cannot write {target.name}: the browser failed ({why}).")
    return target


def render_pdf(html_path: str | os.PathLike, pdf_path: str | os.PathLike, timeout: float = PDF_TIMEOUT_S,
               binary: str | None = None) -> Path:
    """Print the HTML file to PDF (A4, no header or footer) with a headless Chromium; OutputError when it cannot."""
    return _chromium(Path(html_path), Path(pdf_path), ["--no-pdf-header-footer", "--print-to-pdf-no-header",
                                                       "--print-to-pdf={out}"], timeout, binary)


def render_png(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1000, height: int = 4000,
               timeout: float = PDF_TIMEOUT_S, binary: str | None = None) -> Path:
    """A screenshot of the HTML file as a browser window of ``width`` x ``height`` pixels shows it (headless
    Chromium); OutputError when it cannot."""
    return _chromium(Path(html_path), Path(png_path), [f"--window-size={int(width)},{int(height)}",
                                                       "--screenshot={out}"], timeout, binary)


def write_report(path: str | os.PathLike, case: CaseResult, *, pdf: bool = True,
                 say: Callable[[str], None] | None = None, timeout: float = PDF_TIMEOUT_S, **kwargs: Any) -> Path:
    """Write :func:`report_html` of ``case`` to ``path`` atomically and, with ``pdf``, the same report printed to
    ``path`` with suffix .pdf by a headless Chromium (:func:`render_pdf`). Returns the HTML file.

    Without a browser, or when it fails, the HTML is the report: one line says so (to ``say``, else this
    module's logger as a warning) and an older PDF beside it, which would no longer match, is removed.
    ``kwargs``: those of :func:`report_html` (title, parameters, extra, subject, max_key_images).
    """
    path = Path(path)
    text = report_html(case, **kwargs)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    if pdf:
        target = path.with_suffix(".pdf")
        try:
            render_pdf(path, target, timeout=timeout)
        except OutputError as exc:
            stale = target.is_file()
            if stale:
                target.unlink()
            note = (f"{exc} The report is {path.name} only" + (f" (the older {target.name} was removed)."
                                                                 if stale else "."))
            (say or _log.warning)(note)
    return path
