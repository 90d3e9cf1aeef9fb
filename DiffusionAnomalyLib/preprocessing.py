"""Model-card-driven transform into a model's slice space, and its exact inverse.

Forward: resample the input (any orientation, oblique included) by physical coordinates onto an
axis-aligned model grid (LPS axes: columns -> patient left, rows -> posterior, slices -> superior)
with the card's spacing and in-plane size, centred on the input; anti-alias before
downsampling; map intensities with the card's offset/scale/clip. Axial slices of that grid are
what the 2D networks see (IgCONDA-PET section 3.1 resamples, centre-crops and resizes the same way).

Inverse: a model-space array goes back onto the input's exact grid (shape and IJK->RAS
matrix) by physical-space resampling, so outputs overlay the input in Slicer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from .card import MODALITY_NAMES
from .volume import Volume, VolumeError, canonical_modality, canonical_units, is_suv, lps_ras_flip, modality_words

# ---- what a PET model's input must look like (SUVbw) -------------------------------------------
#: Declared SUV: a maximum below this is no uptake anywhere or a factor 1000 off (weight in kg where
#: grams are needed); even fat and lung, the lowest-uptake tissues (SUV ~0.3-0.5), reach it.
SUV_MAX_AT_LEAST = 0.2
#: Declared SUV: no tissue concentrates tracer above this (bladder and kidneys of PSMA scans stay in
#: the low hundreds); above it the SUV factor or the units are wrong.
SUV_MAX_AT_MOST = 1000.0
#: Any SUV: reconstruction noise leaves at most a few SUV below zero (OSEM reconstructions none), so
#: lower values are not SUV.
SUV_MIN_AT_LEAST = -10.0
#: Any SUV: negative values (noise in air) may sum to at most this fraction of the positive ones, as
#: the body's uptake dominates; zero-centred (normalised) images reach about 1.
NEGATIVE_SUM_AT_MOST = 0.25
#: Undeclared units: a maximum at or below this is a normalised [0, 1] image or a wrong scale, as every
#: body region holds tissue above SUV 1 (blood pool ~1.5-2, liver ~2, brain and bladder far more).
UNDECLARED_MAX_ABOVE = 1.0
#: Undeclared units: a maximum above this is activity (kBq/ml or Bq/ml: a scan reaches thousands)
#: or counts far more often than an SUV this high, so the user must say which it is.
UNDECLARED_MAX_AT_MOST = 100.0
#: Undeclared units: a minimum below this, with positive values too, is CT in HU (air is -1000 HU).
HU_AIR_BELOW = -500.0
#: Undeclared units: non-negative whole numbers up to this are an 8-bit picture (screenshot, PNG/JPEG
#: export) or a label map; SUV values are fractional.
EIGHT_BIT_MAX = 255

#: How a user declares a PET volume in body-weight SUV (the command line's spelling).
#: a CT in HU reaches below this somewhere (air outside the body, lungs, bowel gas; HU of air is -1000): stored
#: values without the DICOM rescale (HU = value x slope + intercept, intercept usually -1024) start at about 0
RAW_CT_MIN_AT_LEAST = -10.0
#: ... and put soft tissue near 1000 (1024 + ~40): their 99th percentile is above this, where a CT in HU (fat, soft
#: tissue, some bone) has it at a few hundred
RAW_CT_P99_AT_LEAST = 900.0
DECLARE_SUV = "command line: --modality PT --units SUVbw; Slicer: Units SUVbw"


def check_modality(volume: Volume, card: dict[str, Any]) -> None:
    """Refuse an input the card's model must not see, with one sentence saying what to do.

    The modality must be the model's whenever the volume states one (any other code, MR or
    NM included, is refused). Units, when stated, must be the model's (SUV for PET, HU for CT).
    For a PET model the values must then look like SUV: stated SUV inside the physically
    plausible range, and without units also like the model's input (fractional, not an 8-bit
    picture, not activity, not HU, not zero-centred), else the user is told how to declare it.
    The thresholds are this module's constants, each with its reason.
    """
    want = card["modality"]
    have = canonical_modality(volume.modality)
    if have is not None and have != want:
        raise VolumeError(
            f"this model ({card['id']}) was trained on {MODALITY_NAMES[want]} but the input is "
            f"{modality_words(have)}; choose a {MODALITY_NAMES[want]} scan or a model for {modality_words(have)}."
        )
    units = canonical_units(volume.units)
    if want == "PT":
        _check_pet_values(volume, card, units)
    elif units is not None and units != "HU":
        raise VolumeError(
            f"the CT input is in {units}, but model {card['id']} expects Hounsfield units (HU); "
            "load the CT from its DICOM series or convert it to HU."
        )
    else:
        _check_ct_values(volume, card)


def _check_ct_values(volume: Volume, card: dict[str, Any]) -> None:
    """The value check of :func:`check_modality` for a CT model: raw stored values (no rescale) are refused, and
    so are fractional values from about 0 to at most 100 (:data:`SUV_MIN_AT_LEAST`, :data:`UNDECLARED_MAX_AT_MOST`):
    a PET in SUV, whose modality the file did not say (a CT in HU spans hundreds of HU, in whole numbers)."""
    voxels = np.asarray(volume.voxels)
    lo, hi = float(np.nanmin(voxels)), float(np.nanmax(voxels))
    if lo >= SUV_MIN_AT_LEAST and hi <= UNDECLARED_MAX_AT_MOST and not _whole_numbers(voxels):
        raise VolumeError(
            f"the input's values run from {lo:.3g} to {hi:.3g} in fractions, like a PET in SUV, not a CT in Hounsfield "
            f"units, which model {card['id']} analyses; choose the CT scan (a PET goes to a PET model).")
    p99 = float(np.nanpercentile(voxels, 99))
    if lo >= RAW_CT_MIN_AT_LEAST and p99 >= RAW_CT_P99_AT_LEAST:
        raise VolumeError(
            f"the CT's values start at {lo:g} with 1 % above {p99:g}: they look like raw stored values "
            f"without the DICOM rescale, not Hounsfield units (air is -1000 HU, soft tissue about 40), which model "
            f"{card['id']} expects; load the CT from its DICOM series or apply its rescale slope and intercept."
        )


def _refuse_undeclared(finding: str, card: dict[str, Any], remedy: str = "") -> VolumeError:
    return VolumeError(
        f"the input has no units and {finding}, not the body-weight SUV model {card['id']} expects; "
        f"{remedy + '; ' if remedy else ''}if it really is PET in SUV, declare it ({DECLARE_SUV})."
    )


def _check_pet_values(volume: Volume, card: dict[str, Any], units: str | None) -> None:
    """The value checks of :func:`check_modality` for a PET (SUVbw) model."""
    if units is not None and is_suv(units) and units != "SUVbw":
        raise VolumeError(
            f"the PET input is in {volume.units}, a different SUV normalisation than the body-weight SUV (SUVbw) "
            f"model {card['id']} expects; export the PET as SUVbw or as activity (Bq/ml) from its DICOM series."
        )
    if units is not None and not is_suv(units):
        raise VolumeError(
            f"the PET input is in {volume.units}, but model {card['id']} expects body-weight SUV; "
            "load it from DICOM (converted to SUV automatically) or give an SUV factor (--suv-factor)."
        )
    voxels = volume.voxels
    lo, hi = float(np.nanmin(voxels)), float(np.nanmax(voxels))
    declared = units is not None
    if not declared and lo < HU_AIR_BELOW and hi > 0:
        raise VolumeError(
            f"the input has strongly negative values (minimum {lo:.0f}), which looks like CT in HU, "
            f"but model {card['id']} expects PET in SUV; choose a CT model or a PET scan."
        )
    if hi <= 0:
        raise VolumeError(
            f"the input has no positive values (maximum {hi:.3g}), but PET activity and SUV are never negative; "
            "check that the right file was chosen and that no sign or scale was flipped on export."
        )
    if not declared:
        if _whole_numbers(voxels):
            if lo >= 0 and hi <= EIGHT_BIT_MAX:
                raise _refuse_undeclared(f"holds whole numbers from {lo:.0f} to {hi:.0f} (an 8-bit picture, a "
                                         "label map or stored counts)", card)
            raise _refuse_undeclared(f"holds whole numbers up to {hi:,.0f} (stored counts or activity)", card,
                                     "convert activity to SUV (load the DICOM series, or give --suv-factor)")
        if hi > UNDECLARED_MAX_AT_MOST:
            raise _refuse_undeclared(f"values up to {_amount(hi)}, which looks like activity (Bq/ml or kBq/ml) or a "
                                     f"wrong scale (above {UNDECLARED_MAX_AT_MOST:g}, which body SUV rarely reaches)", card,
                                     "convert activity to SUV (load the DICOM series, or give --suv-factor)")
        if hi <= UNDECLARED_MAX_ABOVE:
            raise _refuse_undeclared(f"a maximum of {hi:.3g}, which looks like a normalised image or a wrong "
                                     f"scale (body PET in SUV exceeds {UNDECLARED_MAX_ABOVE:g})", card)
    else:
        if hi > SUV_MAX_AT_MOST or hi < SUV_MAX_AT_LEAST:
            raise VolumeError(
                f"the input says it is in {volume.units} but its maximum is {_amount(hi)}, outside the physically "
                f"plausible SUV maximum of {SUV_MAX_AT_LEAST:g} to {SUV_MAX_AT_MOST:g}; its SUV factor (patient "
                "weight, injected dose) or its units are wrong, so check them or the DICOM header they came from."
            )
    if lo < SUV_MIN_AT_LEAST:
        raise VolumeError(
            f"the input has values down to {_amount(lo)}, but SUV is never below {SUV_MIN_AT_LEAST:g} (reconstruction "
            "noise stays within a few SUV of zero); check that this is a PET in SUV"
            f"{'' if declared else f' and declare it ({DECLARE_SUV})'}."
        )
    negative = -float(np.sum(voxels, where=voxels < 0, dtype=np.float64))
    positive = float(np.sum(voxels, where=voxels > 0, dtype=np.float64))
    if negative > NEGATIVE_SUM_AT_MOST * positive:
        raise VolumeError(
            f"the negative values of the input sum to {negative / positive:.0%} of its positive ones, which looks "
            "like a zero-centred (normalised) image, not PET activity or SUV; load the original PET scan."
        )


def _amount(value: float) -> str:
    """A value for a sentence: 76,240 or 0.0144."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _whole_numbers(voxels: np.ndarray) -> bool:
    """True when every voxel is a whole number (integer type, or floats without fraction); a sample decides first."""
    if voxels.dtype.kind in "iub":
        return True
    flat = voxels.reshape(-1)
    sample = flat[:: max(1, flat.size // 10000)]
    if np.any(sample != np.round(sample)):
        return False
    return bool(np.all(flat == np.round(flat)))


@dataclass(frozen=True)
class ModelGrid:
    """An axis-aligned LPS grid: ``size`` (i, j, k), ``spacing`` mm, ``origin`` LPS mm."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def reference_image(self) -> sitk.Image:
        img = sitk.Image([int(s) for s in self.size], sitk.sitkFloat32)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return img

    def slice_z(self) -> np.ndarray:
        """The LPS z (= RAS S) in mm of each model slice."""
        return self.origin[2] + self.spacing[2] * np.arange(self.size[2])


@dataclass(frozen=True)
class CropStack:
    """Organ crops of one run (a card with ``preprocessing.crop``): model grids of the card's spacing and
    in-plane size placed around each organ region, their slices stacked in crop order into one array.

    ``size`` and ``spacing`` read like a :class:`ModelGrid`'s (the stack's total slice count), so
    resource checks and slice indices work the same on both.
    """

    crops: tuple[ModelGrid, ...]

    @property
    def size(self) -> tuple[int, int, int]:
        nx, ny, _ = self.crops[0].size
        return nx, ny, int(sum(c.size[2] for c in self.crops))

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.crops[0].spacing

    def bounds(self) -> list[tuple[int, int]]:
        """(first, stop) stacked slice index of each crop."""
        stops = np.cumsum([c.size[2] for c in self.crops])
        return [(int(b - c.size[2]), int(b)) for b, c in zip(stops, self.crops)]

    def slice_z(self) -> np.ndarray:
        return np.concatenate([c.slice_z() for c in self.crops])


def _lps_box(volume: Volume, box: tuple[slice, slice, slice]) -> np.ndarray:
    """(2, 3) LPS min / max over the voxel corners (half a voxel beyond the centres) of ``box`` ([k, j, i] slices)."""
    (k0, k1), (j0, j1), (i0, i1) = ((b.start - 0.5, b.stop - 0.5) for b in box)
    corners = np.array([[i, j, k, 1.0] for i in (i0, i1) for j in (j0, j1) for k in (k0, k1)])
    lps = (corners @ lps_ras_flip(volume.ijk_to_ras).T)[:, :3]
    return np.stack([lps.min(axis=0), lps.max(axis=0)])


def crop_grids(volume: Volume, prep: dict[str, Any], region: np.ndarray | None) -> CropStack:
    """The organ crops of ``volume`` for a crop card: one set per connected part of ``region`` (the included
    organs with their margin, non-zero voxels on the volume's grid), each part's box tiled in-plane by
    crops of the card's in-plane size (centred on the box) and covering its S extent plus one model
    slice above and below (the way back to the input interpolates between slices).

    The same function places the crops in training and in use, so a model sees organs framed as it learnt them.
    """
    from scipy import ndimage

    if region is None:
        organs = ", ".join(prep["crop"]["organs"])
        raise ValueError(f"this model analyses crops around organs ({organs}): give the organ segmentation of the "
                         "scan (--roi-seg, or --ct to run TotalSegmentator; in Slicer: the organ choice).")
    arr = np.asarray(region) != 0
    if arr.shape != np.shape(volume.voxels)[:3]:
        raise ValueError(f"the organ region has shape {arr.shape}, the volume {np.shape(volume.voxels)[:3]}; "
                         "build it on the volume's grid.")
    parts, n = ndimage.label(arr, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        raise ValueError("the region to analyse is empty: choose organs that lie inside the volume.")
    spacing = np.asarray(prep["spacing_mm"], dtype=np.float64)
    size = np.asarray(prep["in_plane_size"], dtype=np.int64)
    width = size * spacing[:2]
    crops = []
    for box in ndimage.find_objects(parts):
        lo, hi = _lps_box(volume, box)
        tiles = np.maximum(1, np.ceil((hi[:2] - lo[:2]) / width - 1e-6)).astype(int)
        centre = (lo[:2] + hi[:2]) / 2
        nz = int(np.ceil((hi[2] - lo[2]) / spacing[2] - 1e-6)) + 3
        z0 = (lo[2] + hi[2]) / 2 - (nz - 1) / 2 * spacing[2]
        for ty in range(tiles[1]):
            for tx in range(tiles[0]):
                c = centre + (np.array([tx, ty]) - (tiles - 1) / 2) * width
                origin = c - (size - 1) / 2 * spacing[:2]
                crops.append(ModelGrid((int(size[0]), int(size[1]), nz), tuple(float(v) for v in spacing),
                                       (float(origin[0]), float(origin[1]), float(z0))))
    return CropStack(tuple(crops))


def model_grid(volume: Volume, prep: dict[str, Any]) -> ModelGrid:
    """The model grid for ``volume``: card spacing and in-plane size, centred, covering its S extent."""
    spacing = np.asarray(prep["spacing_mm"], dtype=np.float64)
    nx, ny = (int(v) for v in prep["in_plane_size"])
    image = volume.to_sitk()
    corners = []
    size = image.GetSize()
    for ci in (0, size[0] - 1):
        for cj in (0, size[1] - 1):
            for ck in (0, size[2] - 1):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((ci, cj, ck)))
    corners = np.asarray(corners)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    centre = (lo + hi) / 2
    nz = max(1, int(round((hi[2] - lo[2]) / spacing[2])) + 1)
    n = np.array([nx, ny, nz], dtype=np.float64)
    origin = centre - (n - 1) / 2 * spacing
    return ModelGrid((nx, ny, nz), tuple(float(s) for s in spacing), tuple(float(o) for o in origin))


def _resample(image: sitk.Image, reference: sitk.Image, linear: bool, outside: float = 0.0) -> sitk.Image:
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.Resample(image, reference, sitk.Transform(), interp, float(outside), sitk.sitkFloat32)


def _antialias(image: sitk.Image, target_spacing: np.ndarray) -> sitk.Image:
    """Gaussian pre-filter so downsampling does not alias noise (sigma 0.4 x target spacing)."""
    src = np.asarray(image.GetSpacing())
    sigma = np.where(target_spacing.max() > src * 1.01, 0.4 * target_spacing.max(), 0.0)
    if not np.any(sigma > 0):
        return image
    return sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), [float(s) if s > 0 else 1e-3 for s in sigma])


Grid = ModelGrid | CropStack


def _grids(grid: Grid) -> tuple[ModelGrid, ...]:
    return grid.crops if isinstance(grid, CropStack) else (grid,)


def to_model_space(volume: Volume, prep: dict[str, Any], grid: Grid | None = None) -> tuple[np.ndarray, Grid]:
    """Resample + intensity-normalise: returns slices (N, H, W) float32 in model units and the grid
    (a :class:`CropStack`'s crops stacked slice-wise)."""
    grid = grid or model_grid(volume, prep)
    image = volume.to_sitk()
    if prep.get("antialias", True):
        image = _antialias(image, np.asarray(grid.spacing))
    out = np.concatenate([sitk.GetArrayFromImage(_resample(image, g.reference_image(), linear=True))
                          for g in _grids(grid)])
    return normalise_intensity(out, prep), grid


def mask_to_model_space(mask: Volume, grid: Grid) -> np.ndarray:
    """Fraction of each model pixel covered by a binary mask (linear resampling, no smoothing)."""
    image = mask.with_voxels((mask.voxels > 0).astype(np.float32)).to_sitk()
    return np.concatenate([sitk.GetArrayFromImage(_resample(image, g.reference_image(), linear=True))
                           for g in _grids(grid)])


def normalise_intensity(values: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """(v - offset) / scale, clipped to the card's range: the intensity space the model was trained in."""
    spec = prep["intensity"]
    out = (values.astype(np.float32) - float(spec.get("offset", 0.0))) / float(spec["scale"])
    lo, hi = spec.get("clip", (None, None)) or (None, None)
    if lo is not None or hi is not None:
        out = np.clip(out, lo, hi)
    return out.astype(np.float32)


def model_units_to_input(diff: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """A *difference* in model units back to input units (scale only; offsets cancel)."""
    return (diff * float(prep["intensity"]["scale"])).astype(np.float32)


def model_values_to_input(values: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    spec = prep["intensity"]
    return (values * float(spec["scale"]) + float(spec.get("offset", 0.0))).astype(np.float32)


def from_model_space(array: np.ndarray, grid: Grid, reference: Volume, linear: bool = True) -> Volume:
    """Resample a model-space array (N, H, W) back onto ``reference``'s exact grid.

    A :class:`CropStack`'s crops each go back by physical coordinates; where crops overlap their
    values are averaged, and voxels no crop covers are NaN (the caller fills them: heat 0, the input).
    """
    if array.shape != (grid.size[2], grid.size[1], grid.size[0]):
        raise VolumeError(f"model-space array {array.shape} does not match its grid {grid.size[::-1]}.")
    target = reference.to_sitk()
    if not isinstance(grid, CropStack):
        back = sitk.GetArrayFromImage(_resample(_model_image(array, grid), target, linear=linear))
        return reference.with_voxels(back.astype(np.float32))
    total = count = None
    for g, (a, b) in zip(grid.crops, grid.bounds()):
        back = sitk.GetArrayFromImage(_resample(_model_image(array[a:b], g), target, linear=linear, outside=np.nan))
        inside = np.isfinite(back)
        if total is None:
            total, count = np.zeros(back.shape, np.float64), np.zeros(back.shape, np.int32)
        total[inside] += back[inside]
        count += inside
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return reference.with_voxels(out.astype(np.float32))


def _model_image(array: np.ndarray, grid: ModelGrid) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(grid.reference_image())
    return image
