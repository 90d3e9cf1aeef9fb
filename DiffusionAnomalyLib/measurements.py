"""The lesion table (no torch): its one column schema per modality and the measures of each lesion.

:func:`lesion_table` measures the lesions of a label image (:func:`.postprocessing.segment`) in the columns
of the image's modality (:func:`lesion_columns`: SUV columns for PET, HU columns for CT). The schema feeds
lesions.csv, the Slicer table, the report and the console alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy import signal
from skimage import measure

from .postprocessing import _as_voxels, _check_finite, _check_same_shape, bounding_box, check_label_image, voxel_volume_ml
from .volume import Volume, canonical_modality, canonical_units

__all__ = [
    "CENTROID_COLUMNS",
    "CT_LESION_COLUMNS",
    "Column",
    "LESION_COLUMNS",
    "LESION_TABLE_COLUMNS",
    "SUV_PEAK_RADIUS_MM",
    "lesion_columns",
    "lesion_table",
]

#: Above this many kernel voxels the SUVpeak mean is computed by FFT (same result, faster).
_FFT_KERNEL_VOXELS = 343


@dataclass(frozen=True)
class Column:
    """One column of the lesion table: its key, the title a reader sees, its unit, its type."""

    name: str
    title: str
    unit: str = ""
    integer: bool = False


#: The lesion table's schema for PET (and any image that is not CT), in the order of lesions.csv, the
#: Slicer table, the report and the CLI; :func:`lesion_columns` picks it or :data:`CT_LESION_COLUMNS`.
LESION_COLUMNS: tuple[Column, ...] = (
    Column("id", "Lesion", integer=True),
    Column("voxels", "Voxels", integer=True),
    Column("volume_ml", "Volume", "ml"),
    Column("suv_max", "SUVmax"),
    Column("suv_mean", "SUVmean"),
    Column("suv_peak", "SUVpeak"),
    Column("tlg", "TLG", "SUV·ml"),
    Column("max_heat", "Max. heat"),
    Column("centroid_r", "R", "mm"),
    Column("centroid_a", "A", "mm"),
    Column("centroid_s", "S", "mm"),
)
#: The lesion table's schema for CT: attenuation in HU (mean and range) instead of the SUV columns.
CT_LESION_COLUMNS: tuple[Column, ...] = (
    *LESION_COLUMNS[:3],
    Column("hu_mean", "HU mean", "HU"),
    Column("hu_min", "HU min", "HU"),
    Column("hu_max", "HU max", "HU"),
    *LESION_COLUMNS[7:],
)
#: The columns holding a lesion's centroid in RAS millimetres (R, A, S), in both schemas.
CENTROID_COLUMNS: tuple[str, str, str] = ("centroid_r", "centroid_a", "centroid_s")
#: The column keys of :func:`lesion_table` for PET, in order.
LESION_TABLE_COLUMNS: tuple[str, ...] = tuple(c.name for c in LESION_COLUMNS)


def lesion_columns(modality: str | None = None, units: str | None = None,
                   rows: Sequence[dict[str, Any]] = ()) -> tuple[Column, ...]:
    """The lesion table's columns for an image of ``modality`` / ``units``: :data:`CT_LESION_COLUMNS` for CT
    (modality "CT", or units "HU" when the file states no modality), else :data:`LESION_COLUMNS`.

    With neither given, the schema whose keys ``rows`` (a :func:`lesion_table`) hold, so a writer handed only
    the rows still writes the right header; no rows: the PET schema.
    """
    if canonical_modality(modality) == "CT" or (modality is None and canonical_units(units) == "HU"):
        return CT_LESION_COLUMNS
    if modality is None and units is None and rows and set(rows[0]) == {c.name for c in CT_LESION_COLUMNS}:
        return CT_LESION_COLUMNS
    return LESION_COLUMNS

#: Radius of the sphere of volume 1 cm^3 used for SUVpeak: (3 * 1000 / (4 pi))^(1/3) = 6.2035 mm.
SUV_PEAK_RADIUS_MM: float = (3000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)


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
        return signal.fftconvolve(arr, kernel.astype(np.float64), mode="same")  # kernel is symmetric
    return ndi.correlate(arr, kernel.astype(np.float64), mode="constant", cval=0.0)


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
        lo = [max(s.start - h, 0) for s, h in zip(sl, half)]
        hi = [min(s.stop + h, n) for s, h, n in zip(sl, half, labels.shape)]
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        img = image[crop].astype(np.float64)  # float64 for an exact mean of a constant region
        lesion = labels[crop] == lab
        sums = _local_sum(img, kernel)
        counts = _local_sum(np.ones_like(img), kernel)
        means = sums[lesion] / counts[lesion]
        peaks.append(float(means.max()))
    return peaks


#: Per-lesion measurements scikit-image makes for :func:`lesion_table`. ``centroid_local`` (in the
#: lesion's own box) plus the box's corner is the arithmetic the table has always used; skimage's
#: ``centroid`` averages volume coordinates and can differ in the last bit.
_REGION_PROPERTIES = ("label", "area", "bbox", "centroid_local", "intensity_max", "intensity_mean")


def _region_measurements(labels: np.ndarray, img: np.ndarray, hm: np.ndarray,
                         with_min: bool = False) -> dict[str, np.ndarray] | None:
    """``skimage.measure.regionprops_table`` of the lesions, on the box holding them all.

    Columns: ``label``, ``voxels``, ``start``/``stop`` (n x 3 box corners in the volume),
    ``centroid`` (n x 3 mean voxel index [k, j, i]), ``image_max``/``image_mean`` (float64 image),
    ``image_min`` if ``with_min``, and ``heat_max``. None when there is no lesion.
    """
    box = bounding_box(labels > 0)
    if box is None:
        return None
    corner = np.array([s.start for s in box])
    lab = labels[box]
    # float64 intensities: the mean of a float32 image is then summed in float64, as always.
    properties = _REGION_PROPERTIES + (("intensity_min",) if with_min else ())
    props = measure.regionprops_table(lab, img[box].astype(np.float64), properties=properties)
    heat = measure.regionprops_table(lab, hm[box], properties=("intensity_max",))
    start = np.stack([props[f"bbox-{a}"] for a in range(3)], axis=1) + corner
    out = {
        "label": props["label"],
        "voxels": props["area"],
        "start": start,
        "stop": np.stack([props[f"bbox-{a + 3}"] for a in range(3)], axis=1) + corner,
        "centroid": np.stack([props[f"centroid_local-{a}"] for a in range(3)], axis=1) + start,
        "image_max": props["intensity_max"],
        "image_mean": props["intensity_mean"],
        "heat_max": heat["intensity_max"],
    }
    if with_min:
        out["image_min"] = props["intensity_min"]
    return out


def lesion_table(labels: np.ndarray, image: Volume, heat: Volume) -> list[dict]:
    """One row per lesion (ascending label value) with the keys of ``lesion_columns(image.modality,
    image.units)``; for PET (and any image that is not CT) the :data:`LESION_TABLE_COLUMNS`:

    - ``voxels``, ``volume_ml`` (voxel count x |det(IJK->RAS)| / 1000);
    - ``suv_max``, ``suv_mean`` of ``image`` over the lesion;
    - ``suv_peak``: the largest mean of ``image`` within a 1 cm^3 sphere (radius 6.2 mm, built in
      millimetres from the IJK->RAS matrix, so anisotropic and oblique grids are handled) centred
      on a voxel of the lesion; the sphere may extend beyond the lesion (PERCIST-like SUVpeak,
      with the centre restricted to the lesion rather than searched around it); voxels of the
      sphere outside the volume are left out of the mean;
    - ``tlg`` = ``suv_mean`` x ``volume_ml`` (total lesion glycolysis, SUV.ml);
    - ``max_heat``: maximum of the anomaly map over the lesion;
    - ``centroid_r/a/s``: RAS mm of the mean voxel index mapped through IJK->RAS.

    For CT (:data:`CT_LESION_COLUMNS`) ``hu_mean``, ``hu_min`` and ``hu_max`` (the attenuation's mean and
    range over the lesion) replace the four SUV columns; the others are the same.

    Voxel counts, boxes, centroids, maxima, minima and means come from
    ``skimage.measure.regionprops_table``; SUVpeak from :func:`_peak_means`.

    For an image that is neither CT nor in SUV (e.g. a file without modality or units) the PET
    columns keep their names, but mean the same statistics in the image's units:
    ``suv_max``/``suv_mean``/``suv_peak`` are max/mean/1 cm^3-peak intensity and ``tlg`` is
    mean intensity x volume.
    """
    if not isinstance(image, Volume) or not isinstance(heat, Volume):
        raise ValueError("lesion_table() needs the image and the anomaly map as Volume objects.")
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

    labels = labels.astype(np.int64, copy=False) if labels.dtype == bool else labels
    ct = lesion_columns(image.modality, image.units) is CT_LESION_COLUMNS
    regions = _region_measurements(labels, img, hm, with_min=ct)
    if regions is None:
        return []

    ids = regions["label"]
    if not ct:
        boxes = [tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
                 for lo, hi in zip(regions["start"], regions["stop"])]
        kernel = _sphere_kernel(image.ijk_to_ras, SUV_PEAK_RADIUS_MM)
        peaks = _peak_means(img, labels, ids, kernel, boxes)
    voxel_ml = voxel_volume_ml(image.ijk_to_ras)

    rows = []
    for k, lab in enumerate(ids):
        count = int(regions["voxels"][k])
        volume_ml = count * voxel_ml
        mean = float(regions["image_mean"][k])
        # One point per call: a batched matrix product may round differently in the last bit.
        centroid = image.ijk_to_ras_points(regions["centroid"][k, ::-1])[0]
        if ct:
            intensity = {"hu_mean": mean, "hu_min": float(regions["image_min"][k]),
                         "hu_max": float(regions["image_max"][k])}
        else:
            intensity = {"suv_max": float(regions["image_max"][k]), "suv_mean": mean, "suv_peak": peaks[k],
                         "tlg": mean * volume_ml}
        rows.append(
            {
                "id": int(lab),
                "voxels": count,
                "volume_ml": volume_ml,
                **intensity,
                "max_heat": float(regions["heat_max"][k]),
                "centroid_r": float(centroid[0]),
                "centroid_a": float(centroid[1]),
                "centroid_s": float(centroid[2]),
            }
        )
    return rows
