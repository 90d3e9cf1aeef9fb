"""The methods, all with the same shape (see :class:`.base.SliceMethod`), and the model loader.

A method object wraps a loaded network and its model card; ``run(volume, ...)`` returns a
:class:`..pipeline.MethodResult` (heat map and optional counterfactual on the input's exact grid).
:func:`load_checkpoint` is the one entry point from a file to a ready method object.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..card import CheckpointError, check_analysis_model
from ..checkpoint import existing_file, read_card
from ..networks import load_weights
from ..reference_import import REFERENCE_SUFFIXES, convert_reference_checkpoint
from .base import SliceMethod
from .cdm import CdmModel
from .igconda import IgcondaModel

#: method name -> the class implementing it
METHOD_CLASSES: dict[str, type[SliceMethod]] = {"igconda": IgcondaModel, "cdm": CdmModel}

#: a card's method (what its network was trained for) -> the methods that network can run, its own first:
#: CDM uses the conditional IgCONDA-PET network (METHODS.md section 3)
METHODS_SERVED: dict[str, tuple[str, ...]] = {"igconda": ("igconda", "cdm"), "cdm": ("cdm",)}


def method_class(name: str) -> type[SliceMethod]:
    """The class implementing the method a model card names."""
    if name not in METHOD_CLASSES:
        raise CheckpointError(f"method {name!r} is not available in this version of DiffusionAnomaly "
                              f"(available: {', '.join(METHOD_CLASSES)}).")
    return METHOD_CLASSES[name]


def served_method(card: dict, method: str | None = None) -> str:
    """The method to run with a checkpoint of ``card``: ``method``, or the card's own when None.

    Refuses, in one sentence, a method the checkpoint's network cannot serve.
    """
    own = check_analysis_model(card, f"model {card['id']}")["method"]
    if method is None:
        return own
    method_class(method)
    served = METHODS_SERVED.get(own, (own,))
    if method not in served:
        raise CheckpointError(f"model {card['id']} (a {own} network) cannot run method {method!r}; "
                              f"it can run: {', '.join(served)}.")
    return method


def load_checkpoint(path: str | Path, device: str = "auto", precision: str = "fp32",
                    method: str | None = None) -> SliceMethod:
    """Load a checkpoint and return the object of ``method`` (None: the method its card names, e.g. IgCONDA).

    ``method`` may name another method the checkpoint's network can serve (:data:`METHODS_SERVED`:
    ``"cdm"`` with an IgCONDA-PET checkpoint); anything else is refused before the weights are read.

    ``precision``: 'fp32' (default; the reference arithmetic), 'bf16' or 'auto' (bf16 on CPUs
    with native bf16, about twice as fast there); see :func:`..networks.pick_precision`.
    Accepts the project's ``.safetensors`` format, and an IgCONDA-PET reference ``.pth``
    (converted in memory with weights-only unpickling; see :mod:`..reference_import`).
    """
    path = existing_file(path)
    if path.suffix.lower() in REFERENCE_SUFFIXES:
        model, card = convert_reference_checkpoint(path)
        name = served_method(card, method)
    else:
        card = read_card(path)
        name = served_method(card, method)
        model = load_weights(path, card)
    return method_class(name)(model, copy.deepcopy(card), device=device, source=str(path), precision=precision)


__all__ = ["METHODS_SERVED", "METHOD_CLASSES", "load_checkpoint", "method_class", "served_method"]
