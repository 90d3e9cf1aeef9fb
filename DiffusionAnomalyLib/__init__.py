"""DiffusionAnomalyLib: weakly-supervised diffusion-model anomaly detection for PET and CT.

The headless engine of the DiffusionAnomaly 3D Slicer extension. Research software, not for
clinical use. Main entry points::

    from DiffusionAnomalyLib import load_checkpoint, read_volume
    model = load_checkpoint("model.safetensors")
    result = model.run(read_volume("pet.nrrd"))          # heat map + counterfactual on the input grid
    cf = model.counterfactual(images, noise_level=400, guidance_scale=3.0, steps="reference")
"""

from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "load_checkpoint", "read_volume", "write_volume", "Volume"]


def __getattr__(name: str):  # lazy: importing the package does not import torch
    if name == "load_checkpoint":
        from .methods import load_checkpoint

        return load_checkpoint
    if name in ("read_volume", "write_volume", "Volume"):
        from . import volume

        return getattr(volume, name)
    raise AttributeError(name)
