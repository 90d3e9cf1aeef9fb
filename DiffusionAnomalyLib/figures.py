"""Figures for reports, the demo and evaluation: the report's coronal MIP and per-candidate key images, key axial
slices (input, counterfactual, heat, lesions, truth) with the classifier's per-slice confidence; FROC; methods side
by side with their metric table; sweep grids.

Colours: the Okabe-Ito palette (:data:`OKABE_ITO`) for lines and contours, perceptually uniform colour maps
for values, so the figures read the same with colour-vision deficiency. Images of a volume are shown in the
radiological convention whatever the order its voxels are stored in (:func:`display_orientation`): axial with
the patient's right on the image's left and anterior up, coronal with superior up.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .postprocessing import label_boxes
from .volume import lps_ras_flip

#: Okabe & Ito's colour-blind-safe palette: blue, orange, bluish green, reddish purple, sky blue, vermillion,
#: yellow, black (lines of several methods take them in this order).
OKABE_ITO: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
#: Paul Tol's "muted" qualitative scheme (also made for colour-vision deficiency): indigo, rose, green, wine, teal,
#: olive, sand, purple (:data:`.export.LESION_PALETTE` continues Okabe-Ito with it).
TOL_MUTED: tuple[str, ...] = ("#332288", "#CC6677", "#117733", "#882255", "#44AA99", "#999933", "#DDCC77", "#AA4499")
#: The predicted lesions and the ground truth where both are drawn: blue solid against vermillion dashed.
PREDICTED_COLOUR, TRUTH_COLOUR = OKABE_ITO[0], OKABE_ITO[5]
#: A grid whose voxel axes are further than this (degrees) from the patient axes is called oblique.
OBLIQUE_DEGREES = 0.5
#: The CT window of the figures (soft tissue: level 40 HU, width 400 HU).
CT_WINDOW_HU = (-160.0, 240.0)


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (figures are written to files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=dpi, format="png")
    _pyplot().close(fig)
    return path


def _png_bytes(fig, dpi: int) -> bytes:
    """The figure (a :class:`matplotlib.figure.Figure` of :func:`_panels`, which pyplot does not hold: nothing to
    close) as PNG bytes (fast zlib level: the report embeds them as base64)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png", pil_kwargs={"compress_level": 3})
    return buffer.getvalue()


# ---- radiological display ------------------------------------------------------------------------
@dataclass(frozen=True)
class DisplayOrientation:
    """How a ``[k, j, i]`` array of one grid is turned for display: the display array is ``[S, P, L]`` (axis 0 from
    inferior to superior, axis 1 from anterior to posterior, axis 2 from the patient's right to left), on the
    nearest patient axes, without resampling.

    An axial display slice ``d[s]`` drawn with row 0 at the top then has anterior up and the patient's right on
    the image's left (radiological convention); a coronal image ``d[:, p]`` or MIP ``d.max(axis=1)`` drawn with
    row 0 at the bottom has superior up.
    """

    order: tuple[int, int, int]  # display axis t is stored axis order[t] (numpy axes of [k, j, i])
    flip: tuple[bool, bool, bool]  # display axis t runs backwards through its stored axis
    spacing: tuple[float, float, float]  # mm along the display axes (S, P, L)
    stored: str  # where i, j, k point (ITK's code, e.g. "LPS": i to the patient's left, j posterior, k superior)
    oblique_degrees: float  # the largest angle between a voxel axis and its nearest patient axis

    @property
    def oblique(self) -> bool:
        return self.oblique_degrees > OBLIQUE_DEGREES

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The display array ``[S, P, L]`` of a ``[k, j, i]`` array (a view: no copy)."""
        turned = np.transpose(np.asarray(array), self.order)
        return turned[tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)]

    def index(self, kji: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
        """The display index (s, p, l) of the stored voxel ``kji`` of an array of stored ``shape`` ``[k, j, i]``."""
        out = []
        for t in range(3):
            a = self.order[t]
            v = int(kji[a])
            out.append(int(shape[a]) - 1 - v if self.flip[t] else v)
        return out[0], out[1], out[2]

    def stored_index(self, display: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
        """The stored index ``[k, j, i]`` of the display voxel ``display`` (s, p, l) of an array of stored ``shape``."""
        kji = [0, 0, 0]
        for t in range(3):
            a = self.order[t]
            kji[a] = int(shape[a]) - 1 - int(display[t]) if self.flip[t] else int(display[t])
        return kji[0], kji[1], kji[2]

    def words(self) -> str:
        """One sentence: how the voxels are stored and how they are shown."""
        names = {"R": "right", "L": "left", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}
        stored = ", ".join(f"{axis} towards {names[code]}" for axis, code in zip("ijk", self.stored))
        text = (f"Voxels stored {self.stored} ({stored}); shown in the radiological convention (axial: patient "
                f"right on the image's left, anterior up; coronal: superior up)")
        if self.oblique:
            text += (f". The grid is oblique (up to {self.oblique_degrees:.1f} degrees from the patient axes): "
                     f"images are drawn on the nearest patient axes without resampling")
        return text + "."


def display_orientation(ijk_to_ras: np.ndarray) -> DisplayOrientation:
    """The :class:`DisplayOrientation` of a grid from its IJK->RAS matrix: the permutation and flips SimpleITK's
    ``DICOMOrientImageFilter`` chooses to bring the voxel axes onto the nearest patient axes (LPS, i.e. ``[S, P,
    L]`` for a ``[k, j, i]`` array), asked of a one-voxel image with this grid's directions."""
    import SimpleITK as sitk

    lps = lps_ras_flip(np.asarray(ijk_to_ras, dtype=np.float64))[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if not np.all(spacing > 0) or abs(np.linalg.det(lps)) < 1e-12:
        raise ValueError("the image grid is degenerate (a zero spacing or collinear axes); it cannot be shown.")
    direction = lps / spacing
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetDirection([float(v) for v in direction.ravel()])
    orient = sitk.DICOMOrientImageFilter()
    orient.SetDesiredCoordinateOrientation("LPS")
    orient.Execute(image)
    permute, flips = orient.GetPermuteOrder(), orient.GetFlipAxes()
    # ITK axes (i, j, k) are numpy axes (2, 1, 0): display numpy axis t is ITK output axis 2 - t
    order = tuple(2 - int(permute[2 - t]) for t in range(3))
    flip = tuple(bool(flips[2 - t]) for t in range(3))
    spacing_kji = spacing[::-1]
    oblique = float(np.degrees(np.arccos(np.clip(np.abs(direction).max(axis=0), -1.0, 1.0))).max())
    return DisplayOrientation(order=order, flip=flip, spacing=tuple(float(spacing_kji[a]) for a in order),
                              stored=sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
                                  [float(v) for v in direction.ravel()]),
                              oblique_degrees=oblique)


def display_window(voxels: np.ndarray, ct: bool = False) -> tuple[float, float, str]:
    """(low, high, colour map) an image is shown with: CT in the soft-tissue window :data:`CT_WINDOW_HU` in grey;
    anything else (PET) in inverted grey from 0 to the 99.5th percentile (of every other voxel along each axis:
    give the display array, :meth:`DisplayOrientation.apply`, so any storage order gives the same window)."""
    if ct:
        return CT_WINDOW_HU[0], CT_WINDOW_HU[1], "gray"
    sample = np.asarray(voxels)[::2, ::2, ::2]
    high = float(np.percentile(sample, 99.5)) if sample.size else 1.0
    return 0.0, high if high > 0 else 1.0, "gray_r"


def _markers(ax, top: str, bottom: str, left: str = "R", right: str = "L") -> None:
    """Orientation letters at the middle of each edge of an image axes."""
    style = {"fontsize": 8, "fontweight": "bold", "color": "white",
             "bbox": {"boxstyle": "round,pad=0.15", "facecolor": "0.25", "edgecolor": "none", "alpha": 0.75}}
    for text, x, y, ha, va in ((top, 0.5, 0.985, "center", "top"), (bottom, 0.5, 0.015, "center", "bottom"),
                               (left, 0.015, 0.5, "left", "center"), (right, 0.985, 0.5, "right", "center")):
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, **style)


def _outlined(width: float):
    """Path effects drawing a line or text over a thin dark outline, so any colour reads on light and dark."""
    from matplotlib import patheffects

    return [patheffects.Stroke(linewidth=width, foreground="0.1"), patheffects.Normal()]


def _contour_box(ax, mask: np.ndarray, origin: tuple[int, int], colour, width: float, style: str = "solid") -> None:
    """The outline of a boolean 2-D ``mask`` whose element [0, 0] is image pixel ``origin`` (row, column)."""
    padded = np.pad(mask, 1)
    rows = np.arange(padded.shape[0]) + origin[0] - 1
    cols = np.arange(padded.shape[1]) + origin[1] - 1
    ax.contour(cols, rows, padded.astype(np.float32), levels=[0.5], colors=[colour], linewidths=width,
               linestyles=style).set_path_effects(_outlined(width + 1.4))


#: Figure layout in inches: colour bar width, room for its ticks and label, gap between panels, margins.
_BAR_IN, _BAR_TEXT_IN, _GAP_IN, _TOP_IN, _EDGE_IN = 0.12, 0.78, 0.14, 0.24, 0.06


def _panels(widths: Sequence[float], height: float, bars: Sequence[bool], dpi: int):
    """A figure of image panels side by side (``widths`` in inches, one ``height``), each followed by a colour
    bar axes where ``bars`` says so; placed by hand, which renders twice as fast as a layout engine.
    Returns (figure, panel axes, colour-bar axes or None per panel)."""
    from matplotlib.figure import Figure

    total = 2 * _EDGE_IN + sum(widths) + sum(_BAR_IN + _BAR_TEXT_IN for b in bars if b) + _GAP_IN * (len(widths) - 1)
    full = height + _TOP_IN + _EDGE_IN
    fig = Figure(figsize=(total, full), dpi=dpi)
    axes, caxes, x = [], [], _EDGE_IN
    for width, bar in zip(widths, bars):
        axes.append(fig.add_axes((x / total, _EDGE_IN / full, width / total, height / full)))
        x += width
        if bar:
            caxes.append(fig.add_axes(((x + 0.05) / total, (_EDGE_IN + 0.1 * height) / full, _BAR_IN / total,
                                       0.8 * height / full)))
            x += _BAR_IN + _BAR_TEXT_IN
        else:
            caxes.append(None)
        x += _GAP_IN
    for ax in axes:  # no ticks, no labels: the axis is not drawn at all (the frame is), the same picture faster
        ax.xaxis.set_visible(False)
        ax.yaxis.set_visible(False)
    return fig, axes, caxes


def _fit(height_mm: float, width_mm: float, height: float, width: float) -> tuple[float, float]:
    """(width, height) in inches of a panel showing ``height_mm`` x ``width_mm`` at its true aspect, as large as fits
    in ``width`` x ``height`` inches."""
    scale = min(height / height_mm, width / width_mm)
    return width_mm * scale, height_mm * scale


class CaseFigures:
    """The report's figures of one case, drawn radiologically (:class:`DisplayOrientation`) from one turn of its
    arrays: a coronal overview (:meth:`coronal`: the image's MIP, or a CT's coronal slice, and the heat map's MIP)
    with every candidate, and one axial key image per candidate through its hottest voxel, each candidate outlined
    and numbered in its own colour.

    ``image``, ``heat``: Volumes on one grid; ``labels``: ``[k, j, i]`` lesion labels on it; ``colours``: label value
    -> RGB (the Slicer segments' colours); ``cut_off``: the applied threshold in heat-map units (marked on the heat
    map's colour bar); ``image_units``, ``heat_units``: the colour bars' units; ``ct``: the image is a CT (shown in
    a soft-tissue window, :func:`display_window`); ``zoom_mm``: the field of view of the key images' zoomed panel.
    """

    def __init__(self, image, heat, labels: np.ndarray, colours: dict[int, Sequence[float]],
                 cut_off: float | None = None, image_units: str = "", heat_units: str = "", ct: bool = False,
                 zoom_mm: float = 80.0, dpi: int = 96) -> None:
        self.orientation = display_orientation(image.ijk_to_ras)
        o = self.orientation
        self.stored_shape = tuple(image.voxels.shape[:3])
        self.ijk_to_ras, self.ct = np.asarray(image.ijk_to_ras, dtype=np.float64), bool(ct)
        self.image, self.heat, self.labels = o.apply(image.voxels), o.apply(heat.voxels), o.apply(labels)
        self.low, self.high, self.cmap = display_window(self.image, ct)  # display order: same for any storage
        self.zoom_mm = float(zoom_mm)
        top = float(np.max(heat.voxels)) if heat.voxels.size else 0.0
        self.heat_high = top if top > 0 else 1.0
        self.colours = {int(k): tuple(float(c) for c in v) for k, v in colours.items()}
        self.cut_off, self.image_units, self.heat_units, self.dpi = cut_off, image_units, heat_units, dpi
        self.boxes = {n + 1: box for n, box in enumerate(label_boxes(self.labels)) if box is not None}

    # -- helpers ---------------------------------------------------------------------------------
    def _colour_bar(self, fig, cax, mappable, label: str, cut_off: float | None = None) -> None:
        bar = fig.colorbar(mappable, cax=cax)
        bar.ax.tick_params(labelsize=7)
        if cut_off is not None and np.isfinite(cut_off):
            bar.ax.axhline(cut_off, color=OKABE_ITO[4], linewidth=2.5)
        bar.set_label(label, fontsize=7)

    def _label_text(self, ax, lesion: int, x: float, y: float, size: float = 9) -> None:
        ax.text(x, y, str(lesion), color=self.colours.get(lesion, PREDICTED_COLOUR), fontsize=size,
                fontweight="bold", ha="left", va="bottom", path_effects=_outlined(2.2), clip_on=True)

    # -- coronal overview --------------------------------------------------------------------------
    def coronal(self, height: float = 4.4, width: float = 3.2, min_height: float = 2.2) -> bytes:
        """PNG: the coronal overview, superior up, patient right on the image's left: for PET the maximum-intensity
        projection (anterior to posterior) of the image, for CT (where bone would fill a projection) the coronal
        slice through candidate 1's maximum heat (the middle slice without candidates); beside it the heat map's
        MIP. Every candidate's projected outline and id in its colour on the image; colour bars in units, the
        cut-off on the heat map's. A flat field of view is letterboxed in panels ``min_height`` inches tall."""
        o = self.orientation
        if self.ct:
            p = self.hottest(min(self.boxes), "heat")[1] if self.boxes else self.image.shape[1] // 2
            picture = self.image[:, p, :]
            ras = self.ijk_to_ras @ np.array([*self.stored_index((0, p, 0))[::-1], 1.0])
            title = f"coronal slice, A {ras[1]:.0f} mm; candidates outlined"
        else:
            picture, title = self.image.max(axis=1), "image MIP, candidates outlined"  # [S, L]
        heat_mip = self.heat.max(axis=1)
        width, height = _fit(picture.shape[0] * o.spacing[0], picture.shape[1] * o.spacing[2], height, width)
        fig, axes, caxes = _panels([width, width], max(height, min_height), [True, True], self.dpi)
        aspect = o.spacing[0] / o.spacing[2]
        shown = axes[0].imshow(picture, cmap=self.cmap, vmin=self.low, vmax=self.high, origin="lower",
                               aspect=aspect, interpolation="nearest")
        for lesion, box in self.boxes.items():
            mask = (self.labels[box] == lesion).any(axis=1)
            _contour_box(axes[0], mask, (box[0].start, box[2].start), self.colours.get(lesion, PREDICTED_COLOUR), 1.3)
            self._label_text(axes[0], lesion, box[2].stop - 0.2, box[0].stop - 0.2)
        hot = axes[1].imshow(heat_mip, cmap="inferno", vmin=0.0, vmax=self.heat_high, origin="lower", aspect=aspect,
                             interpolation="nearest")
        heat_title = "heat-map MIP" + ("" if self.cut_off is None else f"; cut-off {self.cut_off:.3g} (bar's line)")
        for ax, text in zip(axes, (title, heat_title)):
            ax.set_xlim(-0.5, picture.shape[1] - 0.5)  # an outline at the edge must not widen the view
            ax.set_ylim(-0.5, picture.shape[0] - 0.5)
            ax.set_title(text, fontsize=7.5, pad=3)
            _markers(ax, "S", "I")
        self._colour_bar(fig, caxes[0], shown, self.image_units or "image")
        self._colour_bar(fig, caxes[1], hot, self.heat_units or "heat", self.cut_off)
        return _png_bytes(fig, self.dpi)

    # -- key images -------------------------------------------------------------------------------
    def hottest(self, lesion: int, values: str = "image") -> tuple[int, int, int]:
        """Display index (s, p, l) of the candidate's hottest voxel: of the image (PET: SUVmax) or the heat map
        (``values="heat"``); the first in display order on a tie."""
        box = self.boxes[lesion]
        arr = (self.image if values == "image" else self.heat)[box]
        inside = self.labels[box] == lesion
        local = np.unravel_index(np.where(inside, arr, -np.inf).argmax(), inside.shape)
        return tuple(int(b.start + v) for b, v in zip(box, local))

    def stored_index(self, display: Sequence[int]) -> tuple[int, int, int]:
        """The stored voxel ``[k, j, i]`` of a display index (s, p, l)."""
        return self.orientation.stored_index(display, self.stored_shape)

    def key_image(self, lesion: int, at: tuple[int, int, int] | None = None, height: float = 2.5,
                  width: float = 3.4) -> bytes:
        """PNG: the axial slice through ``at`` (display index; None: the candidate's hottest image voxel), whole
        and zoomed to :attr:`zoom_mm` around the candidate, every candidate in the slice outlined in its colour with
        its id (this one thicker); anterior up, patient right on the image's left; the image's colour bar."""
        o, zoom_mm = self.orientation, self.zoom_mm
        s = (at if at is not None else self.hottest(lesion))[0]
        plane = self.image[s]
        box = self.boxes[lesion]
        inside = np.nonzero(self.labels[s, box[1], box[2]] == lesion)
        if not inside[0].size:
            raise ValueError(f"candidate {lesion} does not cross the axial slice asked for.")
        centre = ((box[1].start + inside[0].min() + box[1].start + inside[0].max()) / 2,
                  (box[2].start + inside[1].min() + box[2].start + inside[1].max()) / 2)
        half = (zoom_mm / 2 / o.spacing[1], zoom_mm / 2 / o.spacing[2])
        aspect = o.spacing[1] / o.spacing[2]
        whole, _ = _fit(plane.shape[0] * o.spacing[1], plane.shape[1] * o.spacing[2], height, width)
        fig, axes, caxes = _panels([whole, height], height, [False, True], self.dpi)  # a flat slice is letterboxed
        for n, ax in enumerate(axes):
            shown = ax.imshow(plane, cmap=self.cmap, vmin=self.low, vmax=self.high, aspect=aspect,
                              interpolation="nearest")
            for other, obox in self.boxes.items():
                if not obox[0].start <= s < obox[0].stop:
                    continue
                mask = self.labels[s, obox[1], obox[2]] == other
                if not mask.any():
                    continue
                colour = self.colours.get(other, PREDICTED_COLOUR)
                _contour_box(ax, mask, (obox[1].start, obox[2].start), colour, 1.8 if other == lesion else 1.0)
                rows, cols = np.nonzero(mask)
                self._label_text(ax, other, obox[2].start + cols.max() + 0.6, obox[1].start + rows.min() - 0.6,
                                 size=10 if other == lesion else 8)
            _markers(ax, "A", "P")
        axes[0].set_xlim(-0.5, plane.shape[1] - 0.5)  # an outline at the edge must not widen the view
        axes[0].set_ylim(plane.shape[0] - 0.5, -0.5)
        axes[0].set_title("axial", fontsize=8, pad=3)
        axes[1].set_xlim(centre[1] - half[1], centre[1] + half[1])
        axes[1].set_ylim(centre[0] + half[0], centre[0] - half[0])
        axes[1].set_title(f"{zoom_mm:g} mm around candidate {lesion}", fontsize=8, pad=3)
        self._colour_bar(fig, caxes[1], shown, self.image_units or "image")
        return _png_bytes(fig, self.dpi)


def key_slices(labels: np.ndarray, truth: np.ndarray | None = None, count: int = 4) -> list[int]:
    """Axial slices (k) through the largest lesions (predicted, then ground truth), else evenly spaced."""
    chosen: list[int] = []
    for lab in (truth, labels):
        if lab is None:
            continue
        ids, sizes = np.unique(lab[lab > 0], return_counts=True)
        for i in ids[np.argsort(-sizes)]:
            k = int(np.round(np.mean(np.nonzero(lab == i)[0])))
            if all(abs(k - c) > 2 for c in chosen):
                chosen.append(k)
            if len(chosen) >= count:
                return sorted(chosen)
    n = labels.shape[0]
    extra = [int(v) for v in np.linspace(n * 0.2, n * 0.8, count)]
    for k in extra:
        if len(chosen) >= count:
            break
        if all(abs(k - c) > 2 for c in chosen):
            chosen.append(k)
    return sorted(chosen)


def overview_png(path: str | Path, image: np.ndarray, counterfactual: np.ndarray | None, heat: np.ndarray,
                 labels: np.ndarray, truth: np.ndarray | None = None, slices: list[int] | None = None,
                 title: str = "", vmax: float | None = None, aspect: float = 1.0,
                 confidence: np.ndarray | None = None, confidence_unhealthy: np.ndarray | None = None,
                 vmin: float = 0.0, image_cmap: str = "gray_r", ijk_to_ras: np.ndarray | None = None,
                 image_units: str = "", heat_units: str = "") -> Path:
    """Write a PNG grid: one column per key slice; rows input, counterfactual, heat map, lesions (+ truth); colour
    bars for the input's and the heat map's values.

    Arrays are [k, j, i] on the same grid. With ``ijk_to_ras`` (the grid's matrix) the slices are shown in the
    radiological convention whatever the storage order (:func:`display_orientation`: axial, patient right on the
    image's left, anterior up; ``aspect`` then comes from the grid; ``slices`` are display slices, inferior to
    superior, titled with their S coordinate); without it as stored, ``aspect`` = row / column spacing.
    Predicted lesions are outlined solid in :data:`PREDICTED_COLOUR` (blue), the ground truth dashed in
    :data:`TRUTH_COLOUR` (vermillion). ``confidence``: the guidance classifier's p(unhealthy) per model slice
    (inferior to superior; NaN where not computed), drawn as a curve in a panel below; ``confidence_unhealthy``
    (bool per model slice) marks the slices the ground truth calls unhealthy. ``vmin``..``vmax`` and
    ``image_cmap``: how the input and counterfactual are shown (PET: inverted grey from 0; CT: grey in a window);
    ``image_units``, ``heat_units``: the colour bars' labels.
    """
    plt = _pyplot()
    names = {"image": image, "counterfactual": counterfactual, "heat": heat, "labels": labels, "truth": truth}
    orientation = None if ijk_to_ras is None else display_orientation(ijk_to_ras)
    stored_shape = np.shape(image)
    if orientation is not None:
        names = {k: None if v is None else orientation.apply(v) for k, v in names.items()}
        aspect = orientation.spacing[1] / orientation.spacing[2]

    image, counterfactual, heat, labels, truth = (names[k] for k in ("image", "counterfactual", "heat", "labels",
                                                                      "truth"))
    slices = slices or key_slices(labels, truth)
    vmax = vmax or float(np.percentile(image, 99.5)) or 1.0
    hmax = float(heat.max()) or 1.0
    rows = [("input", image, image_cmap, vmin, vmax)]
    if counterfactual is not None:
        rows.append(("counterfactual", counterfactual, image_cmap, vmin, vmax))
    rows.append(("heat map", heat, "inferno", 0, hmax))
    rows.append(("lesions (blue) / truth (vermillion, dashed)" if truth is not None else "lesions (blue)", image,
                 image_cmap, vmin, vmax))
    extra = 0 if confidence is None else 1
    width = 2.6 * len(slices) + 0.9 if confidence is None else max(2.6 * len(slices) + 0.9, 5.2)
    fig = plt.figure(figsize=(width, 2.6 * len(rows) + 1.8 * extra))
    grid = fig.add_gridspec(len(rows) + extra, len(slices) + 1, height_ratios=[1.0] * len(rows) + [0.7] * extra,
                            width_ratios=[1.0] * len(slices) + [0.07])
    shown = {}
    for c, k in enumerate(slices):
        for r, (name, arr, cmap, lo, hi) in enumerate(rows):
            ax = fig.add_subplot(grid[r, c])
            shown[r] = ax.imshow(arr[k], cmap=cmap, vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            if r == len(rows) - 1:
                if labels[k].any():
                    ax.contour(labels[k] > 0, levels=[0.5], colors=[PREDICTED_COLOUR], linewidths=1.6)
                if truth is not None and truth[k].any():
                    ax.contour(truth[k] > 0, levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.4,
                               linestyles="dashed")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
                if orientation is not None:
                    _markers(ax, "A", "P")
            if r == 0:
                if orientation is None:
                    ax.set_title(f"slice k={k}", fontsize=8)
                else:  # the S coordinate of the display slice, at the grid's centre
                    centre = [n // 2 for n in stored_shape]
                    kji = orientation.stored_index((k, centre[orientation.order[1]], centre[orientation.order[2]]),
                                                   stored_shape)
                    s_mm = float((np.asarray(ijk_to_ras, dtype=np.float64) @ [kji[2], kji[1], kji[0], 1.0])[2])
                    ax.set_title(f"axial S {s_mm:.0f} mm", fontsize=8)
    for r, label in ((0, image_units or "input"), (len(rows) - 2, heat_units or "heat")):
        bar = fig.colorbar(shown[r], cax=fig.add_subplot(grid[r, len(slices)]))
        bar.ax.tick_params(labelsize=7)
        bar.set_label(label, fontsize=7)
    if confidence is not None:
        _confidence_panel(fig.add_subplot(grid[len(rows), :len(slices)]), confidence, confidence_unhealthy)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=90)


def _confidence_panel(ax, confidence: np.ndarray, unhealthy: np.ndarray | None) -> None:
    """p(unhealthy) against model slice; truth-unhealthy slices shaded (vermillion), the 0.5 line dashed."""
    p = np.asarray(confidence, dtype=np.float64).ravel()
    position = np.arange(p.size)
    if unhealthy is not None:
        marked = np.asarray(unhealthy, dtype=bool).ravel()
        for k in np.flatnonzero(marked):
            ax.axvspan(k - 0.5, k + 0.5, color=OKABE_ITO[5], alpha=0.25, linewidth=0)
        ax.plot([], [], color=OKABE_ITO[5], alpha=0.4, linewidth=6, label="unhealthy (ground truth)")
    ax.plot(position, p, color=OKABE_ITO[0], marker=".", markersize=3, linewidth=1.2, label="p(unhealthy)")
    ax.axhline(0.5, color="0.4", linestyle="--", linewidth=0.8)
    ax.set_xlim(-0.5, max(p.size - 0.5, 0.5))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("model slice (inferior to superior)", fontsize=8)
    ax.set_ylabel("classifier\np(unhealthy)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)


def froc_png(path: str | Path, curves: list[dict], title: str = "", max_fp: float = 8.0) -> Path:
    """Write a FROC figure: lesion sensitivity against false candidates per volume, one line per curve.

    The dots are the thresholds themselves; they need not be monotonic (at IoU >= 0.2 a lower threshold
    can merge or grow candidates past a lesion). The line is their upper-left envelope: the best
    sensitivity some threshold reaches with at most x false candidates per volume.
    ``curves``: dicts with ``label``, ``fp`` and ``sensitivity`` (the points, in threshold order),
    ``operating_point`` (fp, sensitivity; a large circle), and optionally ``group`` (curves of one
    group, e.g. one method with and without an organ exclusion, share a colour of :data:`OKABE_ITO`,
    groups in order of appearance) and ``excluded`` (solid line, else dashed). The x axis runs from
    0 to ``max_fp``; an operating point beyond it is drawn as an arrow at the edge with its value.
    ``ci`` (optional): {"fp", "low", "high"}, a confidence interval of the sensitivity at those false
    candidate counts, drawn as vertical bars.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.4 + 0.15 * max(len(curves) - 4, 0)))
    off_axis = 0
    groups: list = []
    for n, curve in enumerate(curves):
        group = curve.get("group", n)
        if group not in groups:
            groups.append(group)
        colour = OKABE_ITO[groups.index(group) % len(OKABE_ITO)]
        fp_points, sens_points = np.asarray(curve["fp"], float), np.asarray(curve["sensitivity"], float)
        order = np.argsort(fp_points, kind="stable")
        ax.plot(fp_points, sens_points, linestyle="none", marker=".", markersize=4, color=colour, alpha=0.4)
        envelope_x = np.append(fp_points[order], max(max_fp, fp_points.max(initial=0.0)))
        envelope_y = np.maximum.accumulate(sens_points[order])
        if envelope_y.size:
            ax.plot(envelope_x, np.append(envelope_y, envelope_y[-1:]), "-" if curve.get("excluded") else "--",
                    drawstyle="steps-post", color=colour, label=curve["label"])
        if curve.get("ci"):  # bootstrap interval of the sensitivity read at a few false-candidate counts
            ci = curve["ci"]
            x, lo, hi = (np.asarray(ci[k], float) for k in ("fp", "low", "high"))
            ok = np.isfinite(lo) & np.isfinite(hi) & (x <= max_fp)
            ax.vlines(x[ok], lo[ok], hi[ok], color=colour, linewidth=2.0, alpha=0.6)
            ax.plot(np.r_[x[ok], x[ok]], np.r_[lo[ok], hi[ok]], linestyle="none", marker="_", markersize=8,
                    color=colour, alpha=0.8)
        fp, sens = curve["operating_point"]
        if fp <= max_fp:
            ax.plot([fp], [sens], marker="o", markersize=9, markerfacecolor="none", markeredgewidth=1.8,
                    color=colour, linestyle="none")
        else:  # off the axis: an arrow at the edge, with the number
            ax.plot([max_fp], [sens], marker=">", markersize=9, color=colour, linestyle="none", clip_on=False)
            ax.annotate(f"{fp:.1f}", (max_fp, sens), textcoords="offset points", xytext=(-8, 6 + 9 * off_axis),
                        ha="right", fontsize=7, color=colour)
            off_axis += 1
    ax.plot([], [], marker="o", markersize=8, markerfacecolor="none", color="gray", linestyle="none",
            label="default operating point")
    ax.set_xlim(0, max_fp)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false candidates per volume")
    ax.set_ylabel("lesion sensitivity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi=100)



def comparison_png(path: str | Path, images: np.ndarray, truths: np.ndarray, maps: dict[str, np.ndarray],
                   header: Sequence[str], rows: Sequence[Sequence[str]], slice_names: Sequence[str] = (),
                   title: str = "", aspect: float = 1.0) -> Path:
    """Write the methods side by side: one row per slice (input, ground truth, then each method's map)
    and their metric table below.

    ``images``, ``truths`` (bool) and each of ``maps`` (label -> array): (S, H, W), the same S slices;
    each map is shown from 0 to its own maximum over the S slices (the methods' maps have other units),
    with the ground truth's outline dashed on it. ``header`` and ``rows``: the table's cells as text.
    """
    plt = _pyplot()
    images, truths = np.asarray(images), np.asarray(truths, dtype=bool)
    n_slices, columns = len(images), 2 + len(maps)
    table_height = 0.35 * (len(rows) + 1) + 0.6
    fig = plt.figure(figsize=(max(1.9 * columns, 0.55 * len(header) + 1.0), 1.9 * max(n_slices, 1) + table_height))
    grid = fig.add_gridspec(max(n_slices, 1) + 1, columns,
                            height_ratios=[1.9] * max(n_slices, 1) + [table_height])
    vmax = float(np.percentile(images, 99.5)) if images.size else 1.0
    tops = {label: float(np.max(m)) if np.size(m) and np.max(m) > 0 else 1.0 for label, m in maps.items()}
    for r in range(n_slices):
        panels = [("input", images[r], "gray_r", vmax), ("ground truth", images[r], "gray_r", vmax)]
        panels += [(label, m[r], "inferno", tops[label]) for label, m in maps.items()]
        for c, (label, arr, cmap, hi) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(arr, cmap=cmap, vmin=0, vmax=hi or 1.0, aspect=aspect, interpolation="nearest")
            if c >= 1 and truths[r].any():
                colour = OKABE_ITO[5] if c == 1 else OKABE_ITO[4]
                ax.contour(truths[r], levels=[0.5], colors=colour, linewidths=1.0 if c == 1 else 0.7,
                           linestyles="solid" if c == 1 else "dashed")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=8)
            if c == 0 and r < len(slice_names):
                ax.set_ylabel(slice_names[r], fontsize=7)
    ax = fig.add_subplot(grid[max(n_slices, 1), :])
    ax.axis("off")
    if rows:
        table = ax.table(cellText=[list(map(str, row)) for row in rows], colLabels=list(header), loc="center",
                         cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        table.auto_set_column_width(list(range(len(header))))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=90)


def sweep_png(path: str | Path, noise_levels: Sequence[float], guidance_values: Sequence[float],
              panels: dict[str, np.ndarray], noise_label: str = "noise level", guidance_label: str = "guidance",
              title: str = "") -> Path:
    """Write a sweep's grids as heat maps, one panel per metric (as the papers' hyperparameter figures).

    ``panels``: metric name -> array (len(noise_levels), len(guidance_values)), NaN for no value;
    each cell carries its value, the best (highest) is outlined.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(max(3.2, 0.8 * len(guidance_values) + 1.8) * len(panels),
                                      max(2.8, 0.5 * len(noise_levels) + 1.6)))
    for ax, (name, values) in zip(axes[0], panels.items()):
        values = np.asarray(values, dtype=np.float64)
        shown = np.ma.masked_invalid(values)
        image = ax.imshow(shown, cmap="viridis", origin="lower", aspect="auto", vmin=np.nanmin(values)
                          if np.isfinite(values).any() else 0.0, vmax=np.nanmax(values) if np.isfinite(values).any()
                          else 1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for (r, c), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if v < np.nanmean(values) else "black")
        if np.isfinite(values).any():
            r, c = np.unravel_index(np.nanargmax(values), values.shape)
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=OKABE_ITO[5], linewidth=2))
        ax.set_xticks(range(len(guidance_values)), [f"{g:g}" for g in guidance_values], fontsize=7)
        ax.set_yticks(range(len(noise_levels)), [f"{d:g}" for d in noise_levels], fontsize=7)
        ax.set_xlabel(guidance_label, fontsize=8)
        ax.set_ylabel(noise_label, fontsize=8)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=100)
