"""Volume = voxels + geometry (IJK->RAS). The one image type the engine passes around.

Voxels are a numpy array indexed ``[k, j, i]`` (slowest axis first), the order used by
``SimpleITK.GetArrayFromImage`` and Slicer's ``slicer.util.arrayFromVolume``; ``ijk_to_ras`` is
the 4x4 matrix mapping the continuous index ``(i, j, k, 1)`` to RAS millimetres, the matrix
Slicer's ``vtkMRMLVolumeNode.GetIJKToRASMatrix`` returns. RAS <-> LPS conversion happens only
in :func:`lps_ras_flip` so that geometry is carried, never guessed.

Reading (:func:`read_volume`) accepts NRRD, NIfTI, a DICOM folder or one DICOM file; DICOM PET
in Bq/ml is converted to body-weight SUV (:func:`suv_bw_factor`). Every volume that enters the
engine passes :func:`validate_volume`, whose errors are sentences a clinician can act on.
pydicom (about 0.25 s to import) is imported inside the DICOM functions only, so reading or
writing NRRD/NIfTI does not pay for it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from .files import OutputError, atomic_path, check_writable_dir

#: diag(-1, -1, 1, 1): converts LPS <-> RAS (its own inverse).
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Default size limit: 1.5 GB worth of float32 voxels (375 million voxels).
DEFAULT_MAX_VOXELS = int(1.5e9 // 4)

_NRRD_SUFFIXES = (".nrrd", ".nhdr")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: How modality/units are stored in a NIfTI header's 80-character ``descrip`` field.
_NIFTI_DESCRIP = re.compile(r"^modality=(?P<modality>\S*) units=(?P<units>\S*)$")


class VolumeError(ValueError):
    """An input volume that cannot be used; the message says what to do about it."""


def lps_ras_flip(matrix: np.ndarray) -> np.ndarray:
    """Convert a 4x4 IJK->LPS matrix to IJK->RAS or back (the only RAS/LPS conversion)."""
    return _LPS_RAS @ np.asarray(matrix, dtype=np.float64)


def _sitk_geometry(ijk_to_ras: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """(spacing, origin, direction) of SimpleITK's LPS space for an IJK->RAS matrix."""
    lps = lps_ras_flip(ijk_to_ras)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if not np.all(spacing > 0):
        raise VolumeError(f"the voxel spacing {spacing.tolist()} contains a zero; the geometry is degenerate.")
    return (
        [float(s) for s in spacing],
        [float(o) for o in lps[:3, 3]],
        [float(d) for d in (lps[:3, :3] / spacing).ravel()],
    )


@dataclass
class Volume:
    """Voxels ``[k, j, i]`` with their IJK->RAS matrix and a little metadata.

    ``modality`` is a DICOM modality code ("PT", "CT") or ``None`` when unknown;
    ``units`` names the voxel unit ("SUVbw", "HU", "BQML", ...).
    """

    voxels: np.ndarray
    ijk_to_ras: np.ndarray
    modality: str | None = None
    units: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise VolumeError(f"IJK->RAS must be a 4x4 matrix, got shape {self.ijk_to_ras.shape}.")

    # ---- geometry -------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.voxels.shape[:3]
        return int(i), int(j), int(k)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def direction_ras(self) -> np.ndarray:
        """Unit column vectors of the i, j, k axes in RAS."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def origin_ras(self) -> np.ndarray:
        return self.ijk_to_ras[:3, 3].copy()

    def same_geometry(self, other: "Volume", atol: float = 1e-6) -> bool:
        """True when both volumes have the same grid (shape and IJK->RAS)."""
        return self.voxels.shape[:3] == other.voxels.shape[:3] and np.allclose(
            self.ijk_to_ras, other.ijk_to_ras, atol=atol
        )

    def with_voxels(self, voxels: np.ndarray, **changes: Any) -> "Volume":
        """A new volume on this exact grid holding ``voxels`` (metadata copied, then ``changes``)."""
        if voxels.shape[:3] != self.voxels.shape[:3]:
            raise VolumeError(f"voxel array shape {voxels.shape} does not match grid {self.voxels.shape}.")
        return replace(self, voxels=voxels, ijk_to_ras=self.ijk_to_ras.copy(), meta=dict(self.meta), **changes)

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Map (N, 3) continuous indices (i, j, k) to (N, 3) RAS points."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        ras = np.atleast_2d(np.asarray(ras, dtype=np.float64))
        inv = np.linalg.inv(self.ijk_to_ras)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    # ---- SimpleITK bridge -------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        """SimpleITK image (LPS physical space) with this exact geometry."""
        voxels = np.ascontiguousarray(self.voxels)
        if voxels.dtype == np.bool_:
            voxels = voxels.astype(np.uint8)  # SimpleITK has no boolean pixel type
        elif voxels.dtype == np.float16:
            voxels = voxels.astype(np.float32)
        image = sitk.GetImageFromArray(voxels, isVector=False)
        spacing, origin, direction = _sitk_geometry(self.ijk_to_ras)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, **kwargs: Any) -> "Volume":
        if image.GetDimension() != 3:
            raise VolumeError(
                f"expected a 3D volume but the image has {image.GetDimension()} dimensions; "
                "load a 3D scan (a single 2D slice cannot be analysed)."
            )
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise VolumeError("expected a scalar (single-component) volume, got a vector/RGB image.")
        spacing = np.array(image.GetSpacing(), dtype=np.float64)
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        lps = np.eye(4)
        lps[:3, :3] = direction * spacing
        lps[:3, 3] = image.GetOrigin()
        return cls(voxels=sitk.GetArrayFromImage(image), ijk_to_ras=lps_ras_flip(lps), **kwargs)


def array_key(*parts: Any) -> str:
    """A content hash of arrays and plain values: equal inputs give equal keys (cache keys, re-run checks)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, Volume):
            p = (p.voxels, np.asarray(p.ijk_to_ras, dtype=np.float64), p.modality, p.units)
            h.update(array_key(*p).encode())
        elif isinstance(p, np.ndarray):
            h.update(str(p.shape).encode() + str(p.dtype).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


def ijk_to_ras_matrix(spacing, origin_ras, direction_ras=None) -> np.ndarray:
    """Build an IJK->RAS matrix from spacing (i, j, k), RAS origin and RAS direction columns."""
    m = np.eye(4)
    d = np.eye(3) if direction_ras is None else np.asarray(direction_ras, dtype=np.float64)
    m[:3, :3] = d * np.asarray(spacing, dtype=np.float64)
    m[:3, 3] = origin_ras
    return m


# =============================================================================================
# Validation
# =============================================================================================
def _check_shape(shape: Sequence[int], what: str, max_voxels: int) -> None:
    """Shape checks shared by file headers (before reading pixels) and loaded volumes."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise VolumeError(
            f"{what} has {len(shape)} dimensions {shape}; expected a 3D scalar volume. "
            "Load a 3D scan (not a single 2D slice, a time series or a colour image)."
        )
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        raise VolumeError(f"{what} is empty (shape {shape}, zero voxels); choose a file that contains image data.")
    if min(shape) == 1:
        raise VolumeError(
            f"{what} is a 2D image (shape {shape} has a single slice); the analysis needs a 3D volume "
            "with several slices. If this is one DICOM file, point at the folder of its whole series."
        )
    if n > max_voxels:
        raise VolumeError(
            f"{what} is too large: {n:,} voxels ({'x'.join(map(str, shape[::-1]))}, "
            f"{n * 4 / 1e9:.1f} GB as float32) exceeds the limit of {max_voxels:,} voxels. "
            "Crop it to the region of interest or resample it to a coarser spacing "
            "(e.g. Slicer's Crop Volume module) and try again."
        )


def _check_geometry(ijk_to_ras: np.ndarray, what: str) -> None:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise VolumeError(f"{what} has an invalid IJK->RAS matrix (not a finite 4x4 matrix); its geometry is unusable.")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise VolumeError(f"{what} has an invalid IJK->RAS matrix (last row {m[3].tolist()} is not 0 0 0 1).")
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if not np.all(spacing > 1e-6):
        raise VolumeError(
            f"{what} has degenerate geometry: voxel spacing {spacing.tolist()} mm contains zero. "
            "Fix the spacing in the file header (or re-export the image) before analysis."
        )
    direction = m[:3, :3] / spacing
    if abs(np.linalg.det(direction)) < 1e-3:
        raise VolumeError(
            f"{what} has degenerate geometry: its axis directions are (nearly) parallel, so the "
            "IJK->RAS matrix cannot be inverted. Re-export the image with valid orientation information."
        )


def validate_volume(volume: Volume, *, max_voxels: int = DEFAULT_MAX_VOXELS, allow_constant: bool = False) -> Volume:
    """Raise :class:`VolumeError` with an actionable sentence if ``volume`` cannot be analysed.

    Checks: 3D with more than one slice along every axis, not empty, at most ``max_voxels``
    voxels, an invertible finite geometry, no NaN/Inf voxels and (unless ``allow_constant``,
    e.g. for an empty label map) not a constant image. Returns ``volume`` for chaining.
    """
    what = "the volume"
    _check_shape(np.shape(volume.voxels), what, max_voxels)
    _check_geometry(volume.ijk_to_ras, what)
    voxels = volume.voxels
    if np.issubdtype(voxels.dtype, np.inexact):
        bad = int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
        if bad:
            raise VolumeError(
                f"{what} contains {bad:,} NaN/Inf voxels (of {voxels.size:,}); the image is corrupt or was "
                "produced by a failed computation. Re-export it, or replace the invalid voxels before analysis."
            )
    elif not (np.issubdtype(voxels.dtype, np.integer) or voxels.dtype == np.bool_):
        raise VolumeError(f"{what} has unsupported voxel type {voxels.dtype}; expected numbers.")
    if not allow_constant:
        lo, hi = voxels.min(), voxels.max()
        if lo == hi:
            raise VolumeError(
                f"{what} is constant (every voxel equals {lo}); it contains no image information. "
                "Check that the right file/series was chosen."
            )
    return volume


# =============================================================================================
# Reading
# =============================================================================================
def _reader_message(exc: BaseException) -> str:
    """The useful line of an ITK/pydicom exception (not the whole C++ trace)."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "ERROR" in line:
            line = line.split("): ", 1)[-1] if "): " in line else line
            text = line.strip()
            break
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        text = lines[-1] if lines else type(exc).__name__
    return text[:300]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_dicom_file(path: Path) -> bool:
    from pydicom.misc import is_dicom

    try:
        return is_dicom(path)
    except OSError:
        return False


def read_volume(
    path: str | Path,
    *,
    modality: str | None = None,
    suv_factor: float | None = None,
    series_uid: str | None = None,
    validate: bool = True,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Read NRRD (.nrrd/.nhdr), NIfTI (.nii/.nii.gz), a DICOM series folder or one DICOM file.

    A single DICOM file loads its whole series from the same folder. A folder holding several
    series needs ``series_uid`` (the error lists them). DICOM PET in Bq/ml becomes SUVbw
    (:func:`suv_bw_factor`); an explicit ``suv_factor`` multiplies the voxels instead and skips
    the tag logic (also for NRRD/NIfTI, which then get units "SUVbw"). ``modality`` names the
    modality of NRRD/NIfTI files (otherwise taken from our NRRD/NIfTI header fields, else None).
    With ``validate`` (default) the volume passes :func:`validate_volume`; without it only the
    checks that protect the reader itself (3D, size, geometry) run, e.g. for empty label maps.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise VolumeError(f"file not found: {path}")
    if suv_factor is not None and not (np.isfinite(suv_factor) and suv_factor > 0):
        raise VolumeError(f"suv_factor must be a positive number, got {suv_factor!r}.")
    if path.is_dir():
        volume = _read_dicom(path, None, series_uid, modality, suv_factor, max_voxels)
    elif _suffix(path) not in _NRRD_SUFFIXES + _NIFTI_SUFFIXES and _is_dicom_file(path):
        volume = _read_dicom(path.parent, path, series_uid, modality, suv_factor, max_voxels)
    else:
        volume = _read_sitk_file(path, modality, suv_factor, max_voxels)
    if validate:
        try:
            validate_volume(volume, max_voxels=max_voxels)
        except VolumeError as exc:
            raise VolumeError(str(exc).replace("the volume", f"{path}", 1)) from None
    return volume


def _nifti_expected_bytes(header: bytes) -> int | None:
    """vox_offset + voxel bytes from a NIfTI-1/2 header, or None when it is not one we parse."""
    import struct

    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = int(struct.unpack(endian + "q", header[168:176])[0])
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    return max(offset, 348) + int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64)) * bitpix // 8


def _check_nifti_complete(path: Path) -> None:
    """ITK's NIfTI reader zero-fills a truncated file silently; refuse such a file instead."""
    import gzip
    import zlib

    if _suffix(path) == ".nii":
        with open(path, "rb") as f:
            expected = _nifti_expected_bytes(f.read(540))
        actual = path.stat().st_size
    else:
        try:
            with gzip.open(path, "rb") as f:
                expected = _nifti_expected_bytes(f.read(540))
        except (OSError, EOFError, zlib.error):
            raise VolumeError(f"could not read {path}: the gzip stream is corrupt.") from None
        if expected is None:
            return
        with open(path, "rb") as f:  # gzip trailer: uncompressed size mod 2**32 (fast path)
            f.seek(-4, os.SEEK_END)
            trailer = int.from_bytes(f.read(4), "little")
        if trailer == expected % 2**32:
            return
        actual = 0  # trailer disagrees (truncated, or a multi-member gzip): count the bytes
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    actual += len(chunk)
        except (OSError, EOFError, zlib.error):
            raise VolumeError(f"could not read {path}: the file is truncated or corrupt (gzip stream ends early).") from None
    if expected is not None and actual < expected:
        raise VolumeError(
            f"could not read {path}: the file is truncated ({actual:,} of {expected:,} bytes); copy or export it again."
        )


def _read_sitk_file(path: Path, modality: str | None, suv_factor: float | None, max_voxels: int) -> Volume:
    """NRRD / NIfTI (or any other format SimpleITK reads) with its exact geometry."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeError(f"could not read {path}: {_reader_message(exc)}") from None
    if reader.GetNumberOfComponents() != 1:
        raise VolumeError(f"{path} is a vector/colour image; expected a scalar (grey-value) volume.")
    _check_shape(tuple(reader.GetSize())[::-1], str(path), max_voxels)
    if _suffix(path) in _NIFTI_SUFFIXES:
        _check_nifti_complete(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"could not read {path}: {_reader_message(exc)}") from None
    keys = set(image.GetMetaDataKeys())
    file_modality = image.GetMetaData("modality").strip() if "modality" in keys else None
    file_units = image.GetMetaData("units").strip() if "units" in keys else None
    if "descrip" in keys:  # NIfTI written by write_volume
        match = _NIFTI_DESCRIP.match(image.GetMetaData("descrip").strip())
        if match:
            file_modality = match["modality"] or None
            file_units = match["units"] or None
    volume = Volume.from_sitk(
        image,
        modality=modality or file_modality or None,
        units=file_units or None,
        meta={"source": str(path), "format": "nrrd" if _suffix(path) in _NRRD_SUFFIXES else _suffix(path).lstrip(".")},
    )
    _check_geometry(volume.ijk_to_ras, str(path))
    if volume.units is None and volume.modality == "CT":
        volume.units = "HU"
    if suv_factor is not None:
        if volume.units == "SUVbw":
            raise VolumeError(f"{path} is already in SUVbw; do not pass suv_factor (it would convert twice).")
        volume.voxels = (volume.voxels.astype(np.float64) * suv_factor).astype(np.float32)
        volume.units = "SUVbw"
        volume.meta["suv_factor"] = float(suv_factor)
    return volume


# ---- DICOM ----------------------------------------------------------------------------------
@dataclass
class DicomSeriesInfo:
    """One image series found in a DICOM folder; ``files`` in GDCM's slice order."""

    uid: str
    modality: str
    description: str
    number: str
    files: list[Path]

    def describe(self) -> str:
        uid = self.uid or "(empty SeriesInstanceUID)"
        return f"{uid}: {self.modality or '?'} '{self.description}' series {self.number or '?'}, {len(self.files)} files"


def list_dicom_series(directory: str | Path) -> list[DicomSeriesInfo]:
    """The image series in ``directory`` (not recursive) as SimpleITK's GDCM series reader groups them.

    GDCM skips non-DICOM and non-image files (DICOMDIR, structured reports, RT structure sets)
    and orders each series' files along the slice normal. The uid, modality and description come
    from each series' first file (pydicom), so they are the tag values exactly as stored.
    """
    import pydicom

    folder = str(Path(directory))
    series = []
    try:
        for gdcm_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
            files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, gdcm_id)]
            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            series.append(DicomSeriesInfo(
                str(first.get("SeriesInstanceUID", "")), str(first.get("Modality", "")),
                str(first.get("SeriesDescription", "")), str(first.get("SeriesNumber", "")), files,
            ))
    except (RuntimeError, OSError, pydicom.errors.InvalidDicomError) as exc:
        raise VolumeError(f"could not list the DICOM series in {directory}: {_reader_message(exc)}") from None
    return series


def _tag_name(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def _read_dicom(
    directory: Path,
    file: Path | None,
    series_uid: str | None,
    modality: str | None,
    suv_factor: float | None,
    max_voxels: int,
) -> Volume:
    """One DICOM series: GDCM lists and orders the files, SimpleITK reads pixels/geometry, pydicom reads tags."""
    import pydicom

    if file is not None:
        try:
            own_uid = str(pydicom.dcmread(file, stop_before_pixels=True).get("SeriesInstanceUID", ""))
        except Exception as exc:
            raise VolumeError(f"could not read {file}: {_reader_message(exc)}") from None
        if series_uid is not None and series_uid != own_uid:
            raise VolumeError(f"{file} belongs to series {own_uid!r}, not to the requested series_uid {series_uid!r}.")
        series_uid = own_uid
    all_series = list_dicom_series(directory)
    if not all_series:
        raise VolumeError(
            f"no DICOM images found in {directory}; choose the folder of a DICOM series "
            "(or pass a .nrrd/.nii/.nii.gz file)."
        )
    if series_uid is None:
        if len(all_series) > 1:
            listing = "; ".join(s.describe() for s in all_series)
            raise VolumeError(
                f"{directory} contains {len(all_series)} DICOM series ({listing}). Choose one: pass "
                "series_uid='<SeriesInstanceUID>' or the path of one file of the wanted series."
            )
        chosen = all_series[0]
    else:
        matches = [s for s in all_series if s.uid == series_uid]
        if not matches:
            listing = "; ".join(s.describe() for s in all_series)
            raise VolumeError(f"series {series_uid!r} is not in {directory}; available: {listing}.")
        chosen = matches[0]

    files = chosen.files
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    where = f"DICOM series in {directory}"
    if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers):
        raise VolumeError(
            f"the {where} uses multi-frame (enhanced) DICOM files, which are not supported; "
            "load it in Slicer's DICOM module and save it as NRRD."
        )
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if any(keyword not in h for h in headers):
            raise VolumeError(f"the {where} lacks {_tag_name(keyword)} in some files, so its geometry is unknown.")
    _check_slice_grid(headers, where)
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    _check_shape((len(files), rows, cols), f"the {where}", max_voxels)

    dicom_modality = str(headers[0].get("Modality", "")) or None
    if modality is not None and dicom_modality is not None and modality != dicom_modality:
        raise VolumeError(f"the {where} has Modality {dicom_modality}, but modality={modality!r} was requested.")
    modality = dicom_modality or modality

    # SimpleITK picks the pixel type from the FIRST slice's rescale slope/intercept, so slices with a
    # different (e.g. fractional) slope would be truncated or overflow; reading as float64 makes
    # each slice use its own RescaleSlope/Intercept exactly.
    slopes = [float(h.get("RescaleSlope", 1.0) or 1.0) for h in headers]
    intercepts = [float(h.get("RescaleIntercept", 0.0) or 0.0) for h in headers]
    varying = len(set(slopes)) > 1 or len(set(intercepts)) > 1
    integral = all(float(s).is_integer() for s in slopes + intercepts)
    as_float = modality == "PT" or varying or not integral
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    if as_float:
        reader.SetOutputPixelType(sitk.sitkFloat64)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"could not read the {where}: {_reader_message(exc)}") from None
    volume = Volume.from_sitk(image, modality=modality)
    if volume.voxels.shape != (len(files), rows, cols):
        raise VolumeError(f"the {where} has slices of different sizes; it cannot be read as one volume.")
    _check_geometry(volume.ijk_to_ras, f"the {where}")
    volume.meta.update(
        source=str(file or directory),
        format="dicom",
        series_instance_uid=chosen.uid,
        series_description=chosen.description,
        files=[str(f) for f in files],
    )
    if modality == "CT" and str(headers[0].get("RescaleType", "HU")).upper() in ("HU", ""):
        volume.units = "HU"
    if modality == "PT":
        factors = np.full(len(files), float(suv_factor)) if suv_factor is not None else suv_factors(headers)
        volume.voxels = (volume.voxels * factors[:, None, None]).astype(np.float32)
        volume.units = "SUVbw"
        single = _common_factor(factors)
        volume.meta["suv_factor"] = factors.tolist() if single is None else single
    elif suv_factor is not None:
        raise VolumeError(f"suv_factor applies to PET only, but the {where} has Modality {modality}.")
    elif as_float:
        volume.voxels = volume.voxels.astype(np.float32)
    return volume


def _check_slice_grid(headers: list, where: str) -> None:
    """Refuse slices (in GDCM's order) that are not one regular grid; the message says which fault.

    Checked: one orientation, distinct positions, ascending order, even spacing (no missing
    slice), no shear (gantry tilt). Hand-written because GDCM only orders the files and ITK then
    assumes a regular grid (it merely logs a warning), giving such a series a wrong geometry.
    """
    iop = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(iop - iop[0]).max() > 1e-4:
        raise VolumeError(
            f"the slices of the {where} have different orientations (e.g. a localizer mixed in); "
            "choose a series with one orientation."
        )
    if len(headers) < 2:
        return
    normal = np.cross(iop[0, :3], iop[0, 3:])
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    if np.any(np.diff(np.sort(positions @ normal)) < 1e-3):
        raise VolumeError(
            f"several images of the {where} share one slice position (a dynamic, gated or multi-"
            "acquisition series); split it into single volumes (e.g. in Slicer's DICOM module) first."
        )
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    if np.any(along <= 0):  # GDCM fell back to instance-number or file-name order
        raise VolumeError(
            f"the slices of the {where} cannot be ordered by their positions; load it in Slicer's "
            "DICOM module and save it as NRRD."
        )
    mean = along.mean()
    if np.abs(along - mean).max() > max(0.01, 0.01 * mean):
        raise VolumeError(
            f"the slices of the {where} are unevenly spaced (from {along.min():.3f} to {along.max():.3f} mm; "
            "missing slices?); load the complete series."
        )
    off_axis = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    if off_axis.max() > max(0.01, 0.01 * mean):
        raise VolumeError(
            f"the slices of the {where} are sheared (gantry tilt); load it in Slicer's DICOM module, "
            "which corrects the tilt, and save it as NRRD."
        )


# ---- PET SUV --------------------------------------------------------------------------------
def _missing(keyword: str, where: str = "the PET header") -> VolumeError:
    return VolumeError(
        f"cannot convert PET to SUV: {_tag_name(keyword)} is missing or empty in {where}. "
        "If you know the SUV factor (SUVbw = Bq/ml x weight[g] / decay-corrected dose[Bq]), "
        "pass it explicitly as suv_factor."
    )


def _get(ds, keyword: str, where: str = "the PET header"):
    value = ds.get(keyword, None)
    if value is None or (isinstance(value, (str, bytes)) and not str(value).strip()):
        raise _missing(keyword, where)
    return value


def _dicom_date(value) -> _dt.date:
    """DICOM DA via pydicom; the separators of ISO-style dates (YYYY-MM-DD) are dropped first."""
    from pydicom.valuerep import DA

    date = DA(str(value).strip().replace("-", ""))  # DA reads YYYYMMDD and legacy YYYY.MM.DD
    if date is None:
        raise ValueError("empty date")
    return date


def _dicom_time(value) -> _dt.time:
    """DICOM TM via pydicom; the colons of legacy ACR-NEMA times (HH:MM:SS) are dropped first."""
    from pydicom.valuerep import TM

    time = TM(str(value).strip().replace(":", ""))
    if time is None:
        raise ValueError("empty time")
    return time


def _dicom_datetime(value) -> _dt.datetime:
    """DICOM DT via pydicom; a UTC offset (&ZZXX) is dropped: all PET times are read on the scanner's clock."""
    from pydicom.valuerep import DT

    moment = DT(str(value).strip())
    if moment is None:
        raise ValueError("empty date-time")
    return _dt.datetime.combine(moment.date(), moment.time())  # naive, comparable with DA + TM


def _date_time(ds, dt_keyword: str | None, date_keyword: str, time_keyword: str) -> _dt.datetime | None:
    """A DT tag, else DA + TM tags; None when absent. Unparseable values raise VolumeError."""
    try:
        if dt_keyword and str(ds.get(dt_keyword, "") or "").strip():
            return _dicom_datetime(ds.get(dt_keyword))
        date, time = ds.get(date_keyword, None), ds.get(time_keyword, None)
        if date is None or time is None or not str(date).strip() or not str(time).strip():
            return None
        return _dt.datetime.combine(_dicom_date(date), _dicom_time(time))
    except ValueError:
        raise VolumeError(
            f"cannot convert PET to SUV: {_tag_name(date_keyword)}/{_tag_name(time_keyword)} has an "
            "invalid value; pass an explicit suv_factor."
        ) from None


def _acquisition_datetime(ds) -> _dt.datetime | None:
    return _date_time(ds, "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime")


def suv_bw_factor(dataset, *, earliest_acquisition: _dt.datetime | None = None) -> float:
    """Factor turning this PET slice's rescaled voxels (Bq/ml) into body-weight SUV (g/ml).

    SUVbw = activity[Bq/ml] x PatientWeight[g] / dose[Bq] decayed to the reference time, following
    the QIBA vendor-neutral SUV pseudo-code. DecayCorrection START: reference = SeriesDate/Time, or
    the earliest AcquisitionDate/Time when the series time lies after it (post-processed series);
    ``earliest_acquisition`` is that earliest time over all slices (default: this slice's).
    ADMIN: images are already decay corrected to injection, so the dose is not decayed. NONE:
    activity is at this slice's acquisition time, so the dose is decayed to that time (call once
    per slice). Units GML are SUV already (factor 1); Philips CNTS uses its SUV scale factor
    (7053,1000). Missing tags raise :class:`VolumeError` naming the tag.
    """
    units = str(dataset.get("Units", "") or "").strip().upper()
    if units == "GML":
        return 1.0
    if units == "CNTS" and (0x7053, 0x1000) in dataset:
        raw = dataset[(0x7053, 0x1000)].value
        return float(raw.decode().strip("\x00 ") if isinstance(raw, bytes) else raw)
    if not units:
        raise _missing("Units")
    if units != "BQML":
        raise VolumeError(
            f"cannot convert PET to SUV: Units (0054,1001) is {units}, but body-weight SUV needs "
            "BQML (Bq/ml) images. Pass an explicit suv_factor if you know it."
        )
    weight_kg = float(_get(dataset, "PatientWeight"))
    if not weight_kg > 0:
        raise VolumeError(
            f"cannot convert PET to SUV: PatientWeight (0010,1030) is {weight_kg} kg; pass an explicit suv_factor."
        )
    sequence = _get(dataset, "RadiopharmaceuticalInformationSequence")
    if len(sequence) == 0:
        raise _missing("RadiopharmaceuticalInformationSequence")
    item = sequence[0]
    inner = "the RadiopharmaceuticalInformationSequence (0054,0016)"
    dose = float(_get(item, "RadionuclideTotalDose", inner))
    if not dose > 0:
        raise VolumeError(
            f"cannot convert PET to SUV: RadionuclideTotalDose (0018,1074) is {dose} Bq; pass an explicit suv_factor."
        )
    decay = str(_get(dataset, "DecayCorrection")).strip().upper()
    if decay == "ADMIN":
        return weight_kg * 1000.0 / dose
    if decay not in ("START", "NONE"):
        raise VolumeError(
            f"cannot convert PET to SUV: DecayCorrection (0054,1102) is {decay!r} (expected START, ADMIN or "
            "NONE); pass an explicit suv_factor."
        )
    half_life = float(_get(item, "RadionuclideHalfLife", inner))
    if not half_life > 0:
        raise VolumeError(f"cannot convert PET to SUV: RadionuclideHalfLife (0018,1075) is {half_life} s.")

    acquisition = _acquisition_datetime(dataset)
    if decay == "START":
        scan = _date_time(dataset, None, "SeriesDate", "SeriesTime")
        if scan is None:
            raise _missing("SeriesTime" if str(dataset.get("SeriesDate", "") or "").strip() else "SeriesDate")
        earliest = earliest_acquisition or acquisition
        if earliest is not None and scan > earliest:
            scan = earliest  # series time was reset by post-processing; the acquisition started earlier
    else:  # NONE: this slice's activity is measured at its own acquisition time
        scan = acquisition
        if scan is None:
            raise _missing("AcquisitionTime")

    try:
        if str(item.get("RadiopharmaceuticalStartDateTime", "") or "").strip():
            injection = _dicom_datetime(item.RadiopharmaceuticalStartDateTime)
        elif str(item.get("RadiopharmaceuticalStartTime", "") or "").strip():
            # the time-only tag is dated with the scan (series) date, as in the QIBA pseudo-code
            injection = _dt.datetime.combine(scan.date(), _dicom_time(item.RadiopharmaceuticalStartTime))
            if injection - scan > _dt.timedelta(hours=12):
                injection -= _dt.timedelta(days=1)  # injected before midnight, scanned after it
        else:
            raise _missing("RadiopharmaceuticalStartTime", inner)
    except ValueError as exc:
        if isinstance(exc, VolumeError):
            raise
        raise VolumeError(
            "cannot convert PET to SUV: RadiopharmaceuticalStartTime (0018,1072) / StartDateTime (0018,1078) "
            "has an invalid value; pass an explicit suv_factor."
        ) from None
    elapsed = (scan - injection).total_seconds()
    if elapsed < 0:
        raise VolumeError(
            f"cannot convert PET to SUV: the injection time ({injection}) is after the scan time ({scan}); "
            "check RadiopharmaceuticalStartTime (0018,1072) or pass an explicit suv_factor."
        )
    decayed_dose = dose * 2.0 ** (-elapsed / half_life)
    return weight_kg * 1000.0 / decayed_dose


def suv_factors(headers: list) -> np.ndarray:
    """Per-slice SUV factors for a PET series (equal unless DecayCorrection is NONE)."""
    first = headers[0]
    if str(first.get("DecayCorrection", "") or "").strip().upper() == "NONE":
        return np.array([suv_bw_factor(h) for h in headers])
    times = [t for t in (_acquisition_datetime(h) for h in headers) if t is not None]
    return np.full(len(headers), suv_bw_factor(first, earliest_acquisition=min(times) if times else None))


def _common_factor(factors: np.ndarray) -> float | None:
    """The one factor all slices share, or None when they differ (DecayCorrection NONE)."""
    return float(factors[0]) if np.all(factors == factors[0]) else None


def suv_factor_of_series(headers: list) -> float:
    """The single body-weight SUV factor of a PET series' pydicom headers (any slice order).

    For readers that scale a whole volume by one number (e.g. a PET series Slicer loaded in
    Bq/ml). A series whose slices need different factors (DecayCorrection NONE with slices
    acquired at different times) raises :class:`VolumeError`; :func:`read_volume` converts such a
    series slice by slice.
    """
    factor = _common_factor(suv_factors(headers))
    if factor is None:
        raise VolumeError(
            "this PET series needs a different SUV factor per slice (DecayCorrection NONE); "
            "convert it with 'diffusion-anomaly run' from the DICOM folder instead."
        )
    return factor


# =============================================================================================
# Writing and resampling
# =============================================================================================
def write_volume(volume: Volume, path: str | Path, compress: bool = True) -> Path:
    """Write NRRD (``.nrrd``/``.nhdr``) or NIfTI (``.nii``/``.nii.gz``) with exact geometry.

    ``modality``/``units`` go into NRRD key/value fields (and the NIfTI ``descrip``) so our own
    files read back with them. A missing or read-only output folder is refused before anything
    is written (:func:`.files.check_writable_dir`) and the file is written atomically
    (:func:`.files.atomic_path`), so a failure leaves no partial file; failures raise
    :class:`.files.OutputError` naming the file or folder.
    """
    path = Path(path).expanduser()
    check_writable_dir(path.parent, create=False)
    image = volume.to_sitk()
    if volume.modality:
        image.SetMetaData("modality", str(volume.modality))
    if volume.units:
        image.SetMetaData("units", str(volume.units))
    if _suffix(path) in _NIFTI_SUFFIXES and (volume.modality or volume.units):
        image.SetMetaData("ITK_FileNotes", f"modality={volume.modality or ''} units={volume.units or ''}"[:79])
    try:
        if _suffix(path) == ".nhdr":
            _write_detached_nrrd(image, path, compress)
        else:
            with atomic_path(path, suffix=_suffix(path)) as tmp:
                sitk.WriteImage(image, str(tmp), useCompression=compress)
    except OutputError:
        raise
    except (RuntimeError, OSError) as exc:  # SimpleITK reports unknown formats and I/O failures as RuntimeError
        raise OutputError(f"Cannot write {path}: {_reader_message(exc)}") from None
    return path


def _write_detached_nrrd(image: sitk.Image, path: Path, compress: bool) -> None:
    """Write ``.nhdr`` + data file in a staging folder beside ``path``, then move data file, header last.

    Not :func:`.files.atomic_path`: ITK names the data file after the header and records that name
    inside it, so both files must be written under their final names.
    """
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        sitk.WriteImage(image, str(stage / path.name), useCompression=compress)
        for f in sorted(stage.iterdir(), key=lambda p: p.name == path.name):  # header last
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def resample_to(volume: Volume, reference: Volume, interpolator: str = "linear", default: float = 0) -> Volume:
    """``volume`` resampled onto ``reference``'s exact grid, aligned in physical (RAS) space.

    Use ``'nearest'`` for label maps (keeps the voxel type); ``'linear'``/``'bspline'`` give float32
    (float64 inputs stay float64). Points outside ``volume`` get ``default``.
    """
    if interpolator not in _INTERPOLATORS:
        raise VolumeError(f"unknown interpolator {interpolator!r}; use one of {sorted(_INTERPOLATORS)}.")
    image = volume.to_sitk()
    if interpolator == "nearest":
        pixel_type = image.GetPixelID()
    else:
        pixel_type = sitk.sitkFloat64 if volume.voxels.dtype == np.float64 else sitk.sitkFloat32
    spacing, origin, direction = _sitk_geometry(reference.ijk_to_ras)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in reference.shape_ijk])
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputDirection(direction)
    resampler.SetTransform(sitk.Transform())
    resampler.SetInterpolator(_INTERPOLATORS[interpolator])
    resampler.SetDefaultPixelValue(float(default))
    resampler.SetOutputPixelType(pixel_type)
    out = resampler.Execute(image)
    return Volume(
        voxels=sitk.GetArrayFromImage(out),
        ijk_to_ras=reference.ijk_to_ras.copy(),
        modality=volume.modality,
        units=volume.units,
        meta=dict(volume.meta),
    )
