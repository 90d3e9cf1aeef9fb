"""What every slice-wise method shares: device and precision, the model-space round trip, the case cache."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..networks import pick_device, pick_precision
from ..preprocessing import (ModelGrid, check_modality, from_model_space, model_units_to_input, model_values_to_input,
                             to_model_space)
from ..volume import Volume, validate_volume


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


__all__ = ["LRU", "SliceMethod"]
