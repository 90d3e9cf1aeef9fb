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
from .volume import Volume, VolumeError


def check_modality(volume: Volume, card: dict[str, Any]) -> None:
    """Refuse an input whose modality or units differ from what the card's model was trained on."""
    want = card["modality"]
    have = volume.modality
    if have in MODALITY_NAMES and have != want:
        raise VolumeError(
            f"this model ({card['id']}) was trained on {MODALITY_NAMES[want]} but the input is "
            f"{MODALITY_NAMES[have]}; choose a {MODALITY_NAMES[have]} model or the matching scan."
        )
    vmin = float(np.nanmin(volume.voxels))
    if want == "PT" and vmin < -50:
        raise VolumeError(
            f"the input has strongly negative values (minimum {vmin:.0f}), which looks like CT in HU, "
            f"but model {card['id']} expects PET in SUV; choose a CT model or a PET scan."
        )
    units = (volume.units or "").upper()
    if want == "PT" and units and not units.startswith("SUV"):
        raise VolumeError(
            f"the PET input is in {volume.units}, but model {card['id']} expects body-weight SUV; "
            "load it from DICOM (converted to SUV automatically) or give an SUV factor."
        )


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


def _resample(image: sitk.Image, reference: sitk.Image, linear: bool) -> sitk.Image:
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.Resample(image, reference, sitk.Transform(), interp, 0.0, sitk.sitkFloat32)


def _antialias(image: sitk.Image, target_spacing: np.ndarray) -> sitk.Image:
    """Gaussian pre-filter so downsampling does not alias noise (sigma 0.4 x target spacing)."""
    src = np.asarray(image.GetSpacing())
    sigma = np.where(target_spacing.max() > src * 1.01, 0.4 * target_spacing.max(), 0.0)
    if not np.any(sigma > 0):
        return image
    return sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), [float(s) if s > 0 else 1e-3 for s in sigma])


def to_model_space(volume: Volume, prep: dict[str, Any], grid: ModelGrid | None = None) -> tuple[np.ndarray, ModelGrid]:
    """Resample + intensity-normalise: returns slices (N, H, W) float32 in model units and the grid."""
    grid = grid or model_grid(volume, prep)
    image = volume.to_sitk()
    if prep.get("antialias", True):
        image = _antialias(image, np.asarray(grid.spacing))
    out = sitk.GetArrayFromImage(_resample(image, grid.reference_image(), linear=True))
    return normalise_intensity(out, prep), grid


def mask_to_model_space(mask: Volume, grid: ModelGrid) -> np.ndarray:
    """Fraction of each model pixel covered by a binary mask (linear resampling, no smoothing)."""
    image = mask.with_voxels((mask.voxels > 0).astype(np.float32)).to_sitk()
    return sitk.GetArrayFromImage(_resample(image, grid.reference_image(), linear=True))


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


def from_model_space(array: np.ndarray, grid: ModelGrid, reference: Volume, linear: bool = True) -> Volume:
    """Resample a model-space array (N, H, W) back onto ``reference``'s exact grid."""
    if array.shape != (grid.size[2], grid.size[1], grid.size[0]):
        raise VolumeError(f"model-space array {array.shape} does not match its grid {grid.size[::-1]}.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    ref = grid.reference_image()
    image.CopyInformation(ref)
    target = reference.to_sitk()
    back = sitk.GetArrayFromImage(_resample(image, target, linear=linear))
    return reference.with_voxels(back.astype(np.float32))
