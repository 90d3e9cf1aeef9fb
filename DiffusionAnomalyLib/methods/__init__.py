"""One module per method, all with the same shape (see :class:`.base.SliceMethod`).

A method object wraps a loaded network and its model card; ``run(volume, ...)`` returns a
:class:`.base.MethodResult` (heat map and optional counterfactual on the input's exact grid).
"""

from __future__ import annotations


def method_class(name: str):
    """The class implementing the method a model card names."""
    if name == "igconda":
        from .igconda import IgcondaModel

        return IgcondaModel
    from ..checkpoint import CheckpointError

    raise CheckpointError(
        f"method {name!r} is not available in this version of DiffusionAnomaly (available: igconda)."
    )
