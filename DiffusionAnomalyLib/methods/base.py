"""What every slice-wise method shares: device and precision, parameters, the model-space round trip,
the case cache and :meth:`SliceMethod.run` (one interface for every method, METHODS.md)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abc import ABC, abstractmethod

import numpy as np
import torch

from ..card import CheckpointError, Steps
from ..checkpoint import check_classifier_fits
from ..diffusion import DDIM, memory_batch_size, timestep_grid
from ..method_catalog import METHODS, method_spec, resolve_parameters
from ..networks import pick_device, pick_precision
from ..pipeline import MethodResult
from ..preprocessing import (CropStack, Grid, ModelGrid, check_modality, crop_grids, from_model_space, model_grid,
                             model_units_to_input, model_values_to_input, to_model_space)
from ..postprocessing import bounding_box
from ..progress import Cancel, Progress, check_cancel, report, timer
from ..volume import Volume, array_key, validate_volume
from .guidance import Guidance

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


def working_bytes(volume: Volume, grid: Grid) -> int:
    """Estimated peak memory of one run on ``volume`` (resampling in and out plus the model-space arrays)."""
    input_voxels = int(np.prod(np.shape(volume.voxels)[:3], dtype=np.int64))
    model_voxels = int(np.prod(grid.size, dtype=np.int64))
    return 4 * (INPUT_GRID_COPIES * input_voxels + MODEL_GRID_COPIES * model_voxels)


def check_resources(volume: Volume, grid: Grid, evaluations_per_slice: int = 0,
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


@dataclass
class SliceMaps:
    """What a method computes for a batch of model slices (n of them, model units): the heat map, the
    healthy counterfactual (None for the methods that make none) and the guidance classifier's
    p(unhealthy | slice) at t = 0 (None without a classifier). Cached objects: do not modify."""

    heat: np.ndarray  # (n, H, W)
    counterfactual: np.ndarray | None = None  # (n, H, W)
    confidence: np.ndarray | None = None  # (n,)


class SliceMethod(ABC):
    """Base for 2D slice-wise methods: the network, device, counters, the case cache, the parameters
    (:mod:`..method_catalog`), :meth:`compute` (cached) and :meth:`run`; a method writes :meth:`maps` and
    :meth:`evaluations_per_slice`.

    ``classifier``: a :class:`.guidance.Guidance` for the methods whose catalog record needs one
    (checked against the model card by :func:`..checkpoint.check_classifier_fits`), None otherwise.
    """

    #: the method's name in :data:`..method_catalog.METHODS` (a checkpoint's card keeps the name of the method
    #: its network was trained for)
    method: str = ""

    def __init__(self, model: torch.nn.Module, card: dict[str, Any], device: str = "auto", source: str | None = None,
                 precision: str = "fp32", classifier: Guidance | None = None):
        self.card = card
        self.source = source
        self.spec = method_spec(self.method)
        if classifier is not None and not self.spec.classifier:
            raise CheckpointError(no_classifier_taken(self.method))
        if classifier is None and self.spec.classifier:
            raise CheckpointError(f"method {self.method} needs a noise-conditioned classifier; train one with "
                                  "'diffusion-anomaly train --method classifier' and give it with --classifier.")
        if classifier is not None:
            check_classifier_fits(card, classifier.card, f"the classifier {Path(classifier.source or '').name}".strip())
        self.classifier = classifier
        self.device = pick_device(device)  # a device that is not there: a ValueError sentence
        self.precision = pick_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.network_evaluations = 0  # images passed through the network (for tests and benchmarks)
        # maps and latents of recent (slices, parameter) pairs: a 64 x 64 x 120 case is ~2 MB each, so a
        # few dozen entries let slider moves back and forth stay free.
        self.cache = LRU(capacity=32)
        self.ddim = DDIM(card["scheduler"])
        labels = card["labels"]
        self.null_label = int(labels.get("null", 0))
        self.healthy_label = int(labels.get("healthy", 1))
        self.unhealthy_label = int(labels.get("unhealthy", 2))
        try:  # the card's defaults against what its schedule allows: refused at load, not at the first run
            self.resolve()
        except ValueError as exc:
            raise CheckpointError(f"model {card['id']}: {exc}") from None

    # ---- parameters -------------------------------------------------------------------------
    def resolve(self, **given: Any) -> dict[str, Any]:
        """The parameters of a run, checked: each one given, or its default when None or absent
        (:func:`..method_catalog.resolve_parameters`: the method's built-in defaults, overridden by the
        model card). A name the method does not take is refused; a number may come as text ("20", not
        "20.7"), never rounded. Raises ValueError with one sentence and the valid range; changes nothing.
        """
        return resolve_parameters(self.method, given, self.card, self.ddim.max_noise_level)

    @abstractmethod
    def evaluations_per_slice(self, params: dict[str, Any], guidance_values: int = 1) -> int:
        """Network evaluations a model slice costs with resolved ``params``; ``guidance_values``: how many values
        of the method's guidance parameter (:attr:`MethodSpec.guidance`) are computed, as a sweep does."""

    @property
    def classifier_evaluations(self) -> int:
        """Images passed through the guidance classifier so far (0 without one)."""
        return 0 if self.classifier is None else self.classifier.classifier_evaluations

    # ---- the per-slice work -----------------------------------------------------------------
    def compute(self, images: np.ndarray, slice_ids: np.ndarray, params: dict[str, Any],
                progress: Progress | None = None, cancel: Cancel | None = None,
                timings: dict[str, float] | None = None) -> SliceMaps:
        """The maps of model slices ``images`` (n, H, W) float32 in model units, whose model slice indices are
        ``slice_ids`` (n,) (the random noise of a slice derives from its index), with resolved ``params``.

        Cached by the slices (:meth:`slice_key`) and every parameter, so an identical repeat does no
        network or classifier work; the classifier's confidence is cached by the slices alone, and a
        method may keep more (the DDIM methods' inverted latents), so that a parameter change recomputes
        what its :attr:`Parameter.recompute` says. ``timings`` receives the seconds of the stages that ran.
        """
        timings = {} if timings is None else timings
        images = np.asarray(images, dtype=np.float32)
        slice_ids = np.asarray(slice_ids, dtype=np.int64)
        case = self.slice_key(images, slice_ids)
        key = ("maps", case) + tuple(params[name] for name in self.spec.parameter_names)
        maps = self.cache.get_item(key)
        if maps is None:
            confidence = None if self.classifier is None else self.confidence(images, case, cancel, timings)
            heat, counterfactual = self.maps(images, slice_ids, case, params, progress, cancel, timings)
            maps = SliceMaps(heat, counterfactual, confidence)
            self.cache.put(key, maps)
        return maps

    @abstractmethod
    def maps(self, images: np.ndarray, slice_ids: np.ndarray, case: str, params: dict[str, Any],
             progress: Progress | None, cancel: Cancel | None,
             timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray | None]:
        """The method's work for :meth:`compute` (not cached there yet): (heat, counterfactual or None), (n, H, W)."""

    @staticmethod
    def slice_key(images: np.ndarray, slice_ids: np.ndarray) -> str:
        """The cache key of a batch of model slices: their content and their indices."""
        return array_key(np.asarray(images, dtype=np.float32), np.asarray(slice_ids, dtype=np.int64))

    def confidence(self, images: np.ndarray, key: str, cancel: Cancel | None = None,
                   timings: dict[str, float] | None = None) -> np.ndarray:
        """p(unhealthy | slice) at t = 0 of each of ``images`` (the guidance classifier), cached under ``key``."""
        cached = self.cache.get_item(("confidence", key))
        if cached is None:
            check_cancel(cancel)
            clock = timer()
            cached = self.classifier.p_unhealthy(images)
            if timings is not None:
                timings["confidence"] = clock()
            self.cache.put(("confidence", key), cached)
        return cached

    # ---- volumes ----------------------------------------------------------------------------
    def run(self, volume: Volume, *, progress: Progress | None = None, cancel: Cancel | None = None,
            region: np.ndarray | Volume | None = None, **params: Any) -> MethodResult:
        """The method's heat map (and counterfactual) of a volume, back on its exact grid.

        ``params``: the method's parameters (:meth:`resolve`; None or absent = the default), checked
        with the volume before any network work. ``region`` (non-zero voxels on the volume's grid,
        e.g. an organ ROI): only the model slices it needs go through the network
        (:func:`region_slices`); the others keep the input as their counterfactual, heat 0 and
        confidence NaN.
        """
        resolved = self.resolve(**params)
        before = (self.network_evaluations, self.classifier_evaluations)
        timings: dict[str, float] = {}
        x, grid, todo = self.start_run(volume, self.evaluations_per_slice(resolved), region, progress, timings)
        maps = self.compute(x[todo], todo, resolved, (lambda f, m: report(progress, 0.02 + 0.9 * f, m)), cancel,
                            timings)
        heat = np.zeros_like(x)
        heat[todo] = maps.heat
        cf = None
        if maps.counterfactual is not None:
            cf = x.copy()
            cf[todo] = maps.counterfactual
        confidence = None
        if self.classifier is not None:
            confidence = np.full(len(x), np.nan)
            if maps.confidence is not None:
                confidence[todo] = maps.confidence
        return self.finish_run(volume, x, grid, todo, heat, cf, resolved, timings, before, progress,
                               confidence=confidence)

    def heat_units(self, volume: Volume) -> str:
        """The units of the heat map on the input grid: an absolute difference of input intensities (IgCONDA-PET,
        the classifier-guided methods)."""
        return f"|{volume.units or 'intensity'} difference|"

    def plan(self, volume: Volume, evaluations_per_slice: int = 0,
             region: np.ndarray | Volume | None = None) -> tuple[Grid, np.ndarray]:
        """Check ``volume`` (validity, modality, :func:`check_resources`); its model grid and the model
        slices to compute (all of them, or those ``region`` needs: :func:`region_slices`). A card with
        ``preprocessing.crop`` works on crops around the region's organs (:func:`..preprocessing.crop_grids`,
        every crop slice computed) and needs the region.

        ``evaluations_per_slice``: the network evaluations a model slice will cost (0: not known here).
        """
        validate_volume(volume)
        check_modality(volume, self.card)
        prep = self.card["preprocessing"]
        if "crop" in prep:
            arr = None if region is None else np.asarray(region.voxels if isinstance(region, Volume) else region)
            grid = crop_grids(volume, prep, arr)
            todo = np.arange(grid.size[2])
        else:
            grid = model_grid(volume, prep)
            todo = region_slices(region, volume, grid)
        check_resources(volume, grid, evaluations_per_slice, len(todo))
        return grid, todo

    def prepare(self, volume: Volume, evaluations_per_slice: int = 0,
                region: np.ndarray | Volume | None = None) -> tuple[np.ndarray, Grid]:
        """:meth:`plan` for the whole volume (a crop card: the crops of ``region``), then resample it into model space."""
        grid, _ = self.plan(volume, evaluations_per_slice, region)
        return to_model_space(volume, self.card["preprocessing"], grid)

    # ---- what every run does first and last, and the one network call ---------------------------
    def start_run(self, volume: Volume, evaluations_per_slice: int, region: np.ndarray | Volume | None,
                  progress: Progress | None, timings: dict[str, float]) -> tuple[np.ndarray, Grid, np.ndarray]:
        """:meth:`plan` (every check before any network work), then the volume in model space: (x, grid, the
        model slices to compute)."""
        clock = timer()
        report(progress, 0.0, "preprocessing")
        grid, todo = self.plan(volume, evaluations_per_slice, region)
        x, grid = to_model_space(volume, self.card["preprocessing"], grid)
        timings["preprocess"] = clock()
        return x, grid, todo

    def finish_run(self, volume: Volume, x: np.ndarray, grid: Grid, todo: np.ndarray, heat: np.ndarray,
                   cf: np.ndarray | None, params: dict[str, Any], timings: dict[str, float],
                   before: tuple[int, int], progress: Progress | None, confidence: np.ndarray | None = None) -> MethodResult:
        """The model-space heat map (and counterfactual) back on the input's exact grid, as a :class:`MethodResult`
        (``before``: the network and classifier evaluation counters when the run started)."""
        clock = timer()
        report(progress, 0.93, "resampling onto the input grid")
        heat_vol, cf_vol = self.to_input_grid(heat, cf, grid, volume)
        timings["postprocess"] = clock()
        report(progress, 1.0, "done")
        compute = {"device": str(self.device), "precision": self.precision}
        return MethodResult(
            heatmap=heat_vol, counterfactual=cf_vol, model_input=x, model_counterfactual=cf, model_heat=heat,
            grid=grid, parameters=params, timings=timings, network_evaluations=self.network_evaluations - before[0],
            computed_slices=len(todo), compute=compute, method=self.method,
            classifier_evaluations=self.classifier_evaluations - before[1], classifier_confidence=confidence,
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

    def _eps(self, x: torch.Tensor, t: int, labels: torch.Tensor) -> torch.Tensor:
        """:meth:`eps` with class ``labels`` (n,) as the condition."""
        return self.eps(x, t, self.model.context(labels))

    def _labels(self, n: int, label: int) -> torch.Tensor:
        return torch.full((n,), label, device=self.device, dtype=torch.long)

    def guided(self, eps: torch.Tensor, x: torch.Tensor, t: int, scale: float, label: int | torch.Tensor) -> torch.Tensor:
        """Classifier guidance of a noise estimate: eps - s sqrt(1 - abar_t) grad_x log C(label | x_t, t)
        (Dhariwal and Nichol's score form, Wolleb's ``condition_score``); ``eps`` itself when s = 0."""
        if scale == 0:
            return eps
        grad = self.classifier.grad_log_prob(x, t, label)
        return eps - (scale * (1.0 - self.ddim.abar[t]) ** 0.5) * grad

    def to_input_grid(self, heat: np.ndarray, cf: np.ndarray | None, grid: Grid, volume: Volume):
        """Heat map and counterfactual on the input's grid; outside a :class:`CropStack`'s crops the heat is 0 and
        the counterfactual is the input."""
        prep = self.card["preprocessing"]
        heat_vol = from_model_space(model_units_to_input(heat, prep), grid, volume)
        heat_vol.voxels = np.clip(np.nan_to_num(heat_vol.voxels, nan=0.0), 0, None)
        heat_vol.units = self.heat_units(volume)
        cf_vol = None
        if cf is not None:
            cf_vol = from_model_space(model_values_to_input(cf, prep), grid, volume)
            if isinstance(grid, CropStack):
                outside = ~np.isfinite(cf_vol.voxels)
                cf_vol.voxels[outside] = np.asarray(volume.voxels, dtype=np.float32)[outside]
        return heat_vol, cf_vol


class DdimCounterfactual(SliceMethod):
    """The methods that DDIM-invert the input to the noise level D unguided (the network's null label), then
    decode it guided towards 'healthy' (IgCONDA-PET, CG-DDIM): map = |input - counterfactual|.

    The inverted latents are cached by (slices, D, steps), so a change of :attr:`scale_parameter` only
    re-decodes (:data:`..method_catalog.RECOMPUTE_DECODE`). A subclass writes :meth:`decode_eps`.
    """

    #: the parameter steering the decoding (a change re-decodes only), its symbol, and the network evaluations
    #: of one decoding move
    scale_parameter = ""
    scale_symbol = ""
    decode_evaluations = 1

    @abstractmethod
    def decode_eps(self, x: torch.Tensor, t: int, scale: float) -> torch.Tensor:
        """The guided noise estimate of a decoding move from timestep ``t``."""

    def walk(self, images: torch.Tensor, moves: list[tuple[int, int]], steps: Steps, eps_of, message: str,
             progress: Progress | None, cancel: Cancel | None) -> torch.Tensor:
        """``images`` (B, 1, H, W) moved by DDIM along ``moves`` ((t_from, t_to) pairs of the grid of ``steps``),
        in batches, with the noise estimate ``eps_of(x, t_from)``."""
        bs = self.batch_size(tuple(images.shape[1:]))
        out = []
        total = max(1, len(moves) * len(images))
        done = 0
        for start in range(0, len(images), bs):
            x = images[start : start + bs].to(self.device, torch.float32)
            for t_from, t_to in moves:
                check_cancel(cancel)
                x = self.ddim.move(x, eps_of(x, t_from), t_from, t_to, steps)
                done += len(x)
                report(progress, done / total, message)
            out.append(x.cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, noise_level: int, steps: Steps,
               progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
        """DDIM inversion with the unconditional model (the null label) from t = 0 to D.

        ``steps``: an integer K >= 1 or ``"reference"`` (network at t = 0..D-1, MONAI ``reversed_step``).
        """
        grid = timestep_grid(noise_level, steps)
        return self.walk(images, list(zip(grid[:-1], grid[1:])), steps,
                         lambda x, t: self._eps(x, t, self._labels(len(x), self.null_label)),
                         f"encoding to noise level {noise_level}", progress, cancel)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, noise_level: int, scale: float, steps: Steps,
               progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
        """Guided DDIM decoding from D to 0 (:meth:`decode_eps` with ``scale``).

        ``steps``: an integer K >= 1 or ``"reference"`` (network at t = D..1, MONAI ``step``).
        """
        grid = timestep_grid(noise_level, steps)
        scale = float(scale)
        return self.walk(latents, list(zip(grid[:0:-1], grid[-2::-1])), steps,
                         lambda x, t: self.decode_eps(x, t, scale),
                         f"decoding towards healthy ({self.scale_symbol} = {scale:g})", progress, cancel)

    def counterfactual(self, images: torch.Tensor, noise_level: int, scale: float, steps: Steps,
                       progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
        """Healthy counterfactual of ``images`` (B, 1, H, W) in model units, same shape: :meth:`encode`, :meth:`decode`.

        ``steps``: an integer K >= 1 or ``"reference"`` (no "default" here: see :meth:`resolve`).
        """
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, H, W); got {tuple(images.shape)}")
        split = None if progress is None else (lambda f, m: progress(0.5 * f, m))
        latents = self.encode(images, noise_level, steps, split, cancel)
        split = None if progress is None else (lambda f, m: progress(0.5 + 0.5 * f, m))
        return self.decode(latents, noise_level, scale, steps, split, cancel)

    def evaluations_per_slice(self, params: dict[str, Any], guidance_values: int = 1) -> int:
        """Network evaluations a model slice costs with resolved ``params``: one encode, and a decode for each of
        ``guidance_values`` scales (a sweep decodes several from the same latents)."""
        moves = len(timestep_grid(params["noise_level"], params["steps"])) - 1
        return moves * (1 + self.decode_evaluations * guidance_values)

    def maps(self, images, slice_ids, case, params, progress, cancel, timings):
        """|input - counterfactual| and the counterfactual, from the cached latents when only the scale changed."""
        enc_key = ("latent", case, params["noise_level"], params["steps"])
        latents = self.cache.get_item(enc_key)
        if latents is None:
            clock = timer()
            latents = self.encode(torch.from_numpy(images).unsqueeze(1), params["noise_level"], params["steps"],
                                  (lambda f, m: report(progress, 0.5 * f, m)), cancel)
            timings["encode"] = clock()
            self.cache.put(enc_key, latents)
        clock = timer()
        cf = self.decode(latents, params["noise_level"], params[self.scale_parameter], params["steps"],
                         (lambda f, m: report(progress, 0.5 + 0.5 * f, m)), cancel)
        timings["decode"] = clock()
        cf = cf.squeeze(1).numpy()
        return np.abs(images - cf), cf


def no_classifier_taken(method: str) -> str:
    """The sentence refusing a classifier given to a method that uses none."""
    takers = [name for name, spec in METHODS.items() if spec.classifier]
    return f"method {method} uses no classifier (only {', '.join(takers)} do); leave the classifier out."


__all__ = ["INPUT_GRID_COPIES", "LRU", "MAX_MODEL_SLICES", "MAX_NETWORK_EVALUATIONS", "MAX_WORKING_BYTES",
           "MODEL_GRID_COPIES", "DdimCounterfactual", "SliceMaps", "SliceMethod", "check_evaluations", "check_resources",
           "no_classifier_taken", "region_slices", "working_bytes"]
