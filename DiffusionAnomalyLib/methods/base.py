"""What every slice-wise method shares: device and precision, the model-space round trip, the case cache."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..diffusion import memory_batch_size
from ..networks import pick_device, pick_precision
from ..pipeline import MethodResult
from ..preprocessing import (ModelGrid, check_modality, from_model_space, model_grid, model_units_to_input,
                             model_values_to_input, to_model_space)
from ..postprocessing import bounding_box
from ..progress import Progress, report, timer
from ..volume import Volume, validate_volume

#: Most model slices a run may have: 2 m of body at 1 mm (a large input slice spacing can ask for metres).
MAX_MODEL_SLICES = 2000

#: Most memory a run's arrays may take (:func:`working_bytes`): what a workstation has free.
MAX_WORKING_BYTES = 16 * 2**30

#: Most network evaluations a run may make: hours on a CPU (a 2 m body, reference loop, D = 400, 6 mm: 0.4 M).
MAX_NETWORK_EVALUATIONS = 2_000_000

#: float32 copies of the input grid a run holds: SimpleITK copy, cast, anti-aliased copy; heat map, counterfactual (x2).
INPUT_GRID_COPIES = 7

#: float32 copies of the model grid a run holds: resampled, normalised, batch, latents, counterfactual, heat, 2 cached.
MODEL_GRID_COPIES = 8


def working_bytes(volume: Volume, grid: ModelGrid) -> int:
    """Estimated peak memory of one run on ``volume`` (resampling in and out plus the model-space arrays)."""
    input_voxels = int(np.prod(np.shape(volume.voxels)[:3], dtype=np.int64))
    model_voxels = int(np.prod(grid.size, dtype=np.int64))
    return 4 * (INPUT_GRID_COPIES * input_voxels + MODEL_GRID_COPIES * model_voxels)


def check_resources(volume: Volume, grid: ModelGrid, evaluations_per_slice: int = 0,
                    computed_slices: int | None = None) -> None:
    """Refuse a run whose model grid would need too many slices, too much memory or network evaluations.

    The input voxel limit bounds the input grid only; this bounds what will actually be computed
    (``computed_slices``: the model slices that go through the network, default all of them).
    """
    slices = int(grid.size[2])
    advice = "crop it to the region of interest or resample it to a coarser grid first"
    if slices > MAX_MODEL_SLICES:
        extent = slices * grid.spacing[2]
        raise ValueError(f"this volume would need {slices:,} model slices (at most {MAX_MODEL_SLICES:,}): it spans "
                         f"{extent:,.0f} mm along the body axis at the model's {grid.spacing[2]:g} mm slices; "
                         f"check its slice spacing, or {advice}.")
    needed = working_bytes(volume, grid)
    if needed > MAX_WORKING_BYTES:
        raise ValueError(f"this volume would need about {needed / 2**30:.3g} GiB of memory "
                         f"(at most {MAX_WORKING_BYTES / 2**30:.3g} GiB): {advice}.")
    computed = slices if computed_slices is None else int(computed_slices)
    check_evaluations(computed * int(evaluations_per_slice), computed)


def region_slices(region: np.ndarray | Volume | None, volume: Volume, grid: ModelGrid) -> np.ndarray:
    """Indices of the model slices a run must compute for ``region`` (non-zero voxels, ``[k, j, i]`` on
    ``volume``'s grid); every slice when ``region`` is None.

    The model slices on and around the region's physical extent along the body axis (its voxel
    box, corners included, so oblique grids are covered): the heat map goes back to the input grid
    by linear interpolation between model slices, so a region voxel needs the slice below and the
    slice above it. A region with no voxel is refused.
    """
    n = int(grid.size[2])
    if region is None:
        return np.arange(n)
    arr = np.asarray(region.voxels if isinstance(region, Volume) else region)
    if arr.shape != np.shape(volume.voxels)[:3]:
        raise ValueError(f"the region to analyse has shape {arr.shape}, the volume {np.shape(volume.voxels)[:3]}; "
                         "build it on the volume's grid.")
    box = bounding_box(arr != 0)
    if box is None:
        raise ValueError("the region to analyse is empty: choose organs that lie inside the volume.")
    s_min, s_max = volume.ras_box(box)[:, 2]  # RAS S = LPS z, the model grid's slice axis
    first = int(np.floor((s_min - grid.origin[2]) / grid.spacing[2]))
    last = int(np.ceil((s_max - grid.origin[2]) / grid.spacing[2]))
    return np.arange(max(first, 0), min(last, n - 1) + 1)


def check_evaluations(evaluations: int, slices: int) -> None:
    """Refuse work of more than :data:`MAX_NETWORK_EVALUATIONS` network evaluations (on ``slices`` model slices)."""
    if evaluations > MAX_NETWORK_EVALUATIONS:
        raise ValueError(f"these parameters would need {evaluations:,} network evaluations on {slices:,} model slices "
                         f"(at most {MAX_NETWORK_EVALUATIONS:,}): use fewer DDIM steps or a lower noise level, "
                         f"or crop the volume to the region of interest.")


class LRU(OrderedDict):
    """A small least-recently-used cache (bounded, so memory does not grow with slider moves)."""

    def __init__(self, capacity: int = 16):
        super().__init__()
        self.capacity = capacity

    def get_item(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class SliceMethod:
    """Base for 2D slice-wise methods: owns the network, device, counters and the case cache."""

    def __init__(self, model: torch.nn.Module, card: dict[str, Any], device: str = "auto", source: str | None = None,
                 precision: str = "fp32"):
        self.card = card
        self.source = source
        self.device = pick_device(device)  # a device that is not there: a ValueError sentence
        self.precision = pick_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.network_evaluations = 0  # images passed through the network (for tests and benchmarks)
        # latents and counterfactuals of recent (case, parameter) pairs: a 64 x 64 x 120 case is
        # ~2 MB each, so a few dozen entries let slider moves back and forth stay free.
        self.cache = LRU(capacity=32)

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self.card["inference_defaults"])

    def plan(self, volume: Volume, evaluations_per_slice: int = 0,
             region: np.ndarray | Volume | None = None) -> tuple[ModelGrid, np.ndarray]:
        """Check ``volume`` (validity, modality, :func:`check_resources`); its model grid and the model
        slices to compute (all of them, or those ``region`` needs: :func:`region_slices`).

        ``evaluations_per_slice``: the network evaluations a model slice will cost (0: not known here).
        """
        validate_volume(volume)
        check_modality(volume, self.card)
        grid = model_grid(volume, self.card["preprocessing"])
        todo = region_slices(region, volume, grid)
        check_resources(volume, grid, evaluations_per_slice, len(todo))
        return grid, todo

    def prepare(self, volume: Volume, evaluations_per_slice: int = 0) -> tuple[np.ndarray, ModelGrid]:
        """:meth:`plan` for the whole volume, then resample it into model space."""
        grid, _ = self.plan(volume, evaluations_per_slice)
        return to_model_space(volume, self.card["preprocessing"], grid)

    # ---- what every run does first and last, and the one network call ---------------------------
    def start_run(self, volume: Volume, evaluations_per_slice: int, region: np.ndarray | Volume | None,
                  progress: Progress | None, timings: dict[str, float]) -> tuple[np.ndarray, ModelGrid, np.ndarray]:
        """:meth:`plan` (every check before any network work), then the volume in model space: (x, grid, the
        model slices to compute)."""
        clock = timer()
        report(progress, 0.0, "preprocessing")
        grid, todo = self.plan(volume, evaluations_per_slice, region)
        x, grid = to_model_space(volume, self.card["preprocessing"], grid)
        timings["preprocess"] = clock()
        return x, grid, todo

    def finish_run(self, volume: Volume, x: np.ndarray, grid: ModelGrid, todo: np.ndarray, heat: np.ndarray,
                   cf: np.ndarray | None, params: dict[str, Any], timings: dict[str, float], evaluations_before: int,
                   progress: Progress | None, heat_units: str | None = None) -> MethodResult:
        """The model-space heat map (and counterfactual) back on the input's exact grid, as a :class:`MethodResult`."""
        clock = timer()
        report(progress, 0.93, "resampling onto the input grid")
        heat_vol, cf_vol = self.to_input_grid(heat, cf, grid, volume)
        if heat_units is not None:
            heat_vol.units = heat_units
        timings["postprocess"] = clock()
        report(progress, 1.0, "done")
        return MethodResult(
            heatmap=heat_vol, counterfactual=cf_vol, model_input=x, model_counterfactual=cf, model_heat=heat,
            grid=grid, parameters=params, timings=timings,
            network_evaluations=self.network_evaluations - evaluations_before, computed_slices=len(todo),
            compute={"device": str(self.device), "precision": self.precision},
        )

    def batch_size(self, image_shape: tuple[int, ...]) -> int:
        """Slices per network call (a call may carry two conditions per slice): the card's batch size, less
        if memory is short."""
        unet = self.card["network"]["unet"]
        per_image = 4.0 * float(np.prod(image_shape)) * float(unet["channels"][0]) * 24.0 * 2
        return memory_batch_size(per_image, self.device, int(self.card["inference_defaults"].get("batch_size", 32)))

    def eps(self, x: torch.Tensor, t: int, context: torch.Tensor | None) -> torch.Tensor:
        """The network's noise prediction for ``x`` at timestep ``t`` with ``context``, in float32; counted in
        :attr:`network_evaluations` (one per image); bfloat16 autocast when the precision is bf16."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        tt = torch.full((x.shape[0],), int(t), device=self.device, dtype=torch.long)
        self.network_evaluations += int(x.shape[0])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(x, tt, context).float()

    def to_input_grid(self, heat: np.ndarray, cf: np.ndarray | None, grid: ModelGrid, volume: Volume):
        prep = self.card["preprocessing"]
        heat_vol = from_model_space(model_units_to_input(heat, prep), grid, volume)
        heat_vol.voxels = np.clip(heat_vol.voxels, 0, None)
        heat_vol.units = f"|{volume.units or 'intensity'} difference|"
        cf_vol = None
        if cf is not None:
            cf_vol = from_model_space(model_values_to_input(cf, prep), grid, volume)
        return heat_vol, cf_vol


__all__ = ["INPUT_GRID_COPIES", "LRU", "MAX_MODEL_SLICES", "MAX_NETWORK_EVALUATIONS", "MAX_WORKING_BYTES",
           "MODEL_GRID_COPIES", "SliceMethod", "check_evaluations", "check_resources", "region_slices", "working_bytes"]
