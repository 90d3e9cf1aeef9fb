"""Lesion labels -> a DICOM Segmentation object (highdicom) that references the DICOM series the image came from.

Slicer keeps its own exporter; this is the command line's. The Segmentation is BINARY, one segment per lesion
(SNOMED "Morphologically Abnormal Structure" / "Lesion", the codes of the Slicer segments in
:data:`.export.LESION_TERMINOLOGY`, in :func:`.export.lesion_colors`' colours), made by the automatic algorithm
"DiffusionAnomaly" (:mod:`.version`), content qualification RESEARCH. Each frame lies on the source image at its
position: the source files are matched to the volume's slices by ImagePositionPatient, whatever order they were
read in, and a volume no longer on its series' grid (cropped, resampled) is refused. No torch; highdicom and
pydicom are imported inside the writer only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .export import lesion_colors
from .files import atomic_path, check_writable_dir
from .version import __version__, software
from .volume import Volume, VolumeError, lps_ras_flip

__all__ = ["ALGORITHM_NAME", "SERIES_DESCRIPTION", "write_dicom_seg"]

#: the Algorithm Name (0066,0036) of every segment
ALGORITHM_NAME = "DiffusionAnomaly"
#: the Segmentation's Series Description (0008,103E)
SERIES_DESCRIPTION = "DiffusionAnomaly lesion candidates (research)"
#: Series Number (0020,0011) of the Segmentation series: the source series' number + this (DICOM only asks a number)
_SERIES_NUMBER_OFFSET = 1000
#: DICOM LO (segment label, segment description) holds at most 64 characters
_LO_MAX = 64
#: type 2 patient/study attributes the Segmentation copies from its source: an absent one is written empty (unknown)
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
#: a source image lies on the volume's grid when its position is within this fraction of a voxel of a slice origin
_GRID_TOLERANCE = 0.1


def _refuse_not_dicom(volume: Volume) -> None:
    """One sentence when ``volume`` was not read from a DICOM series or its source files are gone."""
    meta = volume.meta
    source = meta.get("source") or "the image"
    if meta.get("format") != "dicom" or not meta.get("files"):
        raise VolumeError(
            f"a DICOM SEG must reference the DICOM series the image was read from, but {source} is not a DICOM "
            "series; run on the DICOM folder, or use the Slicer segmentation (.seg.nrrd) instead."
        )
    missing = [f for f in meta["files"] if not Path(f).is_file()]
    if missing:
        raise VolumeError(
            f"{len(missing)} of the {len(meta['files'])} source DICOM files are no longer there (e.g. {missing[0]}), "
            "but a DICOM SEG must reference them; put the series back in its folder or use the .seg.nrrd instead."
        )


def _label_array(labels, volume: Volume) -> np.ndarray:
    """The label image as an integer array on ``volume``'s grid (an array of its shape, or a Volume on its grid)."""
    if isinstance(labels, Volume):
        if not labels.same_geometry(volume, atol=1e-4):
            raise ValueError(
                f"the label image (grid {labels.voxels.shape}) is not on the grid of the image it should segment "
                f"(grid {volume.voxels.shape}); resample it onto the image first."
            )
        labels = labels.voxels
    labels = np.asarray(labels)
    if labels.shape != volume.voxels.shape[:3]:
        raise ValueError(
            f"the label image (shape {labels.shape}) is not on the grid of the image it should segment "
            f"(shape {volume.voxels.shape[:3]}); resample it onto the image first."
        )
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"the label image must hold integers (0 = background), got dtype {labels.dtype}.")
    return labels


def _texts(values: Sequence[str] | None, ids: list[int], what: str) -> list[str] | None:
    """Segment labels or descriptions: one non-empty DICOM LO text (at most 64 characters) per lesion."""
    if values is None:
        return None
    values = [str(v) for v in values]
    if len(values) != len(ids):
        raise ValueError(f"{len(values)} segment {what}s given for {len(ids)} lesions (label values {ids}).")
    for v in values:
        if not v.strip() or len(v) > _LO_MAX or "\\" in v:
            raise ValueError(f"segment {what} {v!r} must be 1 to {_LO_MAX} characters without a backslash (DICOM LO).")
    return values


def _source_slices(headers: list, files: list[str], volume: Volume) -> np.ndarray:
    """The volume slice index k of each source image, found from its position and orientation.

    Hand-written (a few lines of geometry) because the refusal must say the volume left its series' grid;
    highdicom's own spatial matching writes an unreferenced Segmentation instead.
    """
    lps = lps_ras_flip(volume.ijk_to_ras)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    to_index = np.linalg.inv(lps)
    nk, nj, ni = volume.voxels.shape[:3]
    def refusal(file: str) -> VolumeError:
        return VolumeError(
            f"the image is no longer on the grid of its source DICOM series (cropped, resampled or reoriented after "
            f"reading; e.g. {file} is on no slice of it), so its labels cannot be placed on the source images; write "
            "the DICOM SEG from the image as read, or use the .seg.nrrd instead."
        )

    slices = []
    for ds, file in zip(headers, files):
        try:
            orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
            row_mm, col_mm = (float(v) for v in ds.PixelSpacing)  # row spacing (along j), column spacing (along i)
            position = np.array([float(v) for v in ds.ImagePositionPatient] + [1.0])
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            raise refusal(file) from None
        ijk = to_index @ position
        k = int(round(ijk[2]))
        if not (rows == nj and cols == ni
                and np.allclose(orientation[:3], lps[:3, 0] / spacing[0], atol=1e-4)
                and np.allclose(orientation[3:], lps[:3, 1] / spacing[1], atol=1e-4)
                and np.allclose([col_mm, row_mm], spacing[:2], rtol=1e-4)
                and np.all(np.abs(ijk[:3] - [0, 0, k]) < _GRID_TOLERANCE) and 0 <= k < nk):
            raise refusal(file)
        slices.append(k)
    if len(slices) != nk or len(set(slices)) != nk:
        raise refusal(files[0])
    return np.array(slices)


def _referencable(headers: list, files: list[str]) -> list:
    """The source headers with their SOP Class/Instance UIDs, taken from the file meta where the data set's own are
    empty (the same identifiers by definition, DICOM PS3.10 7.1); Study/Series Instance UIDs an anonymiser emptied
    get stand-ins derived from the instance UIDs, so every Segmentation of that series names the same one; absent
    type 2 patient/study attributes become empty (unknown), as the Segmentation must carry them."""
    from pydicom.uid import generate_uid

    for ds, file in zip(headers, files):
        meta = getattr(ds, "file_meta", None)
        for own, stored in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                            ("SOPClassUID", "MediaStorageSOPClassUID")):
            if not str(ds.get(own, "") or "").strip():
                value = str(meta.get(stored, "") or "").strip() if meta is not None else ""
                if not value:
                    raise VolumeError(
                        f"{file} has no {own}, so a DICOM SEG cannot reference it; export the series again with its "
                        "UIDs (an anonymiser may have removed them) or use the .seg.nrrd instead."
                    )
                setattr(ds, own, value)
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    instances = sorted(str(ds.SOPInstanceUID) for ds in headers)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if any(not str(ds.get(keyword, "") or "").strip() for ds in headers):
            stand_in = generate_uid(entropy_srcs=[f"DiffusionAnomaly stand-in {keyword}", *instances])
            for ds in headers:
                setattr(ds, keyword, stand_in)
    return headers


def write_dicom_seg(
    labels,
    volume: Volume,
    path: str | os.PathLike,
    names: Sequence[str] | None = None,
    descriptions: Sequence[str] | None = None,
    *,
    parameters: dict[str, str] | None = None,
) -> Path:
    """Write the lesion label image as a DICOM Segmentation referencing the series ``volume`` was read from.

    ``labels``: integers on ``volume``'s grid (an array ``[k, j, i]`` or a Volume with the same grid), 0 =
    background; lesion ``n`` (sorted label values) becomes segment number ``n + 1`` labelled ``names[n]``
    (default "Lesion <label value>"), with ``descriptions[n]`` as its Segment Description when given and
    colour ``lesion_colors(N)[n]``. ``parameters`` (text -> text) are recorded as the algorithm's parameters.
    ``volume`` must carry ``meta["files"]`` (:func:`.volume.read_volume` of a DICOM series) with the files still
    there and must be on their grid. The Segmentation holds only frames with lesion pixels, each referencing its
    source image (Derivation Image Sequence) at that image's position; it carries the source's patient and study
    modules, as DICOM requires of an object of that study. Written atomically (:func:`.files.atomic_path`).
    Refusals (one sentence): :class:`.volume.VolumeError` for an image not read from DICOM, missing or unusable
    source files, an image off its series' grid; ValueError for labels off the grid, no lesion, bad names.
    """
    if not isinstance(volume, Volume):
        raise ValueError("write_dicom_seg() needs the segmented image as a Volume.")
    _refuse_not_dicom(volume)
    labels = _label_array(labels, volume)
    ids = [int(v) for v in np.unique(labels[labels != 0])]
    if not ids:
        raise ValueError("the label image holds no lesion, and a DICOM SEG needs at least one segment; "
                         "write it only when there are candidates.")
    if ids[0] < 0:
        raise ValueError("the label image has negative values; use 0 for background and 1..n for lesions.")
    names = _texts(names, ids, "name") or [f"Lesion {v}" for v in ids]
    descriptions = _texts(descriptions, ids, "description")
    path = Path(path).expanduser()
    check_writable_dir(path.parent, create=False)

    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    files = [str(f) for f in volume.meta["files"]]
    headers = []
    for file in files:
        try:
            headers.append(pydicom.dcmread(file, stop_before_pixels=True))
        except Exception:  # pydicom raises many types for a damaged file
            raise VolumeError(f"{file}, a source file of the image, is no longer a readable DICOM file; "
                              "copy the series again or use the .seg.nrrd instead.") from None
    series_uid = volume.meta.get("series_instance_uid")
    changed = [f for f, ds in zip(files, headers) if str(ds.get("SeriesInstanceUID", "")) != series_uid]
    if series_uid is not None and changed:
        raise VolumeError(
            f"{changed[0]} no longer belongs to the series the image was read from ({series_uid or 'no UID'}); "
            "read the series again before writing its DICOM SEG."
        )
    slices = _source_slices(headers, files, volume)
    headers = _referencable(headers, files)

    values = np.array([0, *ids])  # label value -> segment number (its index)
    frames = np.empty((len(slices),) + labels.shape[1:], np.uint8 if len(ids) <= 255 else np.uint16)
    for frame, k in zip(frames, slices):  # frame f lies on source image f (highdicom's contract); slice by slice
        frame[...] = np.searchsorted(values, labels[k])  # keeps memory at one uint8 copy of the labels
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={str(k): str(v) for k, v in (parameters or {}).items()} or None,
    )
    segments = []
    for number, (name, rgb) in enumerate(zip(names, lesion_colors(len(ids))), start=1):
        segment = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(255.0 * float(c) for c in rgb)),
        )
        if descriptions is not None:
            segment.SegmentDescription = descriptions[number - 1]
        segments.append(segment)
    try:
        source_number = int(headers[0].get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        source_number = 0
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=frames, segmentation_type="BINARY", segment_descriptions=segments,
        series_instance_uid=generate_uid(), series_number=source_number + _SERIES_NUMBER_OFFSET,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=ALGORITHM_NAME,
        manufacturer_model_name="DiffusionAnomalyLib", software_versions=software()[:_LO_MAX],
        device_serial_number="n/a", content_label="LESIONS", series_description=SERIES_DESCRIPTION,
        content_description="Lesion candidates (research use only)", content_qualification="RESEARCH",
    )
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path
