"""Figures for reports, the demo and evaluation: the report's coronal MIP and per-candidate key images, key axial
slices (input, counterfactual, heat, lesions, truth) with the classifier's per-slice confidence; FROC; methods side
by side with their metric table; sweep grids.

Colours: the Okabe-Ito palette (:data:`OKABE_ITO`) for lines and contours, perceptually uniform colour maps
for values, so the figures read the same with colour-vision deficiency. Images of a volume are shown in the
radiological convention whatever the order its voxels are stored in (:func:`display_orientation`): axial with
the patient's right on the image's left and anterior up, coronal with superior up.

The report's figures (:class:`CaseFigures`) are drawn with numpy and Pillow, without matplotlib: the report is
rewritten at every threshold change, and matplotlib's import alone would cost 0.27 s. The other figures use
matplotlib.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage

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


# ---- the report's figures, drawn with numpy and Pillow ------------------------------------------------------
# The report is rewritten at every threshold change: matplotlib would cost 0.27 s to import and ~0.06 s a figure,
# so the report's figures are drawn directly: numpy for the pixels and outlines, Pillow for lines and text.

#: The background, and the dark line under coloured outlines and numbers (so any colour reads on light and dark).
_WHITE, _DARK = (255, 255, 255), (26, 26, 26)
#: Layout in inches (times the dpi: pixels): margins, gap between panels, colour bar width and its gap to its panel.
_EDGE_IN, _GAP_IN, _BAR_IN, _BAR_GAP_IN = 0.06, 0.14, 0.12, 0.05
#: The inferno colour table's file in the package (see :func:`inferno_rgb`).
INFERNO_TABLE = "resources/inferno.csv"


@functools.lru_cache(maxsize=None)
def inferno_rgb() -> np.ndarray:
    """matplotlib's inferno colour map as 256 x 3 uint8 (read-only), read from :data:`INFERNO_TABLE`, so the report's
    figures and the Slicer module's fallback colour table need no matplotlib. The file was written once by::

        python -c "import numpy as np, matplotlib; np.savetxt('DiffusionAnomalyLib/resources/inferno.csv',
            matplotlib.colormaps['inferno'](np.linspace(0, 1, 256), bytes=True)[:, :3], fmt='%d', delimiter=',',
            header='# <where it comes from>\\nred,green,blue', comments='')"

    and a test checks that it still equals matplotlib's."""
    text = (resources.files(__package__) / INFERNO_TABLE).read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.strip() and not line.startswith("#")][1:]  # after the header
    table = np.loadtxt(rows, delimiter=",", dtype=np.uint8, ndmin=2)
    if table.shape != (256, 3):
        raise ValueError(f"{INFERNO_TABLE} holds {table.shape[0]} x {table.shape[1]} values, not 256 x 3.")
    table.setflags(write=False)
    return table


def _colour_table(name: str) -> np.ndarray:
    """256 x 3 uint8 colours of a colour map the report's figures use: "gray", "gray_r" or "inferno"."""
    if name == "inferno":
        return inferno_rgb()
    if name not in ("gray", "gray_r"):
        raise ValueError(f"no colour table {name!r}.")
    ramp = np.arange(256, dtype=np.uint8)
    return np.repeat((ramp[::-1] if name == "gray_r" else ramp)[:, None], 3, axis=1)


def _colour_index(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The entry (uint8) of a 256-colour table of each of ``values`` shown from ``low`` to ``high``, clipped, NaN as
    ``low``: matplotlib's quantisation of a colour map, hand-written because its Normalize would cost its import."""
    scaled = (np.asarray(values, dtype=np.float64) - low) * (256.0 / (high - low))
    np.nan_to_num(scaled, copy=False, nan=0.0)
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _font(pixels: int):
    """Pillow's bundled scalable font (FreeType, Pillow >= 10.1) ``pixels`` tall: no font file to find, the same
    glyphs on every machine."""
    from PIL import ImageFont

    return ImageFont.load_default(size=pixels)


def _nice_ticks(low: float, high: float, most: int = 8) -> tuple[list[float], int]:
    """Colour-bar ticks: the multiples inside ``low``..``high`` of the smallest step 1, 2, 2.5 or 5 x 10^k that gives
    at most ``most`` of them, and how many decimals write them; hand-written because matplotlib's locator would cost
    its 0.27 s import."""
    low, high = float(low), float(high)
    span = high - low
    if not (np.isfinite(span) and span > 0):
        return ([low] if np.isfinite(low) else []), 0
    exponent = int(np.floor(np.log10(span / max(most, 2))))
    for mantissa in (1.0, 2.0, 2.5, 5.0, 10.0):
        step = mantissa * 10.0 ** exponent
        first, last = int(np.ceil(low / step - 1e-9)), int(np.floor(high / step + 1e-9))
        if last - first < max(most, 2):
            break
    decimals = max(0, -exponent + (1 if mantissa == 2.5 else 0) - (1 if mantissa == 10.0 else 0))
    ticks = [round(k * step, decimals) for k in range(first, last + 1)]
    return [t for t in ticks if low <= t <= high], decimals


def _tick_text(value: float, decimals: int) -> str:
    """A tick value written with ``decimals`` decimals (no "-0")."""
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _fit_pixels(height_mm: float, width_mm: float, height: float, width: float, dpi: int) -> tuple[int, int]:
    """(width, height) in pixels of a panel showing ``height_mm`` x ``width_mm`` at its true aspect, as large as fits
    in ``width`` x ``height`` inches."""
    scale = min(height / height_mm, width / width_mm) * dpi
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


class _View:
    """Which part of a 2-D array a panel shows, at which size in pixels, nearest-neighbour; hand-written (matplotlib's
    imshow would cost its import): every voxel stays a block of whole pixels, so outlines can follow voxel edges.

    Source coordinates put voxel ``v`` between ``v`` and ``v + 1``; ``rows``/``cols`` are the spans shown;
    ``up``: source row 0 at the bottom (a coronal image, superior up). :attr:`rows`/:attr:`cols` hold the source
    index of each pixel row/column (-1: outside the array)."""

    def __init__(self, shape: Sequence[int], size: tuple[int, int], rows: tuple[float, float],
                 cols: tuple[float, float], up: bool = False) -> None:
        self.height, self.width = int(size[0]), int(size[1])
        self.row_span, self.col_span, self.up = rows, cols, up
        self.rows = self._axis(int(shape[0]), rows, self.height, up)
        self.cols = self._axis(int(shape[1]), cols, self.width, False)

    @staticmethod
    def _axis(n: int, span: tuple[float, float], pixels: int, reverse: bool) -> np.ndarray:
        start, stop = span
        centres = (np.arange(pixels) + 0.5) * ((stop - start) / pixels)
        at = np.floor(stop - centres if reverse else start + centres).astype(np.intp)
        at[(at < 0) | (at >= n)] = -1
        return at

    def x(self, col: float) -> float:
        """The pixel x of source column coordinate ``col``."""
        start, stop = self.col_span
        return (col - start) * self.width / (stop - start)

    def y(self, row: float) -> float:
        """The pixel y of source row coordinate ``row``."""
        start, stop = self.row_span
        return ((stop - row) if self.up else (row - start)) * self.height / (stop - start)

    def pixels(self, index: np.ndarray, table: np.ndarray) -> np.ndarray:
        """RGB pixels (writable) of a 2-D array of colour ``index`` (:func:`_colour_index`) in ``table``; white
        outside the array."""
        out = _repeat(_repeat(table[index], self.rows, 0), self.cols, 1)
        out[self.rows < 0] = _WHITE
        out[:, self.cols < 0] = _WHITE
        return out

    def window(self, mask: np.ndarray, origin: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
        """The pixels showing a boolean ``mask`` whose element [0, 0] is source voxel ``origin``: (pixel mask, its
        first pixel row, first pixel column); None when none of it is in view."""
        r = np.flatnonzero((self.rows >= origin[0]) & (self.rows < origin[0] + mask.shape[0]))
        c = np.flatnonzero((self.cols >= origin[1]) & (self.cols < origin[1] + mask.shape[1]))
        if not r.size or not c.size:
            return None
        # the source index is monotonic along each axis: the pixels showing the mask are one run
        sub = mask[self.rows[r[0]:r[-1] + 1] - origin[0]][:, self.cols[c[0]:c[-1] + 1] - origin[1]]
        return sub, int(r[0]), int(c[0])


def _repeat(array: np.ndarray, at: np.ndarray, axis: int) -> np.ndarray:
    """``array.take(at, axis)`` for monotonic ``at`` (-1 read as 0) as runs of repeats: several times faster."""
    at = np.maximum(at, 0)
    starts = np.flatnonzero(np.r_[True, at[1:] != at[:-1]])
    return np.repeat(array.take(at[starts], axis=axis), np.diff(np.r_[starts, at.size]), axis=axis)


def _png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array, every row "Up"-filtered, zlib level 3: hand-written because Pillow tries five
    filters on every row (three times slower here), and voxels drawn as blocks repeat rows, which Up makes zeros."""
    h, w = rgb.shape[:2]
    flat = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), np.uint8)
    raw[:, 0] = 2  # the filter of each row: Up (each byte minus the one above it)
    raw[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=raw[1:, 1:])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, not interlaced
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 3))
            + chunk(b"IEND", b""))


def _outline(canvas: np.ndarray, window: tuple[np.ndarray, int, int] | None, colour: tuple[int, int, int],
             radius: int) -> None:
    """Outline on ``canvas`` (a panel's RGB pixels) the True pixels of ``window`` (:meth:`_View.window`): ``2 *
    radius`` pixels of ``colour`` straddling the voxel edges between one dark pixel on each side; hand-written,
    matplotlib's contour (smooth, between voxel centres) would cost its import. Not along the panel's edges."""
    if window is None:
        return
    mask, r0, c0 = window
    pad, (h, w) = radius + 2, canvas.shape[:2]
    top, left = max(r0 - pad, 0), max(c0 - pad, 0)
    bottom, right = min(r0 + mask.shape[0] + pad, h), min(c0 + mask.shape[1] + pad, w)
    area = np.zeros((bottom - top, right - left), np.uint8)
    area[r0 - top:r0 - top + mask.shape[0], c0 - left:c0 - left + mask.shape[1]] = mask
    part = canvas[top:bottom, left:right]
    for k, paint in ((radius + 1, _DARK), (radius, colour)):
        grown = ndimage.maximum_filter(area, size=2 * k + 1, mode="constant", cval=0)
        shrunk = ndimage.minimum_filter(area, size=2 * k + 1, mode="nearest")  # a panel's edge draws no line
        part[grown > shrunk] = paint


def _rgb(colour: Sequence[float] | str) -> tuple[int, int, int]:
    """8-bit RGB of a colour given as 0..1 floats or as "#rrggbb"."""
    if isinstance(colour, str):
        from PIL import ImageColor

        return ImageColor.getrgb(colour)[:3]
    return tuple(int(round(float(c) * 255)) for c in colour[:3])


@dataclass
class _Bar:
    """A colour bar beside a panel: its colour table, value range, units and a value marked on it (the cut-off)."""

    table: np.ndarray
    low: float
    high: float
    label: str
    mark: float | None = None


@dataclass
class _Panel:
    """One image panel of a figure: its RGB pixels (outlines drawn), title, orientation letters (top, bottom, left,
    right), numbers written on it ((text, x, y, RGB, size in points), (x, y) the left end of the baseline in the
    panel's pixels) and its colour bar."""

    pixels: np.ndarray
    title: str
    letters: tuple[str, str, str, str]
    numbers: list = field(default_factory=list)
    bar: _Bar | None = None


def _bold(draw, xy: tuple[float, float], text: str, font, fill, anchor: str, outline: int = 0) -> None:
    """``text`` in bold (a one-pixel stroke of its own colour: the bundled font has no bold face), over a dark
    outline ``outline`` pixels wide."""
    if outline:
        draw.text(xy, text, font=font, anchor=anchor, fill=_DARK, stroke_width=outline + 1, stroke_fill=_DARK)
    draw.text(xy, text, font=font, anchor=anchor, fill=fill, stroke_width=1, stroke_fill=fill)


def _compose(panels: Sequence[_Panel], row_height: int, dpi: int, title_pt: float) -> bytes:
    """PNG (:func:`_png`) of image panels side by side, each centred in a row
    ``row_height`` pixels tall (a flat one is letterboxed) and framed, titles above, colour bars with ticks and
    units beside; laid out by hand."""
    from PIL import Image, ImageDraw

    pt = dpi / 72.0  # pixels per point

    def px(inches: float) -> int:
        return max(1, round(inches * dpi))

    edge, gap, bar_w, bar_gap = px(_EDGE_IN), px(_GAP_IN), px(_BAR_IN), px(_BAR_GAP_IN)
    line, tick, pad = max(1, round(0.8 * pt)), round(3.5 * pt), round(2 * pt)
    title_font, small = _font(round(title_pt * pt)), _font(round(8 * pt))  # Aileron reads smaller than DejaVu
    ascent, descent = title_font.getmetrics()
    top = edge + ascent + descent + round(3 * pt) + line
    small_height = sum(small.getmetrics())
    bar_height = round(0.8 * row_height)
    most_ticks = max(2, min(8, round(bar_height / (2.5 * small_height))))  # tick labels at least 2.5 lines apart

    # columns: the panel, its colour bar with the ticks' text and the units, at least as wide as the title
    ticks, columns = [], []
    for panel in panels:
        w = panel.pixels.shape[1] + 2 * line
        if panel.bar is not None:
            values, decimals = _nice_ticks(panel.bar.low, panel.bar.high, most_ticks)
            texts = [_tick_text(v, decimals) for v in values]
            ticks.append((values, texts))
            w += bar_gap + bar_w + 2 * line + tick + pad + max((small.getlength(t) for t in texts), default=0)
            w += 2 * pad + small_height
        else:
            ticks.append(None)
        columns.append(max(round(w), round(title_font.getlength(panel.title))))
    width = 2 * edge + sum(columns) + gap * (len(panels) - 1)
    height = top + row_height + line + edge
    canvas = np.full((height, width, 3), 255, np.uint8)
    places, x = [], edge
    for panel, column in zip(panels, columns):
        h, w = panel.pixels.shape[:2]
        x0 = x + line + (0 if panel.bar is not None else (column - w - 2 * line) // 2)  # centred under a long title
        y0 = top + (row_height - h) // 2
        canvas[y0:y0 + h, x0:x0 + w] = panel.pixels
        places.append((x0, y0, x, column))
        if panel.bar is not None:  # the colour ramp, high at the top
            bx, by = x0 + w + line + bar_gap + line, top + (row_height - bar_height) // 2
            b = panel.bar
            values = b.high - (np.arange(bar_height) + 0.5) * ((b.high - b.low) / bar_height)
            canvas[by:by + bar_height, bx:bx + bar_w] = b.table[_colour_index(values, b.low, b.high)][:, None]
        x += column + gap

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image, "RGBA")  # RGBA fills blend (the letters' boxes)
    letter_font = _font(round(8.5 * pt))
    for panel, (x0, y0, x, column), tick_set in zip(panels, places, ticks):
        h, w = panel.pixels.shape[:2]
        draw.rectangle((x0 - line, y0 - line, x0 + w + line - 1, y0 + h + line - 1), outline=(0, 0, 0), width=line)
        for text, nx, ny, colour, size in panel.numbers:  # ids: moved inside the panel if they would stick out
            font, outline = _font(round(size * pt)), max(1, round(0.6 * pt))
            l, t, r, bt = draw.textbbox((x0 + nx, y0 + ny), text, font=font, anchor="ls", stroke_width=outline + 1)
            dx = max(x0 - l, 0) - max(r - (x0 + w), 0)
            dy = max(y0 - t, 0) - max(bt - (y0 + h), 0)
            _bold(draw, (x0 + nx + dx, y0 + ny + dy), text, font, colour, "ls", outline)
        inset, box_pad = max(2, round(0.015 * min(w, h))), round(0.3 * 8.5 * pt)
        for letter, where in zip(panel.letters, ("top", "bottom", "left", "right")):
            l, t, r, bt = draw.textbbox((0, 0), letter, font=letter_font, anchor="ls")
            bw, bh = r - l + 2 * box_pad, bt - t + 2 * box_pad
            bx = {"left": x0 + inset, "right": x0 + w - inset - bw}.get(where, x0 + (w - bw) // 2)
            by = {"top": y0 + inset, "bottom": y0 + h - inset - bh}.get(where, y0 + (h - bh) // 2)
            draw.rounded_rectangle((bx, by, bx + bw - 1, by + bh - 1), radius=box_pad, fill=(51, 51, 51, 204))
            _bold(draw, (bx + box_pad - l, by + box_pad - t), letter, letter_font, _WHITE, "ls")
        tw = title_font.getlength(panel.title)
        tx = min(max(x0 + w / 2, x + tw / 2), x + column - tw / 2)  # over the panel, inside its column
        draw.text((tx, y0 - line - round(3 * pt)), panel.title, font=title_font, fill=(0, 0, 0), anchor="md")
        if panel.bar is None:
            continue
        b, (values, texts) = panel.bar, tick_set
        bx, by = x0 + w + line + bar_gap + line, top + (row_height - bar_height) // 2
        draw.rectangle((bx - line, by - line, bx + bar_w + line - 1, by + bar_height + line - 1), outline=(0, 0, 0),
                       width=line)

        def level(v: float) -> float:
            return by + (b.high - v) / (b.high - b.low) * (bar_height - 1)

        right = bx + bar_w + line
        for v, text in zip(values, texts):
            y = round(level(v))
            draw.line((right, y, right + tick - 1, y), fill=(0, 0, 0), width=line)
            draw.text((right + tick + pad, y), text, font=small, fill=(0, 0, 0), anchor="lm")
        if b.mark is not None and np.isfinite(b.mark) and b.low <= b.mark <= b.high:
            y = round(level(b.mark))
            draw.line((bx - line, y, bx + bar_w + line - 1, y), fill=_rgb(OKABE_ITO[4]), width=round(2.5 * pt))
        label_x = right + tick + pad + round(max((small.getlength(t) for t in texts), default=0)) + 2 * pad
        _upwards(image, label_x, by + bar_height // 2, b.label, small)
    return _png(np.asarray(image))


def _upwards(image, x: int, y_centre: int, text: str, font) -> None:
    """``text`` reading upwards (a colour bar's units), its top at ``x``, centred on ``y_centre``; Pillow writes
    horizontally only, so it is drawn on a tile and turned."""
    from PIL import Image, ImageDraw

    ascent, descent = font.getmetrics()
    tile = Image.new("L", (max(1, round(font.getlength(text))), ascent + descent))
    ImageDraw.Draw(tile).text((0, 0), text, font=font, fill=255)
    tile = tile.transpose(Image.Transpose.ROTATE_90)
    y = y_centre - tile.height // 2
    image.paste((0, 0, 0), (x, y, x + tile.width, y + tile.height), tile)


class CaseFigures:
    """The report's figures of one case, drawn radiologically (:class:`DisplayOrientation`) from one turn of its
    arrays: a coronal overview (:meth:`coronal`: the image's MIP, or a CT's coronal slice, and the heat map's MIP)
    with every candidate, and one axial key image per candidate through its hottest voxel, each candidate outlined
    and numbered in its own colour. Drawn with numpy and Pillow (no matplotlib: the report is rewritten at every
    threshold change), ``dpi`` pixels per inch, voxels as blocks of pixels (nearest neighbour).

    ``image``, ``heat``: Volumes on one grid; ``labels``: ``[k, j, i]`` lesion labels on it; ``colours``: label value
    -> RGB (the Slicer segments' colours); ``cut_off``: the applied threshold in heat-map units (marked on the heat
    map's colour bar); ``image_units``, ``heat_units``: the colour bars' units; ``ct``: the image is a CT (shown in
    a soft-tissue window, :func:`display_window`); ``zoom_mm``: the field of view of the key images' zoomed panel.
    """

    def __init__(self, image, heat, labels: np.ndarray, colours: dict[int, Sequence[float]],
                 cut_off: float | None = None, image_units: str = "", heat_units: str = "", ct: bool = False,
                 zoom_mm: float = 80.0, dpi: int = 192) -> None:
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
        self.cut_off, self.image_units, self.heat_units, self.dpi = cut_off, image_units, heat_units, int(dpi)
        self.boxes = {n + 1: box for n, box in enumerate(label_boxes(self.labels)) if box is not None}
        #: outline half-width in pixels: about 2 px lines at 192 dpi (twice that for a key image's own candidate)
        self.line = max(1, round(self.dpi / 192))

    def _colour(self, lesion: int) -> tuple[int, int, int]:
        return _rgb(self.colours.get(lesion, PREDICTED_COLOUR))

    # -- coronal overview --------------------------------------------------------------------------
    def coronal(self, height: float = 4.4, width: float = 3.2, min_height: float = 2.2) -> bytes:
        """PNG: the coronal overview, superior up, patient right on the image's left: for PET the maximum-intensity
        projection (anterior to posterior) of the image, for CT (where bone would fill a projection) the coronal
        slice through candidate 1's maximum heat (the middle slice without candidates); beside it the heat map's
        MIP. Every candidate's projected outline and id in its colour on the image; colour bars in units, the
        cut-off on the heat map's. Panels fit in ``width`` x ``height`` inches; a flat field of view is letterboxed
        in a row ``min_height`` inches tall."""
        o = self.orientation
        if self.ct:
            p = self.hottest(min(self.boxes), "heat")[1] if self.boxes else self.image.shape[1] // 2
            picture = self.image[:, p, :]
            ras = self.ijk_to_ras @ np.array([*self.stored_index((0, p, 0))[::-1], 1.0])
            title = f"coronal slice, A {ras[1]:.0f} mm; candidates outlined"
        else:
            picture, title = self.image.max(axis=1), "image MIP, candidates outlined"  # [S, L]
        heat_mip = self.heat.max(axis=1)
        w, h = _fit_pixels(picture.shape[0] * o.spacing[0], picture.shape[1] * o.spacing[2], height, width, self.dpi)
        view = _View(picture.shape, (h, w), (0, picture.shape[0]), (0, picture.shape[1]), up=True)
        table = _colour_table(self.cmap)
        shown = view.pixels(_colour_index(picture, self.low, self.high), table)
        numbers = []
        for lesion, box in self.boxes.items():
            mask = (self.labels[box] == lesion).any(axis=1)
            colour = self._colour(lesion)
            _outline(shown, view.window(mask, (box[0].start, box[2].start)), colour, self.line)
            numbers.append((str(lesion), view.x(box[2].stop) + 1, view.y(box[0].stop) - 1, colour, 9))
        hot = view.pixels(_colour_index(heat_mip, 0.0, self.heat_high), inferno_rgb())
        heat_title = "heat-map MIP" + ("" if self.cut_off is None else f"; cut-off {self.cut_off:.3g} (bar's line)")
        panels = [_Panel(shown, title, ("S", "I", "R", "L"), numbers,
                         _Bar(table, self.low, self.high, self.image_units or "image")),
                  _Panel(hot, heat_title, ("S", "I", "R", "L"),
                         bar=_Bar(inferno_rgb(), 0.0, self.heat_high, self.heat_units or "heat", self.cut_off))]
        return _compose(panels, max(h, round(min_height * self.dpi)), self.dpi, 8.5)

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
        (fitting in ``width`` x ``height`` inches) and zoomed to :attr:`zoom_mm` around the candidate (``height``
        inches square), every candidate in the slice outlined in its colour with its id (this one thicker, its id
        bigger); anterior up, patient right on the image's left; the image's colour bar."""
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
        w, h = _fit_pixels(plane.shape[0] * o.spacing[1], plane.shape[1] * o.spacing[2], height, width, self.dpi)
        side = round(height * self.dpi)
        views = (_View(plane.shape, (h, w), (0, plane.shape[0]), (0, plane.shape[1])),
                 _View(plane.shape, (side, side), (centre[0] + 0.5 - half[0], centre[0] + 0.5 + half[0]),
                       (centre[1] + 0.5 - half[1], centre[1] + 0.5 + half[1])))
        crossing = []
        for other, obox in self.boxes.items():
            if obox[0].start <= s < obox[0].stop:
                mask = self.labels[s, obox[1], obox[2]] == other
                if mask.any():
                    crossing.append((other, obox, mask))
        crossing.sort(key=lambda item: item[0] == lesion)  # this candidate last: on top
        index, table = _colour_index(plane, self.low, self.high), _colour_table(self.cmap)
        panels = []
        for view, title in zip(views, ("axial", f"{zoom_mm:g} mm around candidate {lesion}")):
            shown, numbers = view.pixels(index, table), []
            for other, obox, mask in crossing:
                own, colour = other == lesion, self._colour(other)
                _outline(shown, view.window(mask, (obox[1].start, obox[2].start)), colour,
                         2 * self.line if own else self.line)
                rows, cols = np.nonzero(mask)
                x, y = view.x(obox[2].start + cols.max() + 1) + 2, view.y(obox[1].start + rows.min()) - 2
                if own or (0 <= x < view.width and 0 <= y < view.height):
                    numbers.append((str(other), x, y, colour, 10 if own else 8))
            panels.append(_Panel(shown, title, ("A", "P", "R", "L"), numbers))
        panels[1].bar = _Bar(table, self.low, self.high, self.image_units or "image")
        return _compose(panels, side, self.dpi, 9)


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
