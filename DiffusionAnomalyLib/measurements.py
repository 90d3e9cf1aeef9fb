"""The lesion table (no torch): its column schema, the measures of each candidate, totals and a reference region.

:func:`lesion_table` measures the candidates of a label image (:func:`.postprocessing.segment`) in the
columns of the image's modality (:func:`lesion_columns`: SUV columns, metabolic tumour volume and TLG for
PET; HU columns for CT), with the organ each lies in when an organ map is given. Every column carries its
title, unit and a one-sentence definition (:func:`definitions`), so lesions.csv, the Slicer table, the
report, the README and the console all read one schema. :func:`totals` sums the table (count, volumes,
TLG); :func:`reference_region` gives the liver's mean uptake as the background a reader compares with.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .card import shown
from .postprocessing import _as_voxels, _check_finite, _check_same_shape, bounding_box, check_label_image, voxel_volume_ml
from .roi import OrganLabels
from .volume import Volume, canonical_modality, canonical_units, is_suv

__all__ = [
    "CENTROID_COLUMNS",
    "CT_LESION_COLUMNS",
    "Column",
    "DEFAULT_MTV_RULE",
    "LESION_COLUMNS",
    "LESION_TABLE_COLUMNS",
    "MTV_MARGIN_MM",
    "MTV_RULES",
    "NO_ORGAN",
    "REFERENCE_EROSION_MM",
    "REFERENCE_ORGAN",
    "SUV_PEAK_RADIUS_MM",
    "check_mtv_rule",
    "definitions",
    "lesion_columns",
    "lesion_table",
    "reference_region",
    "totals",
]

#: Above this many kernel voxels the SUVpeak mean is computed by FFT (same result, faster).
_FFT_KERNEL_VOXELS = 343

#: Radius of the sphere of volume 1 cm^3 used for SUVpeak: (3 * 1000 / (4 pi))^(1/3) = 6.2035 mm.
SUV_PEAK_RADIUS_MM: float = (3000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)

#: How far (mm) the metabolic tumour volume may reach beyond its candidate: about two PET resolutions (FWHM
#: 4-6 mm), enough for the uptake's partial-volume rim the heat-map cut-off leaves out, not enough to run
#: along a neighbouring hot organ.
MTV_MARGIN_MM: float = 10.0
#: The MTV rule used unless another is asked for (the EANM tumour-imaging guideline's 41 % isocontour).
DEFAULT_MTV_RULE = "41pct"
_MTV_REGION = (f"connected (26 neighbours) to the candidate's SUVmax voxel, within {MTV_MARGIN_MM:g} mm of the "
               "candidate and nearer to it than to any other candidate")
#: The MTV rules by key (``--mtv-rule``): each one sentence saying which voxels make the metabolic tumour volume.
MTV_RULES: dict[str, str] = {
    "41pct": f"Voxels at or above 41 % of the candidate's SUVmax, {_MTV_REGION}; none when the SUVmax is 0 or less.",
    "suv2.5": f"Voxels at or above SUV 2.5, {_MTV_REGION}.",
}
_MTV_FRACTION = 0.41
#: Relative tolerance of the margin and of "nearer" (distances computed two ways differ in the last bits).
_TIE = 1e-9
_MTV_SUV = 2.5
_MTV_ALIASES = {"41pct": "41pct", "41%": "41pct", "suv2.5": "suv2.5", "suv>=2.5": "suv2.5"}


def _mtv_definition(rule: str) -> str:
    """The MTV column's definition under ``rule``: "Metabolic tumour volume: voxels at or above ..."."""
    return f"Metabolic tumour volume: {MTV_RULES[rule][0].lower()}{MTV_RULES[rule][1:]}"


#: The organ column's value for a candidate lying mostly outside every labelled structure (or with no organ map).
NO_ORGAN = "none"
#: The reference region's organ (TotalSegmentator name) and how far (mm) it is kept from its edge and the candidates.
REFERENCE_ORGAN = "liver"
REFERENCE_EROSION_MM: float = 10.0
#: what the reference region is, in one sentence (the report and the README show it)
REFERENCE_DEFINITION = (f"Mean (and standard deviation) of the image over the liver of the organ map, keeping only voxels "
                        f"more than {REFERENCE_EROSION_MM:g} mm from the liver's edge and from every candidate.")


@dataclass(frozen=True)
class Column:
    """One column of the lesion table: its key, the title a reader sees, its unit, its type, its definition.

    ``integer``: whole numbers; ``text``: words (the organ), neither: real numbers.
    """

    name: str
    title: str
    unit: str = ""
    integer: bool = False
    text: bool = False
    definition: str = ""

    @property
    def heading(self) -> str:
        """The title with its unit, as a table header: "SUVmax (SUVbw)", "MTV (ml)", "Lesion"."""
        return f"{self.title} ({self.unit})" if self.unit else self.title


_CENTROID_DEFINITION = ("The candidate's centroid (mean voxel position) in the scanner's patient coordinates, in mm: "
                        "R towards the patient's right, A anterior, S superior.")
_ID = Column("id", "Lesion", integer=True, definition=(
    "The candidate's number, also its Slicer segment's (Lesion n), by decreasing maximum heat (ties: larger first)."))
_ORGAN = Column("organ", "Organ", text=True, definition=(
    "The TotalSegmentator structure holding most of the candidate's voxels; "
    f"'{NO_ORGAN}' when most lie outside every labelled structure or no organ map was given."))
_VOXELS = Column("voxels", "Voxels", integer=True, definition=(
    "The candidate's voxels: connected voxels of the heat map above its cut-off, kept by the size filters."))
_VOLUME = Column("volume_ml", "Heat-map volume", "ml", definition=(
    "The candidate's voxels times the voxel volume: the volume of the anomaly, not of the uptake (see MTV)."))
_MAX_HEAT = Column("max_heat", "Max. heat", definition=(
    "The anomaly map's highest value over the candidate, in the heat map's units."))
_CENTROID = tuple(Column(name, axis, "mm", definition=_CENTROID_DEFINITION)
                  for name, axis in zip(("centroid_r", "centroid_a", "centroid_s"), "RAS"))

#: The lesion table's schema for PET (and any image that is not CT), in the order of lesions.csv, the
#: Slicer table, the report and the CLI; :func:`lesion_columns` picks it (with the image's and heat map's
#: units and the MTV rule filled in) or :data:`CT_LESION_COLUMNS`.
LESION_COLUMNS: tuple[Column, ...] = (
    _ID, _ORGAN, _VOXELS, _VOLUME,
    Column("suv_max", "SUVmax", "SUVbw", definition="The image's highest value over the candidate's voxels."),
    Column("suv_mean", "SUVmean", "SUVbw", definition="The image's mean value over the candidate's voxels."),
    Column("suv_peak", "SUVpeak", "SUVbw", definition=(
        f"The highest mean of the image within a 1 ml sphere (radius {SUV_PEAK_RADIUS_MM:.1f} mm) centred on one of "
        "the candidate's voxels; the sphere may reach beyond the candidate, not beyond the image.")),
    Column("mtv_ml", "MTV", "ml", definition=_mtv_definition(DEFAULT_MTV_RULE)),
    Column("tlg", "TLG", "SUVbw·ml", definition=(
        "Total lesion glycolysis: the image's mean over the MTV times the MTV (0 when the MTV is empty).")),
    _MAX_HEAT, *_CENTROID,
)
#: The lesion table's schema for CT: attenuation in HU (mean and range) instead of the SUV, MTV and TLG columns.
CT_LESION_COLUMNS: tuple[Column, ...] = (
    _ID, _ORGAN, _VOXELS, _VOLUME,
    Column("hu_mean", "HU mean", "HU", definition="The mean attenuation over the candidate's voxels."),
    Column("hu_min", "HU min", "HU", definition="The lowest attenuation over the candidate's voxels."),
    Column("hu_max", "HU max", "HU", definition="The highest attenuation over the candidate's voxels."),
    _MAX_HEAT, *_CENTROID,
)
#: The columns holding a lesion's centroid in RAS millimetres (R, A, S), in both schemas.
CENTROID_COLUMNS: tuple[str, str, str] = ("centroid_r", "centroid_a", "centroid_s")
#: The column keys of :func:`lesion_table` for PET, in order.
LESION_TABLE_COLUMNS: tuple[str, ...] = tuple(c.name for c in LESION_COLUMNS)

#: Titles of the uptake columns (suv_max, suv_mean, suv_peak, tlg) for an image that is not in SUV.
_PLAIN_TITLES = {"suv_max": "Max.", "suv_mean": "Mean", "suv_peak": "Peak", "tlg": "Mean x MTV"}


def check_mtv_rule(value: Any, field: str = "the MTV rule", units: str | None = None) -> str:
    """The key of :data:`MTV_RULES` ``value`` names ("41pct" or "41%", "suv2.5"; any case, spaces ignored).

    With ``units`` (the PET's), "suv2.5" is refused for an image that is not in SUV (an image without
    units is taken as SUVbw, the only PET unit the models accept).
    """
    key = _MTV_ALIASES.get("".join(value.split()).lower()) if isinstance(value, str) else None
    if key is None:
        raise ValueError(f"{field} must be 41pct (at or above 41 % of each candidate's SUVmax) or suv2.5 (at or "
                         f"above SUV 2.5), got {shown(value)}.")
    if key == "suv2.5" and units is not None and not is_suv(units):
        raise ValueError(f"{field} suv2.5 needs a PET in SUV but the image is in {units}; use 41pct (a fraction of "
                         "each candidate's SUVmax, whatever the units) or load the PET as SUV (from its DICOM "
                         "series or with an SUV factor).")
    return key


def _is_ct(modality: str | None, units: str | None) -> bool:
    return canonical_modality(modality) == "CT" or (modality is None and canonical_units(units) == "HU")


def lesion_columns(modality: str | None = None, units: str | None = None, rows: Sequence[dict[str, Any]] = (),
                   *, heat_units: str | None = None, mtv_rule: str = DEFAULT_MTV_RULE) -> tuple[Column, ...]:
    """The lesion table's columns for an image of ``modality`` / ``units``: :data:`CT_LESION_COLUMNS` for CT
    (modality "CT", or units "HU" when the file states no modality), else :data:`LESION_COLUMNS`.

    The uptake columns carry the image's units (SUVbw when it states none, the only PET unit the models
    accept; an image in other units, e.g. BQML, gets plain titles "Max.", "Mean", ... in those units),
    ``max_heat`` the heat map's (``heat_units``, e.g. "|SUVbw difference|"), and the MTV column the
    sentence of ``mtv_rule``. Without any of them the constants themselves are returned.

    With neither modality nor units given, the schema whose keys ``rows`` (a :func:`lesion_table`) hold, so a
    writer handed only the rows still writes the right header; no rows: the PET schema.
    """
    if modality is None and units is None and rows and set(rows[0]) == {c.name for c in CT_LESION_COLUMNS}:
        modality = "CT"
    return _columns(_is_ct(modality, units), canonical_units(units), heat_units or None, check_mtv_rule(mtv_rule))


@functools.lru_cache(maxsize=64)
def _columns(ct: bool, units: str | None, heat_units: str | None, mtv_rule: str) -> tuple[Column, ...]:
    """The schema with the units and rule filled in; cached, so one set of arguments gives one tuple."""
    if ct:
        base, units = CT_LESION_COLUMNS, "HU"
    else:
        base, units = LESION_COLUMNS, units or "SUVbw"
    out = []
    for c in base:
        if c.name == "max_heat" and heat_units:
            c = replace(c, unit=heat_units)
        elif not ct and c.name in _PLAIN_TITLES and units != "SUVbw":
            title = c.title if is_suv(units) else _PLAIN_TITLES[c.name]
            c = replace(c, title=title, unit=f"{units}·ml" if c.name == "tlg" else units)
        elif c.name == "mtv_ml" and mtv_rule != DEFAULT_MTV_RULE:
            c = replace(c, definition=_mtv_definition(mtv_rule))
        out.append(c)
    out = tuple(out)
    return base if out == base else out


def definitions(columns: Sequence[Column]) -> list[tuple[str, str]]:
    """(heading with unit, definition) per column, in order, for the report's and README's definitions block.

    Neighbouring columns sharing one definition (the centroid's R, A, S) make one entry: "R, A, S (mm)".
    """
    out: list[tuple[list[Column], str]] = []
    for c in columns:
        if out and out[-1][1] == c.definition and out[-1][0][-1].unit == c.unit:
            out[-1][0].append(c)
        else:
            out.append(([c], c.definition))
    return [(f"{', '.join(c.title for c in group)}{f' ({group[0].unit})' if group[0].unit else ''}", sentence)
            for group, sentence in out]


def totals(rows: Sequence[dict[str, Any]], modality: str | None = None, units: str | None = None
           ) -> list[tuple[str, int | float, str]]:
    """Whole-body totals of a :func:`lesion_table` as (label, value, unit) rows.

    PET: the count, the total heat-map volume, the total MTV and the total TLG; CT: the count and the
    total volume. Sums of the rows: the MTVs of two candidates never share a voxel (each keeps to the
    voxels nearer to it), so the totals count no voxel twice.
    """
    columns = {c.name: c for c in lesion_columns(modality, units, rows)}
    out: list[tuple[str, int | float, str]] = [("Candidates", len(rows), "")]
    names = ("volume_ml",) if "mtv_ml" not in columns else ("volume_ml", "mtv_ml", "tlg")
    for name in names:
        c = columns[name]
        out.append((f"Total {c.title[0].lower() + c.title[1:] if c.title[1:2].islower() else c.title}",
                    float(sum(float(r[name]) for r in rows)), c.unit))
    return out


# ---- lesion table ----------------------------------------------------------------------------
def _sphere_kernel(ijk_to_ras: np.ndarray, radius_mm: float) -> np.ndarray:
    """Boolean [k, j, i] kernel of the voxel offsets whose physical (RAS) length is <= radius.

    Built from the full 3x3 matrix, so it is a true sphere for anisotropic and oblique grids.
    """
    m = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    half = np.floor(radius_mm * np.linalg.norm(np.linalg.inv(m), axis=1) + 1e-9).astype(int)  # i, j, k
    di, dj, dk = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij")
    offsets = np.stack([di, dj, dk], axis=-1).astype(np.float64)
    inside = np.linalg.norm(offsets @ m.T, axis=-1) <= radius_mm * (1.0 + 1e-9)
    return inside.transpose(2, 1, 0)  # [i, j, k] -> [k, j, i]


def _local_sum(arr: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Sum of ``arr`` over the kernel centred on each voxel, zero outside the array."""
    if kernel.sum() > _FFT_KERNEL_VOXELS:
        from scipy import signal  # here: scipy.signal takes longer to import than a lesion table takes to make

        return signal.fftconvolve(arr, kernel.astype(np.float64), mode="same")  # kernel is symmetric
    return ndi.correlate(arr, kernel.astype(np.float64), mode="constant", cval=0.0)


def _grown(box: tuple[slice, ...], pad: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` grown by ``pad`` voxels per axis, clipped to the volume."""
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(box, pad, shape))


def _peak_means(image: np.ndarray, labels: np.ndarray, ids: np.ndarray, kernel: np.ndarray,
                boxes: list[tuple[slice, ...]]) -> list[float]:
    """Per lesion, the largest mean of ``image`` over the kernel centred on one of its voxels (SUVpeak).

    Hand-written: no library computes a PERCIST-like peak (a millimetre sphere on an anisotropic,
    oblique grid, centres restricted to the lesion). Computed on each lesion's bounding box grown
    by the kernel's half-size, so the sphere around every lesion voxel is inside the crop; at the
    volume's border the mean is over the part of the sphere inside the volume (normalised
    convolution).
    """
    half = np.array(kernel.shape) // 2
    peaks = []
    for lab, sl in zip(ids, boxes):
        crop = _grown(sl, half, labels.shape)
        img = image[crop].astype(np.float64)  # float64 for an exact mean of a constant region
        lesion = labels[crop] == lab
        sums = _local_sum(img, kernel)
        counts = _local_sum(np.ones_like(img), kernel)
        means = sums[lesion] / counts[lesion]
        peaks.append(float(means.max()))
    return peaks


def _metabolic_volumes(image: np.ndarray, labels: np.ndarray, ids: np.ndarray, boxes: list[tuple[slice, ...]],
                       spacing_kji: np.ndarray, rule: str) -> list[tuple[int, float]]:
    """Per candidate, (voxel count, image sum) of its metabolic tumour volume under ``rule`` (:data:`MTV_RULES`).

    Hand-written around scipy: no library grows a threshold region from a seed inside the region a candidate
    may grow into (the voxels within :data:`MTV_MARGIN_MM` of it and strictly nearer to it than to any other
    candidate, from two ``distance_transform_edt``). Distances use the grid's spacing along its axes (exact
    for any rotation; a sheared grid is measured as if orthogonal, as :func:`.roi.dilate_mm` does). Each
    candidate is measured in its box grown by twice the margin, which holds every candidate nearer than the
    margin to any voxel within the margin of it. Only the part of that box around the seed's connected region at or
    above the cut (grown by the margin) is transformed: the MTV lies inside that region, and the candidate and
    neighbour voxels nearest to any voxel of it within the margin lie inside the grown part, so the distances that
    decide are the same (a candidate filling the body below a low cut costs its hot spot, not the body). A
    candidate whose SUVmax is 0 or less has no metabolic volume.
    """
    margin = np.ceil(MTV_MARGIN_MM / spacing_kji).astype(int) + 1
    pad = 2 * margin
    structure = ndi.generate_binary_structure(3, 3)
    out = []
    for lab, box in zip(ids, boxes):
        crop = _grown(box, pad, labels.shape)
        lab_crop, img = labels[crop], image[crop].astype(np.float64)
        mine = lab_crop == lab
        seed = np.unravel_index(np.argmax(np.where(mine, img, -np.inf)), img.shape)  # first SUVmax voxel
        cut = _MTV_FRACTION * img[seed] if rule == "41pct" else _MTV_SUV
        if img[seed] <= 0 or img[seed] < cut:  # no uptake, or the SUVmax voxel below the rule's cut (SUVmax < 2.5)
            out.append((0, 0.0))
            continue
        above, _ = ndi.label(img >= cut, structure)
        part = _grown(bounding_box(above == above[seed]), margin, img.shape)
        lab_crop, img, mine = lab_crop[part], img[part], mine[part]
        seed = tuple(int(v) - s.start for v, s in zip(seed, part))
        distance = ndi.distance_transform_edt(~mine, sampling=spacing_kji)
        region = distance <= MTV_MARGIN_MM * (1.0 + _TIE)
        others = (lab_crop > 0) & ~mine
        if others.any():  # strictly nearer: a voxel as near to another candidate (within rounding) is neither's
            region &= distance < ndi.distance_transform_edt(~others, sampling=spacing_kji) * (1.0 - _TIE)
        components, _ = ndi.label(region & (img >= cut), structure)
        volume = components == components[seed]
        out.append((int(volume.sum()), float(img[volume].sum())))
    return out


def _organ_names(organs: OrganLabels, image: Volume, labels: np.ndarray, ids: np.ndarray) -> list[str]:
    """Per candidate, the structure of ``organs`` (carried onto the image's grid) holding most of its voxels.

    Voxels outside every structure count for :data:`NO_ORGAN`; a tie goes to the lower id (no organ first).
    """
    box = bounding_box(labels > 0)
    lab = labels[box]
    organ_ids = np.asarray(organs.on_grid(image).volume.voxels[box]).astype(np.int64)
    fg = lab > 0
    row = np.searchsorted(ids, lab[fg])
    width = int(organ_ids.max(initial=0)) + 1
    counts = np.bincount(row * width + organ_ids[fg], minlength=len(ids) * width).reshape(len(ids), width)
    return [NO_ORGAN if i == 0 else organs.names.get(int(i), f"label {int(i)}") for i in counts.argmax(axis=1)]


def _region_measurements(labels: np.ndarray, img: np.ndarray, hm: np.ndarray,
                         with_min: bool = False) -> dict[str, np.ndarray] | None:
    """The lesions' voxel counts, boxes, centroids, image maxima and means (minima) and heat maxima, on the box
    holding them all, as ``skimage.measure.regionprops_table`` computes its ``area``, ``bbox``,
    ``centroid_local``, ``intensity_max`` / ``intensity_mean`` / ``intensity_min`` (the same numbers, bit for bit).

    Columns: ``label``, ``voxels``, ``start``/``stop`` (n x 3 box corners in the volume),
    ``centroid`` (n x 3 mean voxel index [k, j, i]), ``image_max``/``image_mean`` (float64 image),
    ``image_min`` if ``with_min``, and ``heat_max``. None when there is no lesion.
    Hand-written on ``ndimage.find_objects``: regionprops imports scipy.spatial (~0.07 s, paid by every
    re-threshold) for properties this table never asks for.
    """
    box = bounding_box(labels > 0)
    if box is None:
        return None
    corner = np.array([s.start for s in box])
    # float64 intensities: the mean of a float32 image is then summed in float64, as always.
    lab, values, heat = labels[box], img[box].astype(np.float64), hm[box]
    rows = []
    for index, sl in enumerate(ndi.find_objects(lab)):
        if sl is None:
            continue
        inside = lab[sl] == index + 1
        voxels = values[sl][inside]  # raster order of the lesion's box, as regionprops takes them
        count = int(np.count_nonzero(inside))
        # the mean voxel index in the lesion's box: integer sums over the count (regionprops' first moments
        # are these integer sums, exact in float64), then the box's corner
        local = [float(np.int64(axis.sum()) / np.int64(count)) for axis in np.nonzero(inside)]
        rows.append((index + 1, count, [s.start for s in sl], [s.stop for s in sl], local, float(voxels.max()),
                     float(np.mean(voxels)), float(voxels.min()), float(heat[sl][inside].max())))
    label, count, start, stop, local, image_max, image_mean, image_min, heat_max = zip(*rows)
    start = np.asarray(start, dtype=np.int64) + corner
    out = {
        "label": np.asarray(label, dtype=np.int64),
        "voxels": np.asarray(count, dtype=np.float64),  # regionprops' area: a voxel count, in float
        "start": start,
        "stop": np.asarray(stop, dtype=np.int64) + corner,
        "centroid": np.asarray(local, dtype=np.float64) + start,
        "image_max": np.asarray(image_max, dtype=np.float64),
        "image_mean": np.asarray(image_mean, dtype=np.float64),
        "heat_max": np.asarray(heat_max, dtype=np.float64),
    }
    if with_min:
        out["image_min"] = np.asarray(image_min, dtype=np.float64)
    return out


def lesion_table(labels: np.ndarray, image: Volume, heat: Volume, organs: OrganLabels | None = None,
                 mtv_rule: str = DEFAULT_MTV_RULE) -> list[dict]:
    """One row per candidate (ascending label value) with the keys of ``lesion_columns(image.modality,
    image.units)``; for PET (and any image that is not CT) the :data:`LESION_TABLE_COLUMNS`:

    - ``organ``: the structure of ``organs`` (a TotalSegmentator map on any grid, carried onto the
      image's by :meth:`.roi.OrganLabels.on_grid`) holding most of the candidate's voxels,
      :data:`NO_ORGAN` when most lie outside every structure or ``organs`` is None;
    - ``voxels``, ``volume_ml`` (voxel count x |det(IJK->RAS)| / 1000);
    - ``suv_max``, ``suv_mean`` of ``image`` over the candidate;
    - ``suv_peak``: the largest mean of ``image`` within a 1 cm^3 sphere (radius 6.2 mm, built in
      millimetres from the IJK->RAS matrix, so anisotropic and oblique grids are handled) centred
      on a voxel of the candidate; the sphere may extend beyond the candidate (PERCIST-like SUVpeak,
      with the centre restricted to the candidate rather than searched around it); voxels of the
      sphere outside the volume are left out of the mean;
    - ``mtv_ml``: the metabolic tumour volume under ``mtv_rule`` (:data:`MTV_RULES`, checked by
      :func:`check_mtv_rule` with the image's units): the voxels at or above the rule's cut
      (41 % of the candidate's SUVmax, or SUV 2.5) connected to the candidate's SUVmax voxel (the
      first in storage order on a tie) within :data:`MTV_MARGIN_MM` of the candidate and nearer to
      it than to any other candidate; 0 when the SUVmax voxel itself is below the cut;
    - ``tlg`` = mean of ``image`` over the MTV x ``mtv_ml`` (total lesion glycolysis, SUV.ml; 0 for an empty MTV);
    - ``max_heat``: maximum of the anomaly map over the candidate;
    - ``centroid_r/a/s``: RAS mm of the mean voxel index mapped through IJK->RAS.

    For CT (:data:`CT_LESION_COLUMNS`) ``hu_mean``, ``hu_min`` and ``hu_max`` (the attenuation's mean and
    range over the candidate) replace the SUV, MTV and TLG columns; the others are the same.

    Voxel counts, boxes, centroids, maxima, minima and means are ``skimage.measure.regionprops_table``'s
    (:func:`_region_measurements`); SUVpeak from :func:`_peak_means`; MTV and TLG from
    :func:`_metabolic_volumes`.

    For an image that is neither CT nor in SUV (e.g. BQML) the PET columns keep their names but hold
    the same statistics in the image's units (:func:`lesion_columns` gives them plain titles).
    """
    if not isinstance(image, Volume) or not isinstance(heat, Volume):
        raise ValueError("lesion_table() needs the image and the anomaly map as Volume objects.")
    if organs is not None and not isinstance(organs, OrganLabels):
        raise ValueError("the organ map must be a TotalSegmentator segmentation read with roi.read_organ_labels "
                         "(or None for no organ column values).")
    labels = check_label_image(labels)
    img = _as_voxels(image, "the image")
    hm = _as_voxels(heat, "the anomaly map")
    _check_same_shape(labels=labels, image=img, anomaly_map=hm)
    if not image.same_geometry(heat, atol=1e-4):
        raise ValueError(
            "the image and the anomaly map have the same shape but different IJK->RAS geometry; "
            "bring the map back onto the image's grid first."
        )
    _check_finite(hm, "the anomaly map")
    _check_finite(img, "the image")
    ct = _is_ct(image.modality, image.units)
    rule = check_mtv_rule(mtv_rule, "the MTV rule", None if ct else image.units)

    labels = labels.astype(np.int64, copy=False) if labels.dtype == bool else labels
    regions = _region_measurements(labels, img, hm, with_min=ct)
    if regions is None:
        return []

    ids = regions["label"]
    organ = _organ_names(organs, image, labels, ids) if organs is not None else [NO_ORGAN] * len(ids)
    voxel_ml = voxel_volume_ml(image.ijk_to_ras)
    if not ct:
        boxes = [tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
                 for lo, hi in zip(regions["start"], regions["stop"])]
        peaks = _peak_means(img, labels, ids, _sphere_kernel(image.ijk_to_ras, SUV_PEAK_RADIUS_MM), boxes)
        metabolic = _metabolic_volumes(img, labels, ids, boxes, image.spacing[::-1], rule)

    rows = []
    for k, lab in enumerate(ids):
        count = int(regions["voxels"][k])
        mean = float(regions["image_mean"][k])
        # One point per call: a batched matrix product may round differently in the last bit.
        centroid = image.ijk_to_ras_points(regions["centroid"][k, ::-1])[0]
        if ct:
            intensity = {"hu_mean": mean, "hu_min": float(regions["image_min"][k]),
                         "hu_max": float(regions["image_max"][k])}
        else:
            mtv_voxels, mtv_sum = metabolic[k]
            intensity = {"suv_max": float(regions["image_max"][k]), "suv_mean": mean, "suv_peak": peaks[k],
                         "mtv_ml": mtv_voxels * voxel_ml, "tlg": mtv_sum * voxel_ml}
        rows.append(
            {
                "id": int(lab),
                "organ": organ[k],
                "voxels": count,
                "volume_ml": count * voxel_ml,
                **intensity,
                "max_heat": float(regions["heat_max"][k]),
                "centroid_r": float(centroid[0]),
                "centroid_a": float(centroid[1]),
                "centroid_s": float(centroid[2]),
            }
        )
    return rows


# ---- reference region ------------------------------------------------------------------------
def reference_region(image: Volume, organs: OrganLabels | None, labels: np.ndarray | None = None
                     ) -> dict[str, Any] | None:
    """The liver's mean uptake as the reader's background reference, or None (CT, no organ map, no liver).

    The region: liver voxels of ``organs`` (carried onto the image's grid) more than
    :data:`REFERENCE_EROSION_MM` from the liver's edge (partial volume, CT-PET misregistration and
    breathing) and, with ``labels``, from every candidate (a liver lesion does not raise the
    background). Returns {"organ", "label", "mean", "sd" (standard deviation over the voxels),
    "volume_ml", "voxels", "erosion_mm", "units", "definition"}; None also when nothing of the liver is
    left after the erosion (the sentence to show then: a liver smaller than twice the erosion).
    """
    if not isinstance(image, Volume):
        raise ValueError("reference_region() needs the image as a Volume.")
    if organs is None or _is_ct(image.modality, image.units):
        return None
    if not isinstance(organs, OrganLabels):
        raise ValueError("the organ map must be a TotalSegmentator segmentation read with roi.read_organ_labels.")
    if REFERENCE_ORGAN not in organs.names.values():
        return None
    on = organs.on_grid(image)
    liver = on.mask(REFERENCE_ORGAN)
    box = bounding_box(liver)
    if box is None:
        return None
    crop = _grown(box, (1, 1, 1), liver.shape)
    keep = liver[crop]
    if labels is not None:
        labels = check_label_image(labels, "the lesion labels")
        _check_same_shape(labels=labels, image=_as_voxels(image, "the image"))
        keep = keep & (labels[crop] == 0)
    # Zero-padded: the field of view's edge counts as the liver's edge (what lies beyond is unknown).
    distance = ndi.distance_transform_edt(np.pad(keep, 1), sampling=image.spacing[::-1])[1:-1, 1:-1, 1:-1]
    region = distance > REFERENCE_EROSION_MM
    if not region.any():
        return None
    values = image.voxels[crop][region].astype(np.float64)
    units = canonical_units(image.units) or "SUVbw"
    return {
        "organ": REFERENCE_ORGAN,
        "label": "Liver SUVmean" if is_suv(units) else "Liver mean",
        "mean": float(values.mean()),
        "sd": float(values.std()),
        "volume_ml": int(values.size) * voxel_volume_ml(image.ijk_to_ras),
        "voxels": int(values.size),
        "erosion_mm": REFERENCE_EROSION_MM,
        "units": units,
        "definition": REFERENCE_DEFINITION,
    }
