"""The methods, all with the same shape (see :class:`.base.SliceMethod`), and the model loader.

A method object wraps a loaded network, its model card and, for the classifier-guided methods, a
noise-conditioned classifier (:class:`.guidance.Guidance`); ``run(volume, ...)`` returns a
:class:`..pipeline.MethodResult` (heat map and optional counterfactual on the input's exact grid).
:func:`load_checkpoint` is the one entry point from files to a ready method object; which methods a
checkpoint's network serves is :func:`..method_catalog.methods_for_network`.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..card import CheckpointError
from ..checkpoint import bundled_classifier, check_classifier_fits, existing_file, read_card
from ..method_catalog import method_spec, served_method
from ..networks import load_weights
from ..reference_import import REFERENCE_SUFFIXES, convert_reference_checkpoint
from .base import SliceMethod, no_classifier_taken
from .cdm import CdmModel, CgCdmModel
from .guidance import Guidance
from .guided import CgDdimModel, CgDdpmModel
from .igconda import IgcondaModel

#: method name (:data:`..method_catalog.METHODS`) -> the class implementing it
METHOD_CLASSES: dict[str, type[SliceMethod]] = {cls.method: cls for cls in (
    IgcondaModel, CgDdimModel, CgDdpmModel, CdmModel, CgCdmModel)}


def method_class(name: str) -> type[SliceMethod]:
    """The class implementing method ``name``."""
    if name not in METHOD_CLASSES:
        raise CheckpointError(f"method {name!r} is not available in this version of DiffusionAnomaly "
                              f"(available: {', '.join(METHOD_CLASSES)}).")
    return METHOD_CLASSES[name]


def load_checkpoint(path: str | Path, device: str = "auto", precision: str = "fp32", method: str | None = None,
                    classifier: str | Path | None = None) -> SliceMethod:
    """Load a checkpoint and return the object of ``method`` (None: the method its card names, e.g. IgCONDA).

    ``method`` may name another method the checkpoint's network can serve
    (:func:`..method_catalog.methods_for_network`: cg-ddim, cg-ddpm, cdm and cg-cdm with an IgCONDA-PET
    checkpoint); anything else is refused before the weights are read. The classifier-guided methods
    load the noise-conditioned classifier ``classifier`` (None: the bundled one that fits,
    :func:`..checkpoint.bundled_classifier`), its card checked against the model's before any weights
    load; a classifier given to a method that uses none is refused.

    ``precision``: 'fp32' (default; the reference arithmetic), 'bf16' or 'auto' (bf16 on CPUs
    with native bf16, about twice as fast there); see :func:`..networks.pick_precision`.
    Accepts the project's ``.safetensors`` format, and an IgCONDA-PET reference ``.pth``
    (converted in memory with weights-only unpickling; see :mod:`..reference_import`).
    """
    path = existing_file(path)
    if classifier is not None and method in METHOD_CLASSES and not method_spec(method).classifier:
        raise CheckpointError(no_classifier_taken(method))  # before a reference checkpoint is converted
    reference = path.suffix.lower() in REFERENCE_SUFFIXES
    if reference:
        model, card = convert_reference_checkpoint(path)
    else:
        card = read_card(path)
    name = served_method(card, method)
    spec = method_spec(name)
    if classifier is not None and not spec.classifier:
        raise CheckpointError(no_classifier_taken(name))
    classifier_path = classifier_card = guidance = None
    if spec.classifier:
        classifier_path = existing_file(classifier) if classifier is not None else bundled_classifier(card)
        classifier_card = read_card(classifier_path)
        check_classifier_fits(card, classifier_card, f"the classifier {classifier_path.name}")
    if not reference:
        model = load_weights(path, card)
    if classifier_path is not None:
        guidance = Guidance(load_weights(classifier_path, classifier_card), classifier_card, device=device,
                            precision=precision, source=str(classifier_path))
    return method_class(name)(model, copy.deepcopy(card), device=device, source=str(path), precision=precision,
                              classifier=guidance)


__all__ = ["METHOD_CLASSES", "load_checkpoint", "method_class", "served_method"]
