"""The methods, all with the same shape (see :class:`.base.SliceMethod`), and the model loader.

A method object wraps a loaded network and its model card; ``run(volume, ...)`` returns a
:class:`..pipeline.MethodResult` (heat map and optional counterfactual on the input's exact grid).
:func:`load_checkpoint` is the one entry point from a file to a ready method object.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..card import CheckpointError
from ..checkpoint import existing_file, read_card
from ..networks import load_weights
from ..reference_import import REFERENCE_SUFFIXES, convert_reference_checkpoint
from .base import SliceMethod
from .igconda import IgcondaModel

#: method name in a model card -> the class implementing it
METHOD_CLASSES: dict[str, type[SliceMethod]] = {"igconda": IgcondaModel}


def method_class(name: str) -> type[SliceMethod]:
    """The class implementing the method a model card names."""
    if name not in METHOD_CLASSES:
        raise CheckpointError(f"method {name!r} is not available in this version of DiffusionAnomaly "
                              f"(available: {', '.join(METHOD_CLASSES)}).")
    return METHOD_CLASSES[name]


def load_checkpoint(path: str | Path, device: str = "auto", precision: str = "fp32") -> SliceMethod:
    """Load a checkpoint and return the method object its card names (e.g. an IgCONDA model).

    ``precision``: 'fp32' (default; the reference arithmetic), 'bf16' or 'auto' (bf16 on CPUs
    with native bf16, about twice as fast there); see :func:`..networks.pick_precision`.
    Accepts the project's ``.safetensors`` format, and an IgCONDA-PET reference ``.pth``
    (converted in memory with weights-only unpickling; see :mod:`..reference_import`).
    """
    path = existing_file(path)
    if path.suffix.lower() in REFERENCE_SUFFIXES:
        model, card = convert_reference_checkpoint(path)
    else:
        card = read_card(path)
        model = load_weights(path, card)
    return method_class(card["method"])(model, copy.deepcopy(card), device=device, source=str(path),
                                        precision=precision)


__all__ = ["METHOD_CLASSES", "load_checkpoint", "method_class"]
