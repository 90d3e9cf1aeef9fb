"""IgCONDA-PET: implicit (classifier-free) guidance counterfactuals (METHODS.md section 1).

1. encode: DDIM-invert the input from t = 0 to the noise level D with the unconditional model;
2. decode: from D to 0, evaluate the unconditional and healthy-conditioned model in one batch,
   eps = eps_u + w (eps_healthy - eps_u), take a DDIM step;
3. anomaly map = |input - counterfactual|  (paper sections 2.3-2.4, eq. 9-10).

``steps`` is an integer K >= 1 (a strided grid of K DDIM moves per direction, :func:`timestep_grid`)
or ``"reference"`` (:data:`REFERENCE_STEPS`): the reference loop exactly, with MONAI's
``DDIMScheduler(clip_sample=False)`` at stride 1 (network at t = 0..D-1 while encoding, t = D..1
while decoding). ``None`` only means "the default" in :meth:`IgcondaModel.resolve` and :meth:`run`.
The inverted latents of a batch of slices are cached, keyed by (slices, D, steps), so a new guidance
scale only re-decodes; the maps are cached by (slices, D, steps, w), so a repeated run with unchanged
parameters does no network work.
"""

from __future__ import annotations

import torch

from ..card import REFERENCE_STEPS, Steps
from ..progress import Cancel, Progress
from .base import DdimCounterfactual


class IgcondaModel(DdimCounterfactual):
    """A loaded IgCONDA-PET model: ``encode``/``decode``/``counterfactual`` on image batches, ``run`` on volumes."""

    method = "igconda"
    scale_parameter = "guidance_scale"
    scale_symbol = "w"
    decode_evaluations = 2  # unconditional and healthy in one batch

    def decode_eps(self, x: torch.Tensor, t: int, scale: float) -> torch.Tensor:
        """eps = eps_u + w (eps_healthy - eps_u): the null and healthy conditions in one batch of 2."""
        n = len(x)
        labels = torch.cat([self._labels(n, self.null_label), self._labels(n, self.healthy_label)])
        eps_u, eps_h = self._eps(torch.cat([x, x]), t, labels).chunk(2)
        return eps_u + scale * (eps_h - eps_u)

    def counterfactual(self, images: torch.Tensor, noise_level: int = 400, guidance_scale: float = 3.0,
                       steps: Steps = REFERENCE_STEPS, progress: Progress | None = None,
                       cancel: Cancel | None = None) -> torch.Tensor:
        """Healthy counterfactual of ``images`` (B, 1, H, W) in model intensity space; same shape
        (:meth:`.base.DdimCounterfactual.counterfactual` with the guidance scale w)."""
        return super().counterfactual(images, noise_level, guidance_scale, steps, progress, cancel)


__all__ = ["IgcondaModel"]
