"""Results -> files: Slicer ``.seg.nrrd`` segmentations, label maps, CSV lesion tables, JSON.

Every writer is atomic (:func:`.files.atomic_path`); failures raise :class:`.files.OutputError`
with a sentence naming the file or folder.
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .figures import OKABE_ITO, TOL_MUTED
from .files import atomic_path
from .measurements import lesion_columns
from .postprocessing import label_boxes
from .volume import Volume, lps_ras_flip, write_volume

__all__ = [
    "LESION_PALETTE",
    "format_number",
    "lesion_colors",
    "to_jsonable",
    "write_json",
    "write_labelmap",
    "write_segmentation",
    "write_table_csv",
]


#: Lesion colours (RGB in [0, 1]) of the Slicer segments, the report's contours and the DICOM SEG, in label order:
#: Okabe-Ito without black (blue, orange, bluish green, reddish purple, sky blue, vermillion, yellow), then Paul
#: Tol's muted scheme, so the first seven read apart with any colour-vision deficiency and none is pure red or green.
LESION_PALETTE: tuple[tuple[float, float, float], ...] = tuple(
    tuple(round(int(h[i:i + 2], 16) / 255.0, 4) for i in (1, 3, 5)) for h in (*OKABE_ITO[:7], *TOL_MUTED))

#: Slicer terminology of every lesion segment (3D Slicer General Anatomy list: Lesion).
LESION_TERMINOLOGY: dict[str, Any] = {
    "contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
    "category": ["SCT", "49755003", "Morphologically Altered Structure"],
    "type": ["SCT", "52988006", "Lesion"],
    "anatomicContextName": "Anatomic codes - DICOM master list",
}


# ---- segmentation ----------------------------------------------------------------------------
def lesion_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinct RGB colours in [0, 1], the colour of the lesion of the n-th smallest label value: the
    colour-blind-safe :data:`LESION_PALETTE` (15), then golden-angle hues (the ids written beside the contours tell
    those apart)."""
    colors = list(LESION_PALETTE[:n])
    golden = 0.618033988749895
    for m in range(n - len(colors)):
        hue = (0.05 + m * golden) % 1.0
        value = (0.95, 0.75, 0.55)[(m // 7) % 3]
        colors.append(tuple(round(c, 4) for c in colorsys.hsv_to_rgb(hue, 0.8, value)))
    return colors


def _geometry_string(ijk_to_ras: np.ndarray, shape_ijk: Sequence[int]) -> str:
    """Slicer's "Reference image geometry" conversion parameter: IJK->RAS row-major; extent."""
    values = [repr(float(v)) for v in np.asarray(ijk_to_ras, dtype=np.float64).ravel()]
    extent = [str(v) for n in shape_ijk for v in (0, int(n) - 1)]
    return ";".join(values + extent) + ";"


def _conversion_parameters(reference: Volume) -> list[dict[str, str]]:
    geometry = _geometry_string(reference.ijk_to_ras, reference.shape_ijk)
    return [
        {"name": "Collapse labelmaps", "value": "1",
         "description": "Merge the labelmaps into as few shared labelmaps as possible."},
        {"name": "Compute surface normals", "value": "1", "description": "Compute surface normals."},
        {"name": "Crop to reference image geometry", "value": "0",
         "description": "Crop the model to the extent of reference geometry."},
        {"name": "Oversampling factor", "value": "1",
         "description": "Oversampling of the reference image geometry (1 = none)."},
        {"name": "Reference image geometry", "value": geometry,
         "description": "Image geometry description string determining the geometry of the labelmap."},
        {"name": "Smoothing factor", "value": "0.5", "description": "Smoothing factor of the surface."},
    ]


def write_segmentation(
    labels: np.ndarray,
    reference: Volume,
    path: str | os.PathLike,
    names: Sequence[str] | None = None,
    colors: Sequence[Sequence[float]] | None = None,
) -> Path:
    """Write a lesion label image as a 3D Slicer segmentation (``.seg.nrrd``) on ``reference``'s grid.

    One binary-labelmap layer holding every lesion: segment ``n`` (sorted label values) is named
    ``names[n]`` (default "Lesion <label>"), has label value = its label, ID ``lesion_<label>``,
    colour ``colors[n]`` (RGB in [0, 1]; default :func:`lesion_colors`), the Slicer "Lesion"
    terminology and its voxel extent. Geometry is exactly the reference's: the file stores
    IJK->LPS (``space: left-posterior-superior``), converted once from IJK->RAS by
    :func:`~DiffusionAnomalyLib.volume.lps_ras_flip`. With no lesions the file holds the empty
    labelmap and no segments (slicerio and SimpleITK read it back; Slicer loads it as an empty
    segmentation). The segment list is built here rather than with ``slicerio.add_segment``, which
    renumbers label values and scans the volume once per segment: a lesion's label value is its id.
    """
    if not isinstance(reference, Volume):
        raise ValueError("write_segmentation() needs the reference image as a Volume.")
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"a Slicer segmentation file name must end with .seg.nrrd, got {path.name!r}.")
    labels = np.asarray(labels)
    if labels.shape != reference.voxels.shape[:3] or labels.ndim != 3:
        raise ValueError(
            f"label image shape {labels.shape} does not match the reference grid {reference.voxels.shape[:3]}."
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"the label image must hold integers (0 = background), got dtype {labels.dtype}.")
    ids = [int(v) for v in np.unique(labels[labels != 0])]  # the few labelled voxels: a whole-volume unique is slow
    if ids and ids[0] < 0:
        raise ValueError("the label image has negative values; use 0 for background and 1..n for lesions.")
    max_label = max(ids, default=0)
    if max_label > np.iinfo(np.uint16).max:
        raise ValueError(f"label value {max_label} is too large for a segmentation file (at most 65535).")
    dtype = np.uint8 if max_label <= np.iinfo(np.uint8).max else np.uint16

    if names is None:
        names = [f"Lesion {v}" for v in ids]
    else:
        names = [str(n) for n in names]
        if len(names) != len(ids):
            raise ValueError(f"{len(names)} segment names given for {len(ids)} lesions (label values {ids}).")
        if any(not n.strip() for n in names):
            raise ValueError("segment names must not be empty.")
    if colors is None:
        colors = lesion_colors(len(ids))
    else:
        colors = [tuple(float(c) for c in rgb) for rgb in colors]
        if len(colors) != len(ids):
            raise ValueError(f"{len(colors)} colours given for {len(ids)} lesions.")
        for rgb in colors:
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                raise ValueError(f"a segment colour must be 3 numbers (R, G, B) in [0, 1], got {rgb}.")

    voxels_ijk = np.asarray(labels.transpose(2, 1, 0), dtype=dtype)  # slicerio / NRRD: [i, j, k]
    boxes = label_boxes(labels)  # every segment's extent ([k, j, i]) in one pass over the box holding them all
    segments = []
    for value, name, rgb in zip(ids, names, colors):
        box = boxes[value - 1][::-1]  # i, j, k
        segments.append(
            {
                "id": f"lesion_{value}",
                "name": name,
                "nameAutoGenerated": False,
                "color": [round(float(c), 6) for c in rgb],
                "colorAutoGenerated": False,
                "labelValue": value,
                "layer": 0,
                "extent": [int(v) for axis in box for v in (axis.start, axis.stop - 1)],
                "terminology": LESION_TERMINOLOGY,
            }
        )
    segmentation = {
        "voxels": voxels_ijk,
        "ijkToLPS": lps_ras_flip(reference.ijk_to_ras),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": _conversion_parameters(reference),
        "segments": segments,
    }

    import slicerio  # imported here: only this writer needs it

    with atomic_path(path, suffix=".seg.nrrd") as tmp:
        # gzip level 1: a whole-body label map is mostly zeros, so the file is barely larger than at pynrrd's
        # default 9 and written several times faster (re-thresholding rewrites it at every change)
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=1)
    return path


def write_labelmap(labels: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write the label image as a plain label map (``.nrrd``/``.nii.gz``) on ``reference``'s grid."""
    labels = np.asarray(labels)
    if labels.shape != reference.voxels.shape[:3]:
        raise ValueError(
            f"label image shape {labels.shape} does not match the reference grid {reference.voxels.shape[:3]}."
        )
    volume = reference.with_voxels(labels.astype(np.uint16 if labels.max(initial=0) > 255 else np.uint8),
                                   units=None, modality="SEG")
    return write_volume(volume, path)  # atomic; an unwritable target raises OutputError


# ---- tables and JSON -------------------------------------------------------------------------
def format_number(value: Any) -> str:
    """A table cell: integers as is; floats rounded to 4 decimals (4 significant digits below 0.01).

    ``nan``/``inf`` are written as such (``float()`` and pandas read them back); strings pass through.
    """
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if not math.isfinite(x):
            return str(x)  # "nan", "inf", "-inf"
        if x == 0.0:
            return "0"
        if abs(x) >= 0.01:
            text = f"{x:.4f}".rstrip("0").rstrip(".")
            return "0" if text in ("-0", "") else text
        return f"{x:.4g}"
    return str(value)


def write_table_csv(
    rows: Sequence[dict], path: str | os.PathLike, columns: Sequence[str] | None = None, *,
    modality: str | None = None, units: str | None = None,
) -> Path:
    """Write rows as CSV with a fixed column order (default: the lesion table's columns for the image's
    ``modality`` / ``units``, :func:`.measurements.lesion_columns`; without them, those the rows hold).

    The header is written even with no rows. Every row must have exactly these keys, so nothing
    is silently dropped. Numbers are formatted by :func:`format_number`.
    """
    if columns is None:
        columns = [c.name for c in lesion_columns(modality, units, rows)]
    columns = list(columns)
    for n, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        extra = [k for k in row if k not in columns]
        if missing or extra:
            raise ValueError(
                f"table row {n} does not match the columns: missing {missing or 'none'}, unexpected {extra or 'none'}."
            )
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([format_number(row[c]) for c in columns])
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays, paths, tuples and sets made JSON-native.

    Non-finite floats become ``None`` (``null``), because NaN is not valid JSON.
    """
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON.")


def write_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    """Write ``obj`` as UTF-8 JSON (numpy types converted by :func:`to_jsonable`), atomically."""
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
    return Path(path)
