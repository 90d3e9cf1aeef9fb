"""What every method shares: input checks, model-space round trip, result type, cache."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..diffusion import Cancelled, Progress
from ..networks import pick_device, pick_precision
from ..preprocessing import ModelGrid, from_model_space, model_units_to_input, model_values_to_input, to_model_space
from ..volume import Volume, VolumeError, validate_volume

MODALITY_NAMES = {"PT": "PET", "CT": "CT"}


@dataclass
class MethodResult:
    """Outputs of one run, on the input's exact grid, plus what evaluation needs in model space."""

    heatmap: Volume
    counterfactual: Volume | None
    model_input: np.ndarray  # (N, H, W) model units
    model_counterfactual: np.ndarray | None
    model_heat: np.ndarray  # (N, H, W) model units
    grid: ModelGrid
    parameters: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    network_evaluations: int = 0
    compute: dict[str, str] = field(default_factory=dict)  # device and arithmetic precision used


def check_modality(volume: Volume, card: dict[str, Any]) -> None:
    """Refuse an input whose modality differs from the card's, with a sentence saying why."""
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


def array_key(*parts: Any) -> str:
    """A cache key from arrays and plain values (content hash, so equal inputs share cache entries)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.shape).encode() + str(p.dtype).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


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
        self.device = pick_device(device)
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

    def prepare(self, volume: Volume) -> tuple[np.ndarray, ModelGrid]:
        validate_volume(volume)
        check_modality(volume, self.card)
        return to_model_space(volume, self.card["preprocessing"])

    def to_input_grid(self, heat: np.ndarray, cf: np.ndarray | None, grid: ModelGrid, volume: Volume):
        prep = self.card["preprocessing"]
        heat_vol = from_model_space(model_units_to_input(heat, prep), grid, volume)
        heat_vol.voxels = np.clip(heat_vol.voxels, 0, None)
        heat_vol.units = f"|{volume.units or 'intensity'} difference|"
        cf_vol = None
        if cf is not None:
            cf_vol = from_model_space(model_values_to_input(cf, prep), grid, volume)
        return heat_vol, cf_vol


def check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")


def report(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(float(min(max(fraction, 0.0), 1.0)), message)


def timer() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


__all__ = ["MethodResult", "SliceMethod", "CheckpointError", "check_modality", "array_key", "check_cancel", "report", "timer"]
