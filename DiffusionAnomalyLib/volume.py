"""Volume = voxels + geometry (IJK->RAS). The one image type the engine passes around.

Voxels are a numpy array indexed ``[k, j, i]`` (slowest axis first), the order used by
``SimpleITK.GetArrayFromImage`` and Slicer's ``slicer.util.arrayFromVolume``; ``ijk_to_ras`` is
the 4x4 matrix mapping the continuous index ``(i, j, k, 1)`` to RAS millimetres, the matrix
Slicer's ``vtkMRMLVolumeNode.GetIJKToRASMatrix`` returns. RAS <-> LPS conversion happens only
in :func:`lps_ras_flip` so that geometry is carried, never guessed.

Reading (:func:`read_volume`) accepts NRRD, NIfTI, a DICOM folder or one DICOM file; DICOM PET
in Bq/ml is converted to body-weight SUV (:func:`suv_bw_factor`, whose header values must be
present, finite and plausible). Modality and units come from the file's own metadata; a caller's
declaration fills what the file does not say and is refused where it contradicts the file.
Every volume that enters the engine passes :func:`validate_volume`, whose errors are sentences a
clinician can act on.
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

from .card import MODALITY_NAMES, real_number
from .files import OutputError, atomic_path, check_writable_dir

#: diag(-1, -1, 1, 1): converts LPS <-> RAS (its own inverse).
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Default size limit: 1.5 GB worth of float32 voxels (375 million voxels).
DEFAULT_MAX_VOXELS = int(1.5e9 // 4)
#: DICOM elements longer than this stay on disk when a header is read (pixel data: only its position and length).
_DEFER_BYTES = 4096

_NRRD_SUFFIXES = (".nrrd", ".nhdr")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: How modality/units are stored in a NIfTI header's 80-character ``descrip`` field.
_NIFTI_DESCRIP = re.compile(r"^modality=(?P<modality>\S*) units=(?P<units>\S*)$")

#: Spellings of voxel units (upper case) -> the one name the engine stores; other units are kept as written.
_UNIT_NAMES = {
    "SUV": "SUVbw", "SUVBW": "SUVbw", "GML": "SUVbw", "G/ML": "SUVbw",  # DICOM Units GML is body-weight SUV
    "BQML": "BQML", "BQ/ML": "BQML", "BECQUERELS/MILLILITER": "BQML",  # Slicer's coded entry for Bq/ml
    "HU": "HU", "HOUNSFIELD UNIT": "HU",
}
#: The engine's units name -> the DICOM Units (0054,1001) code it corresponds to.
_DICOM_PET_UNITS = {"SUVbw": "GML", "BQML": "BQML"}


def canonical_units(units: str | None) -> str | None:
    """The engine's name for a voxel unit ("SUV", "gml" -> "SUVbw"; "Bq/ml" -> "BQML"); None when empty."""
    text = str(units or "").strip()
    return _UNIT_NAMES.get(text.upper(), text) or None


def is_suv(units: str | None) -> bool:
    """True for standardized-uptake-value units (SUVbw and the other SUV normalisations)."""
    return (canonical_units(units) or "").upper().startswith("SUV")


def canonical_modality(modality: str | None) -> str | None:
    """A DICOM modality code as stored ("pt " -> "PT"); None when empty."""
    return str(modality or "").strip().upper() or None


def modality_words(code: str) -> str:
    """A modality code as a user reads it: "PET (PT)", "MR"."""
    name = MODALITY_NAMES.get(code)
    return f"{name} ({code})" if name and name != code else code


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

    def ras_box(self, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """(2, 3) RAS min / max over the voxel corners (half a voxel beyond the centres) of the grid, or of
        ``box`` (``[k, j, i]`` slices with start and stop, as :func:`.postprocessing.bounding_box` gives)."""
        if box is None:
            box = tuple(slice(0, n) for n in self.voxels.shape[:3])
        (k0, k1), (j0, j1), (i0, i1) = ((b.start - 0.5, b.stop - 0.5) for b in box)
        ras = self.ijk_to_ras_points([[i, j, k] for i in (i0, i1) for j in (j0, j1) for k in (k0, k1)])
        return np.stack([ras.min(axis=0), ras.max(axis=0)])

    def crop(self, box: tuple[slice, slice, slice]) -> "Volume":
        """The sub-volume ``box`` (``[k, j, i]`` slices) with its own IJK->RAS: it overlays this volume exactly."""
        start = [b.start or 0 for b in box][::-1]  # i, j, k
        m = self.ijk_to_ras.copy()
        m[:3, 3] = self.ijk_to_ras_points([start])[0]
        return replace(self, voxels=self.voxels[box], ijk_to_ras=m, meta=dict(self.meta))

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
    if not (np.issubdtype(voxels.dtype, np.inexact) or np.issubdtype(voxels.dtype, np.integer)
            or voxels.dtype == np.bool_):
        raise VolumeError(f"{what} has unsupported voxel type {voxels.dtype}; expected numbers.")
    lo, hi = voxels.min(), voxels.max()  # NaN makes both NaN, an infinity one of them: no mask needed to know
    if np.issubdtype(voxels.dtype, np.inexact) and not np.isfinite([lo, hi]).all():
        bad = int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
        raise VolumeError(
            f"{what} contains {bad:,} NaN/Inf voxels (of {voxels.size:,}); the image is corrupt or was "
            "produced by a failed computation. Re-export it, or replace the invalid voxels before analysis."
        )
    if not allow_constant:
        if lo == hi:
            raise VolumeError(
                f"{what} is constant (every voxel equals {lo}); it contains no image information. "
                "Check that the right file/series was chosen."
            )
    return volume


# =============================================================================================
# Reading
# =============================================================================================
#: What the file readers' own messages (teem's NRRD library inside ITK, ITK, GDCM) mean for a user,
#: first match wins. Hand-written because ITK reports these only as English text, not as error codes.
_READER_WORDS: list[tuple[re.Pattern, Any]] = [
    (re.compile(r"fread got only (\d+) (\d+)-sized things, not (\d+)"),
     lambda m: f"the file is truncated (its pixel data ends after {int(m[1]):,} of {int(m[3]):,} voxels); "
               "copy or export it again"),
    (re.compile(r"expected (\d+) bytes but received (\d+)"),
     lambda m: f"the file is truncated (its compressed pixel data gives {int(m[2]):,} of {int(m[1]):,} bytes); "
               "copy or export it again"),
    (re.compile(r"couldn't open \"([^\"]+)\" \(data file"),
     lambda m: f"its data file {m[1]} is missing or cannot be opened"),
    (re.compile(r"trouble parsing (\w[\w ]*?) info \|(.*?)\|"),
     lambda m: f"its header field \"{m[1]}\" has an invalid value ({m[2].strip() or 'empty'})"),
    (re.compile(r"didn't see required field: (\w[\w ]*)"),
     lambda m: f"its header lacks the required field \"{m[1].strip()}\""),
    (re.compile(r"Unable to determine ImageIO reader"),
     lambda m: "it is not in an image format SimpleITK can read (NRRD, NIfTI, DICOM, ...), or it is damaged"),
]


def _reader_message(exc: BaseException) -> str:
    """What an ITK/pydicom exception says, in a user's words where known (not the C++ trace).

    Teem (ITK's NRRD library) stacks "[nrrd] function: trouble" lines with the cause last;
    ITK puts its own line after "ERROR: ...: "; pydicom's messages are used as they are.
    """
    text = str(exc).strip()
    for pattern, words in _READER_WORDS:
        match = pattern.search(text)
        if match:
            return words(match)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    teem = [ln for ln in lines if ln.startswith("[nrrd]") and not ln.rstrip(":").endswith("trouble")]
    if teem:
        text = teem[-1].split(": ", 1)[-1]
    else:
        itk = [ln for ln in lines if "ERROR" in ln]
        if itk:
            text = itk[0].split("): ", 1)[-1] if "): " in itk[0] else itk[0]
            text = re.sub(r"^(?:\w+: )?(?:ITK |sitk::|itk::)?ERROR: ", "", text)
        else:
            text = lines[-1] if lines else type(exc).__name__
    return text.strip().rstrip(":.")[:300]


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
    units: str | None = None,
    suv_factor: float | None = None,
    series_uid: str | None = None,
    validate: bool = True,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Read NRRD (.nrrd/.nhdr), NIfTI (.nii/.nii.gz), a DICOM series folder or one DICOM file.

    A single DICOM file loads its whole series from the same folder. A folder holding several
    series needs ``series_uid`` (the error lists them). DICOM PET in Bq/ml becomes SUVbw
    (:func:`suv_bw_factor`); an explicit ``suv_factor`` multiplies the voxels instead and skips
    the tag logic (also for NRRD/NIfTI, which then get units "SUVbw"). ``modality`` (a DICOM code,
    "PT") and ``units`` ("SUVbw", "BQML", "HU", ...) declare what the file itself does not say:
    they fill a missing header value (our NRRD/NIfTI header fields, DICOM Modality and Units) and
    a declaration that contradicts the file is refused. With ``validate`` (default) the volume
    passes :func:`validate_volume`; without it only the checks that protect the reader itself
    (3D, size, geometry) run, e.g. for empty label maps.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise VolumeError(f"file not found: {path}")
    if suv_factor is not None:
        try:
            suv_factor = real_number(suv_factor, "the SUV factor", 0.0, lo_open=True)
        except ValueError as exc:
            raise VolumeError(str(exc)) from None
    modality, units = canonical_modality(modality), canonical_units(units)
    if path.is_dir():
        volume = _read_dicom(path, None, series_uid, modality, units, suv_factor, max_voxels)
    elif _suffix(path) not in _NRRD_SUFFIXES + _NIFTI_SUFFIXES and _is_dicom_file(path):
        volume = _read_dicom(path.parent, path, series_uid, modality, units, suv_factor, max_voxels)
    else:
        volume = _read_sitk_file(path, modality, units, suv_factor, max_voxels)
    if validate:
        try:
            validate_volume(volume, max_voxels=max_voxels)
        except VolumeError as exc:
            raise VolumeError(str(exc).replace("the volume", f"{path}", 1)) from None
    return volume


def agree(what: str, declared: str | None, found: str | None, source: str, words=str,
          remedy: str | None = None) -> str | None:
    """The input's own ``found`` value, else the user's ``declared`` one; refused when both differ.

    The one rule for declarations (CLI, worker, Slicer): they fill in what the input does not say.
    """
    if declared is not None and found is not None and declared != found:
        raise VolumeError(
            f"{source} gives its {what} as {words(found)}, but {words(declared)} was declared; "
            f"{remedy or f'remove the {what} declaration or choose the right file'}."
        )
    return found if found is not None else declared


def _apply_suv_factor(volume: Volume, suv_factor: float, source: str) -> None:
    """Multiply activity voxels by an explicit SUV factor (units become SUVbw); SUV or non-PET inputs are refused."""
    if is_suv(volume.units):
        raise VolumeError(f"{source} is already in {volume.units}; do not pass an SUV factor (it would convert twice).")
    if volume.modality not in (None, "PT") or volume.units == "HU":
        raise VolumeError(
            f"an SUV factor applies to PET only, but {source} is {modality_words(volume.modality or 'CT')}; "
            "drop the SUV factor or choose the PET scan."
        )
    volume.voxels = (volume.voxels.astype(np.float64) * suv_factor).astype(np.float32)
    volume.units = "SUVbw"
    volume.meta.update(suv_factor=float(suv_factor), suv_provenance=_suv_record(float(suv_factor), SUV_GIVEN))


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


def _gzip_bytes(path: Path, offset: int = 0) -> int:
    """Uncompressed size of the gzip stream starting at ``offset`` of ``path``, its CRC checked.

    ITK's NRRD and NIfTI readers neither check the CRC nor notice a truncated stream (NIfTI is
    zero-filled), so damaged pixel data would be read as plausible-looking garbage.
    """
    import gzip
    import zlib

    size = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                while chunk := f.read(1 << 24):
                    size += len(chunk)
    except EOFError:
        raise VolumeError(f"could not read {path}: the file is truncated (its compressed data ends early); "
                          "copy or export it again.") from None
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        why = "its checksum does not match" if "CRC" in str(exc) else "it cannot be decompressed"
        raise VolumeError(f"could not read {path}: its compressed data is damaged ({why}); "
                          "copy or export it again.") from None
    return size


def _check_nifti_complete(path: Path) -> None:
    """ITK's NIfTI reader zero-fills a truncated file silently; refuse such a file (and a damaged .nii.gz) instead."""
    if _suffix(path) == ".nii":
        with open(path, "rb") as f:
            expected = _nifti_expected_bytes(f.read(540))
        actual = path.stat().st_size
    else:
        import gzip
        import zlib

        try:
            with gzip.open(path, "rb") as f:
                expected = _nifti_expected_bytes(f.read(540))
        except (OSError, EOFError, zlib.error):
            raise VolumeError(
                f"could not read {path}: its compressed data is damaged; copy or export it again."
            ) from None
        actual = _gzip_bytes(path)
    if expected is not None and actual < expected:
        raise VolumeError(
            f"could not read {path}: the file is truncated ({actual:,} of {expected:,} bytes); copy or export it again."
        )


def _nrrd_gzip_stream(path: Path) -> tuple[Path, int, str] | None:
    """Where a gzip-encoded NRRD's data stream is, (file, offset, the header's ``endian``): attached, or one detached
    data file without skips; None for any other NRRD."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    end = head.find(b"\n\n")
    header = head if _suffix(path) == ".nhdr" else head[: max(end, 0)]
    fields = {}
    for line in header.decode("latin-1").splitlines()[1:]:
        if ":" in line and not line.startswith("#") and ":=" not in line:
            key, value = line.split(":", 1)
            fields[key.strip().replace(" ", "")] = value.strip()
    if fields.get("encoding", "").lower() not in ("gzip", "gz") or "lineskip" in fields or "byteskip" in fields:
        return None
    data = fields.get("datafile")
    endian = fields.get("endian", "").lower()
    if data is None and end >= 0 and _suffix(path) != ".nhdr":
        return path, end + 2, endian
    if data and " " not in data and not data.startswith("LIST"):
        target = (path.parent / data) if not Path(data).is_absolute() else Path(data)
        if target.is_file():
            return target, 0, endian
    return None


def _decoded_as_stored(image: sitk.Image, stream: tuple[Path, int, str]) -> bool:
    """True when the voxels ITK decompressed are the gzip stream's content: their CRC-32 and length are those of
    the stream's trailer (its file's last 8 bytes).

    ITK checks neither; this costs one pass over memory, where checking the stream itself (:func:`_gzip_bytes`)
    decompresses it a second time. False (check the stream itself) when it cannot tell: another byte order than
    this machine's, or a file that does not end with the stream's trailer.
    """
    import struct
    import sys
    import zlib

    path, _, endian = stream
    voxels = sitk.GetArrayViewFromImage(image)
    if voxels.dtype.itemsize > 1 and (endian != sys.byteorder or not voxels.flags.c_contiguous):
        return False
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 8:
            return False
        f.seek(-8, os.SEEK_END)
        crc, size = struct.unpack("<II", f.read(8))
    return size == voxels.nbytes & 0xFFFFFFFF and crc == zlib.crc32(voxels)


def _read_sitk_file(
    path: Path, modality: str | None, units: str | None, suv_factor: float | None, max_voxels: int
) -> Volume:
    """NRRD / NIfTI (or any other format SimpleITK reads) with its exact geometry."""
    if path.is_file() and path.stat().st_size == 0:
        raise VolumeError(f"could not read {path}: the file is empty (0 bytes); copy or export it again.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        if _suffix(path) == ".nii.gz":
            _gzip_bytes(path)  # a damaged stream is the more precise cause than "unknown format"
        raise VolumeError(f"could not read {path}: {_reader_message(exc)}.") from None
    if reader.GetNumberOfComponents() != 1:
        raise VolumeError(f"{path} is a vector/colour image; expected a scalar (grey-value) volume.")
    _check_shape(tuple(reader.GetSize())[::-1], str(path), max_voxels)
    stream = None
    if _suffix(path) in _NIFTI_SUFFIXES:
        _check_nifti_complete(path)
    elif _suffix(path) in _NRRD_SUFFIXES:
        stream = _nrrd_gzip_stream(path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        if stream is not None:
            _gzip_bytes(*stream[:2])  # a damaged stream is the more precise cause
        raise VolumeError(f"could not read {path}: {_reader_message(exc)}.") from None
    if stream is not None and not _decoded_as_stored(image, stream):
        _gzip_bytes(*stream[:2])  # the stream itself checked: a damaged one is refused, naming its damage
    keys = set(image.GetMetaDataKeys())
    file_modality = image.GetMetaData("modality").strip() if "modality" in keys else None
    file_units = image.GetMetaData("units").strip() if "units" in keys else None
    if "descrip" in keys:  # NIfTI written by write_volume
        match = _NIFTI_DESCRIP.match(image.GetMetaData("descrip").strip())
        if match:
            file_modality = match["modality"] or None
            file_units = match["units"] or None
    source = str(path)
    volume = Volume.from_sitk(
        image,
        modality=agree("modality", modality, canonical_modality(file_modality), source, modality_words),
        units=agree("units", units, canonical_units(file_units), source),
        meta={"source": source, "format": "nrrd" if _suffix(path) in _NRRD_SUFFIXES else _suffix(path).lstrip(".")},
    )
    _check_geometry(volume.ijk_to_ras, source)
    if volume.units is None and volume.modality == "CT":
        volume.units = "HU"
    if suv_factor is not None:
        _apply_suv_factor(volume, suv_factor, source)
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
        raise VolumeError(f"could not list the DICOM series in {directory}: {_reader_message(exc)}.") from None
    return series


def _tag_name(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def _read_header(file: Path):
    """pydicom header of one file, its pixel data left on disk (deferred: read only its position and length)."""
    import pydicom

    try:
        return pydicom.dcmread(file, defer_size=_DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types for damaged files (InvalidDicomError, EOFError, ...)
        raise VolumeError(f"could not read {file}: {_reader_message(exc)}.") from None


def _check_pixel_data(ds, file: Path) -> None:
    """Refuse a slice whose PixelData (7FE0,0010) is absent or shorter than Rows x Columns x BitsAllocated need.

    Hand-written because GDCM does not complain about such a slice: it leaves it out of the series
    or reads garbage voxels. Compressed (encapsulated) pixel data is left to the decoder.
    """
    if "PixelData" not in ds:
        raise VolumeError(f"{file} has no pixel data ({_tag_name('PixelData')} is missing); export the series again.")
    try:  # the deferred element as read (its length and file position); pydicom >= 3 would read the pixels
        element = ds.get_item("PixelData", keep_deferred=True)
    except TypeError:  # pydicom 2 has no keep_deferred and returns the deferred element anyway
        element = ds.get_item("PixelData")
    length = getattr(element, "length", None)
    if length is None:  # a value already read (not deferred)
        length = len(element.value or b"")
    if getattr(element, "is_undefined_length", False) or length == 0xFFFFFFFF:
        return
    tell = getattr(element, "value_tell", None)
    stored = length if tell is None else max(0, min(length, file.stat().st_size - tell))
    try:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                    * int(ds.BitsAllocated) // 8 * int(ds.get("NumberOfFrames", 1) or 1))
    except (AttributeError, TypeError, ValueError):
        raise VolumeError(
            f"{file} lacks a valid Rows, Columns or BitsAllocated value, so its pixel data cannot be read; "
            "export the series again."
        ) from None
    if stored < expected:
        raise VolumeError(
            f"the pixel data of {file} is truncated ({stored:,} of {expected:,} bytes); "
            "copy or export the series again."
        )


def _check_left_out(directory: Path, all_series: list[DicomSeriesInfo], uid: str) -> None:
    """Refuse when GDCM left out a DICOM file of series ``uid`` (it drops a damaged slice silently).

    The DICOM files GDCM put in no series (reports, presentation states, damaged images) are read
    with pydicom: one that belongs to ``uid`` and is an image (image SOP class, Rows or pixel data)
    is a slice the series would silently lack; one cut off before its SeriesInstanceUID cannot be
    placed at all. Hand-written because GDCM reports neither.
    """
    from pydicom.misc import is_dicom
    from pydicom.uid import MediaStorageDirectoryStorage

    listed = {Path(f) for s in all_series for f in s.files}
    for path in sorted(directory.iterdir()):
        if path in listed or not path.is_file():
            continue
        try:
            if not is_dicom(path):
                continue
        except OSError:
            continue
        ds = _read_header(path)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
            continue  # a DICOMDIR
        if not str(ds.get("SeriesInstanceUID", "") or "").strip():
            raise VolumeError(
                f"{path} is a damaged DICOM file (it ends before its SeriesInstanceUID (0020,000E)), so it may be a "
                "missing slice of the series; copy the series again or remove the file from the folder."
            )
        if str(ds.get("SeriesInstanceUID", "")) != uid:
            continue
        sop_class = getattr(ds.get("SOPClassUID", None), "name", "")
        if not ("PixelData" in ds or "Rows" in ds or "Image Storage" in str(sop_class)):
            continue  # no image (a report, a presentation state)
        _check_pixel_data(ds, path)
        raise VolumeError(
            f"{path} belongs to the DICOM series in {directory} but its image cannot be read, so the series "
            "would lack a slice; copy or export the series again."
        )


def _number(
    ds, keyword: str, where: str, *, remedy: str, prefix: str = "", plausible=None, shown: str = ""
) -> float | None:
    """A numeric tag's value; None when absent or empty. Not a number, not finite or outside ``plausible``
    (lo, hi, unit; ``shown`` words the range) raises :class:`VolumeError` naming the tag and ``where``."""
    tag = _tag_name(keyword)
    try:
        value = ds.get(keyword, None)
        text = "\\".join(map(str, value)) if isinstance(value, (list, tuple)) else str("" if value is None else value)
        if not text.strip():
            return None
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raw = ds.get_item(keyword)
        text = raw.value.decode(errors="replace") if isinstance(getattr(raw, "value", None), bytes) else str(
            getattr(raw, "value", ""))
        raise VolumeError(f'{prefix}{tag} in {where} is "{text.strip()}", which is not a number; {remedy}.') from None
    if not np.isfinite(number):
        raise VolumeError(f"{prefix}{tag} in {where} is {text.strip()} (not a finite number); {remedy}.")
    if plausible is not None:
        lo, hi, unit = plausible
        if not lo <= number <= hi:
            raise VolumeError(
                f"{prefix}{tag} in {where} is {number:g} {unit}, outside the plausible range "
                f"{shown or f'{lo:g} to {hi:g} {unit}'}; {remedy}."
            )
    return number


def _rescale(headers: list, files: list[Path], modality: str | None) -> tuple[list[float], list[float]]:
    """Each slice's RescaleSlope and RescaleIntercept (0028,1053/1052), checked.

    PET and CT store activity and HU only through them (DICOM type 1), so there they must be
    present; everywhere a slope must be finite and positive and an intercept finite (GDCM would
    otherwise use 1 and 0 silently).
    """
    required = modality in ("PT", "CT")
    remedy = "the stored values cannot be turned into " + ("PET activity" if modality == "PT" else "image values") + \
        "; export the series again"
    slopes, intercepts = [], []
    for ds, file in zip(headers, files):
        slope = _number(ds, "RescaleSlope", str(file), remedy=remedy)
        intercept = _number(ds, "RescaleIntercept", str(file), remedy=remedy)
        for keyword, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
            if value is None and required:
                raise VolumeError(
                    f"{_tag_name(keyword)} is missing or empty in {file}, which a {modality_words(modality)} image "
                    f"needs; {remedy}."
                )
        if slope is not None and not slope > 0:
            raise VolumeError(f"{_tag_name('RescaleSlope')} in {file} is {slope:g}, but it must be positive; {remedy}.")
        slopes.append(1.0 if slope is None else slope)
        intercepts.append(0.0 if intercept is None else intercept)
    return slopes, intercepts


def _read_dicom(
    directory: Path,
    file: Path | None,
    series_uid: str | None,
    modality: str | None,
    units: str | None,
    suv_factor: float | None,
    max_voxels: int,
) -> Volume:
    """One DICOM series: GDCM lists and orders the files, SimpleITK reads pixels/geometry, pydicom reads tags.

    ``meta``: source, format "dicom", series_instance_uid, series_description, study_description (str, "" when
    absent), study_date (str YYYY-MM-DD or None), files (str paths, in slice order k) and for PET suv_factor and
    suv_provenance (:data:`SUV_PROVENANCE_KEYS`). Nothing identifying (patient name, ID, birth date) is copied.
    """
    if file is not None:
        own_uid = str(_read_header(file).get("SeriesInstanceUID", ""))
        if series_uid is not None and series_uid != own_uid:
            raise VolumeError(f"{file} belongs to series {own_uid}, not to the requested series {series_uid}.")
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
    _check_left_out(directory, all_series, chosen.uid)
    headers = [_read_header(f) for f in files]
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
    for h, f in zip(headers, files):
        _check_pixel_data(h, f)

    modality = agree("modality", modality, canonical_modality(headers[0].get("Modality", "")), f"the {where}",
                      modality_words)
    if modality == "PT":
        dicom_units = canonical_units(headers[0].get("Units", ""))
        declared = agree("units", units, dicom_units, f"the {where}")
        if dicom_units is None and declared is not None:  # the declaration stands in for the missing Units tag
            for h in headers:
                h.Units = _DICOM_PET_UNITS.get(declared, declared)
        if suv_factor is not None and is_suv(declared):
            raise VolumeError(
                f"the {where} is already in {declared}; do not pass an SUV factor (it would convert twice)."
            )
    else:
        hu = modality == "CT" and str(headers[0].get("RescaleType", "HU")).upper() in ("HU", "")
        units = agree("units", units, "HU" if hu else None, f"the {where}")

    # SimpleITK picks the pixel type from the FIRST slice's rescale slope/intercept, so slices with a
    # different (e.g. fractional) slope would be truncated or overflow; reading as float64 makes
    # each slice use its own RescaleSlope/Intercept exactly.
    slopes, intercepts = _rescale(headers, files, modality)
    varying = len(set(slopes)) > 1 or len(set(intercepts)) > 1
    integral = all(float(s).is_integer() for s in slopes + intercepts)
    as_float = modality == "PT" or varying or not integral
    provenance = None
    if modality == "PT":  # the SUV tags are checked before the pixels are read
        provenance = (_suv_record(float(suv_factor), SUV_GIVEN) if suv_factor is not None
                      else suv_provenance_of_series(headers))
    elif suv_factor is not None:
        raise VolumeError(
            f"an SUV factor applies to PET only, but the {where} is "
            f"{modality_words(modality) if modality else 'of unknown modality'}; drop the SUV factor or choose the PET series."
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    if as_float:
        reader.SetOutputPixelType(sitk.sitkFloat64)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"could not read the {where}: {_reader_message(exc)}.") from None
    volume = Volume.from_sitk(image, modality=modality, units=units)
    if volume.voxels.shape != (len(files), rows, cols):
        raise VolumeError(f"the {where} has slices of different sizes; it cannot be read as one volume.")
    _check_geometry(volume.ijk_to_ras, f"the {where}")
    volume.meta.update(
        source=str(file or directory),
        format="dicom",
        series_instance_uid=chosen.uid,
        series_description=chosen.description,
        study_date=_study_date(headers[0]),
        study_description=str(headers[0].get("StudyDescription", "") or ""),
        files=[str(f) for f in files],
    )
    if provenance is not None:
        factors = np.broadcast_to(np.asarray(provenance["factor"], dtype=np.float64), (len(files),))
        volume.voxels = (volume.voxels * factors[:, None, None]).astype(np.float32)
        volume.units = "SUVbw"
        volume.meta.update(suv_factor=provenance["factor"], suv_provenance=provenance)
    elif as_float:
        volume.voxels = volume.voxels.astype(np.float32)
    return volume


def _study_date(ds) -> str | None:
    """StudyDate (0008,0020) as YYYY-MM-DD; None when absent or not a date (it names the case, it is not required)."""
    try:
        return _dicom_date(ds.get("StudyDate", "") or "").isoformat()
    except ValueError:
        return None


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
#: Plausible PatientWeight (0010,1030) in kg: from a newborn to beyond the heaviest patients PET tables carry.
PATIENT_WEIGHT_KG = (1.0, 500.0)
#: Plausible RadionuclideTotalDose (0018,1074) in Bq: 1 MBq (less means the dose was stored in MBq or mCi,
#: not Bq) to 20 GBq (above any diagnostic or post-therapy PET activity).
INJECTED_DOSE_BQ = (1e6, 2e10)
#: Plausible RadionuclideHalfLife (0018,1075) in s: Rb-82 (76 s), the shortest-lived PET nuclide, to
#: 10 days, beyond I-124 (4.2 days); F-18 is 6586 s.
HALF_LIFE_S = (60.0, 864000.0)
#: Longest plausible injection-to-scan time in half-lives of the nuclide: after 10 only 0.1 % of the
#: activity is left (F-18: 18 h). A fixed 24 h would refuse Zr-89 immuno-PET, scanned days later.
MAX_UPTAKE_HALF_LIVES = 10.0

_SUV_REMEDY = "correct the header or pass an explicit suv_factor"


def _pet_where(ds) -> str:
    """ "the PET header of <file>" (pydicom keeps the file name of a dataset it read)."""
    name = getattr(ds, "filename", None)
    return f"the PET header of {name}" if isinstance(name, str) and name else "the PET header"


def _missing(keyword: str, where: str = "the PET header") -> VolumeError:
    return VolumeError(
        f"cannot convert PET to SUV: {_tag_name(keyword)} is missing or empty in {where}; "
        "if you know the SUV factor (SUVbw = Bq/ml x weight[g] / decay-corrected dose[Bq]), "
        "pass it explicitly as suv_factor."
    )


def _get(ds, keyword: str, where: str = "the PET header"):
    value = ds.get(keyword, None)
    if value is None or (isinstance(value, (str, bytes)) and not str(value).strip()):
        raise _missing(keyword, where)
    return value


def _suv_number(ds, keyword: str, where: str, plausible, shown: str = "") -> float:
    """A required SUV tag: present, a finite number and inside ``plausible`` (lo, hi, unit)."""
    value = _number(ds, keyword, where, remedy=_SUV_REMEDY, prefix="cannot convert PET to SUV: ",
                    plausible=plausible, shown=shown)
    if value is None:
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
            f"invalid value in {_pet_where(ds)}; pass an explicit suv_factor."
        ) from None


def _acquisition_datetime(ds) -> _dt.datetime | None:
    return _date_time(ds, "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime")


#: ``meta["suv_provenance"]`` of a PET volume: what its SUV factor came from; every key is always present, None
#: where the rule did not read it. weight_kg, injected_dose_bq, half_life_s: the header values used;
#: decay_correction: DecayCorrection (0054,1102) as stored (START, ADMIN, NONE); injection_time, reference_time:
#: ISO 8601 date-times (reference = the time the dose is decayed to); factor: SUVbw per rescaled voxel value (a
#: list, like reference_time, when DecayCorrection NONE gives the slices different factors); source: one of
#: SUV_SOURCES.
SUV_PROVENANCE_KEYS = ("weight_kg", "injected_dose_bq", "decay_correction", "half_life_s", "injection_time",
                       "reference_time", "factor", "source")
#: suv_provenance["source"]: body-weight SUV from the header tags, the caller's explicit factor, a series already
#: stored in SUV (Units GML), Philips' own SUV scale factor.
SUV_FROM_TAGS, SUV_GIVEN, SUV_FROM_GML, SUV_FROM_PHILIPS = (
    "DICOM tags", "--suv-factor", "Units GML", "Philips SUV scale factor (7053,1000)")
SUV_SOURCES = (SUV_FROM_TAGS, SUV_GIVEN, SUV_FROM_GML, SUV_FROM_PHILIPS)


def _suv_record(factor, source: str, **values) -> dict[str, Any]:
    """An SUV provenance record (:data:`SUV_PROVENANCE_KEYS`, unread values None)."""
    return {**dict.fromkeys(SUV_PROVENANCE_KEYS), **values, "factor": factor, "source": source}


def suv_bw_factor(dataset, *, earliest_acquisition: _dt.datetime | None = None) -> float:
    """Factor turning this PET slice's rescaled voxels (Bq/ml) into body-weight SUV (g/ml): the ``factor`` of
    :func:`suv_bw_provenance`, which holds the rules."""
    return suv_bw_provenance(dataset, earliest_acquisition=earliest_acquisition)["factor"]


def suv_bw_provenance(dataset, *, earliest_acquisition: _dt.datetime | None = None) -> dict[str, Any]:
    """This PET slice's body-weight SUV factor with the header values it was computed from
    (:data:`SUV_PROVENANCE_KEYS`).

    SUVbw = activity[Bq/ml] x PatientWeight[g] / dose[Bq] decayed to the reference time, following
    the QIBA vendor-neutral SUV pseudo-code. DecayCorrection START: reference = SeriesDate/Time, or
    the earliest AcquisitionDate/Time when the series time lies after it (post-processed series);
    ``earliest_acquisition`` is that earliest time over all slices (default: this slice's).
    ADMIN: images are already decay corrected to injection, so the dose is not decayed. NONE:
    activity is at this slice's acquisition time, so the dose is decayed to that time (call once
    per slice). Units GML are SUV already (factor 1); Philips CNTS uses its SUV scale factor
    (7053,1000). Missing, non-numeric, non-finite or implausible values (:data:`PATIENT_WEIGHT_KG`,
    :data:`INJECTED_DOSE_BQ`, :data:`HALF_LIFE_S`, :data:`MAX_UPTAKE_HALF_LIVES`) raise
    :class:`VolumeError` naming the tag and the file.
    """
    where = _pet_where(dataset)
    units = str(dataset.get("Units", "") or "").strip().upper()
    if units == "GML":
        return _suv_record(1.0, SUV_FROM_GML)
    if units == "CNTS" and (0x7053, 0x1000) in dataset:
        raw = dataset[(0x7053, 0x1000)].value
        text = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).strip("\x00 ")
        try:
            scale = float(text)
        except ValueError:
            scale = float("nan")
        if not (np.isfinite(scale) and scale > 0):
            raise VolumeError(
                f"cannot convert PET to SUV: the Philips SUV scale factor (7053,1000) in {where} is {text or 'empty'}, "
                f"but it must be a positive number; {_SUV_REMEDY}."
            )
        return _suv_record(scale, SUV_FROM_PHILIPS)
    if not units:
        raise _missing("Units", where)
    if units != "BQML":
        raise VolumeError(
            f"cannot convert PET to SUV: Units (0054,1001) is {units} in {where}, but body-weight SUV needs "
            "BQML (Bq/ml) images; pass an explicit suv_factor if you know it."
        )
    weight_kg = _suv_number(dataset, "PatientWeight", where, (*PATIENT_WEIGHT_KG, "kg"))
    sequence = _get(dataset, "RadiopharmaceuticalInformationSequence", where)
    if len(sequence) == 0:
        raise _missing("RadiopharmaceuticalInformationSequence", where)
    item = sequence[0]
    inner = f"the {_tag_name('RadiopharmaceuticalInformationSequence')} in {where}"
    dose = _suv_number(item, "RadionuclideTotalDose", inner, (*INJECTED_DOSE_BQ, "Bq"),
                       "1 MBq to 20 GBq, stored in Bq (370 MBq is 370000000)")
    decay = str(_get(dataset, "DecayCorrection", where)).strip().upper()
    read = {"weight_kg": weight_kg, "injected_dose_bq": dose, "decay_correction": decay}
    if decay == "ADMIN":
        return _suv_record(weight_kg * 1000.0 / dose, SUV_FROM_TAGS, **read)
    if decay not in ("START", "NONE"):
        raise VolumeError(
            f"cannot convert PET to SUV: DecayCorrection (0054,1102) in {where} is {decay} (expected START, ADMIN or "
            "NONE); pass an explicit suv_factor."
        )
    half_life = _suv_number(item, "RadionuclideHalfLife", inner, (*HALF_LIFE_S, "s"),
                            "60 s to 10 days, in seconds (F-18: 6586 s)")

    acquisition = _acquisition_datetime(dataset)
    if decay == "START":
        scan = _date_time(dataset, None, "SeriesDate", "SeriesTime")
        if scan is None:
            raise _missing("SeriesTime" if str(dataset.get("SeriesDate", "") or "").strip() else "SeriesDate", where)
        earliest = earliest_acquisition or acquisition
        if earliest is not None and scan > earliest:
            scan = earliest  # series time was reset by post-processing; the acquisition started earlier
    else:  # NONE: this slice's activity is measured at its own acquisition time
        scan = acquisition
        if scan is None:
            raise _missing("AcquisitionTime", where)

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
            f"has an invalid value in {inner}; pass an explicit suv_factor."
        ) from None
    elapsed = (scan - injection).total_seconds()
    if elapsed < 0:
        raise VolumeError(
            f"cannot convert PET to SUV: the injection time ({injection}) is after the scan time ({scan}) in {where}; "
            "check RadiopharmaceuticalStartTime (0018,1072) or pass an explicit suv_factor."
        )
    if elapsed > MAX_UPTAKE_HALF_LIVES * half_life:
        raise VolumeError(
            f"cannot convert PET to SUV: the scan time ({scan}) is {elapsed / 3600:.1f} h after the injection "
            f"({injection}) in {where}, more than {MAX_UPTAKE_HALF_LIVES:g} half-lives of the nuclide "
            f"({half_life:g} s), when almost no activity is left; check the injection and series date/time "
            "(RadiopharmaceuticalStartDateTime (0018,1078), SeriesDate (0008,0021)) or pass an explicit suv_factor."
        )
    decayed_dose = dose * 2.0 ** (-elapsed / half_life)
    return _suv_record(weight_kg * 1000.0 / decayed_dose, SUV_FROM_TAGS, **read, half_life_s=half_life,
                       injection_time=injection.isoformat(), reference_time=scan.isoformat())


def suv_provenance_of_series(headers: list) -> dict[str, Any]:
    """The SUV provenance record (:func:`suv_bw_provenance`) of a PET series' pydicom headers (any slice order).

    One record for the series; with DecayCorrection NONE each slice is decayed to its own acquisition time, so
    ``factor`` and ``reference_time`` become per-slice lists (in ``headers`` order) when the slices differ.
    """
    first = headers[0]
    if str(first.get("DecayCorrection", "") or "").strip().upper() == "NONE":
        records = [suv_bw_provenance(h) for h in headers]
        record = dict(records[0])
        if any(r["factor"] != record["factor"] for r in records):
            record.update(factor=[r["factor"] for r in records], reference_time=[r["reference_time"] for r in records])
        return record
    times = [t for t in (_acquisition_datetime(h) for h in headers) if t is not None]
    return suv_bw_provenance(first, earliest_acquisition=min(times) if times else None)


def suv_factor_of_series(headers: list) -> float:
    """The single body-weight SUV factor of a PET series' pydicom headers (any slice order).

    For readers that scale a whole volume by one number (e.g. a PET series Slicer loaded in
    Bq/ml). A series whose slices need different factors (DecayCorrection NONE with slices
    acquired at different times) raises :class:`VolumeError`; :func:`read_volume` converts such a
    series slice by slice.
    """
    factor = suv_provenance_of_series(headers)["factor"]
    if isinstance(factor, list):
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
                sitk.WriteImage(image, str(tmp), useCompression=bool(compress))
    except OutputError:
        raise
    except (RuntimeError, OSError) as exc:  # SimpleITK reports unknown formats and I/O failures as RuntimeError
        raise OutputError(f"Cannot write {path}: {_reader_message(exc)}.") from None
    return path


def _write_detached_nrrd(image: sitk.Image, path: Path, compress: bool) -> None:
    """Write ``.nhdr`` + data file in a staging folder beside ``path``, then move data file, header last.

    Not :func:`.files.atomic_path`: ITK names the data file after the header and records that name
    inside it, so both files must be written under their final names.
    """
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        sitk.WriteImage(image, str(stage / path.name), useCompression=bool(compress))
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
