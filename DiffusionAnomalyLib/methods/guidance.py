"""The noise-conditioned classifier C(y | x_t, t) as the classifier-guided methods use it (METHODS.md section 2).

:class:`Guidance` wraps a loaded :class:`..networks.NoisyClassifier` with its card: the gradient
grad_x log C(y | x_t, t) that steers a trajectory (Wolleb et al.'s ``cond_fn``: log-softmax of the
logits, the chosen class's entry summed over the batch, differentiated with respect to x_t), and
p(unhealthy | x) of the clean slices (t = 0), the per-slice confidence the outputs report. Labels
come from the classifier's card (``labels.healthy`` / ``labels.unhealthy``). Every image through
the classifier is counted in :attr:`Guidance.classifier_evaluations`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion import memory_batch_size
from ..networks import pick_device, pick_precision


class Guidance:
    """A guidance classifier on a device: ``grad_log_prob`` for guidance, ``p_unhealthy`` for the confidence."""

    def __init__(self, model: torch.nn.Module, card: dict[str, Any], device: str = "auto", precision: str = "fp32",
                 source: str | None = None):
        self.card = card
        self.source = source
        self.device = pick_device(device)
        self.precision = pick_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():  # only the input's gradient is ever needed
            p.requires_grad_(False)
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.healthy_label = int(card["labels"]["healthy"])
        self.unhealthy_label = int(card["labels"]["unhealthy"])
        self.classifier_evaluations = 0  # images passed through the classifier (with or without a gradient)

    def _logits(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        tt = torch.full((x.shape[0],), int(t), device=self.device, dtype=torch.long)
        self.classifier_evaluations += int(x.shape[0])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.model(x, tt).float()

    def grad_log_prob(self, x: torch.Tensor, t: int, label: int | torch.Tensor) -> torch.Tensor:
        """grad_x log C(``label`` | x, t) of noised slices ``x`` (n, 1, H, W) at timestep ``t``, float32, same shape.

        ``label``: one class for every slice or a tensor (n,) of classes (the card's numbers). Usable inside
        ``torch.inference_mode`` code: gradients are switched on here, for a detached copy of ``x``.
        """
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().to(self.device, torch.float32).clone().requires_grad_(True)
            labels = torch.as_tensor(label, device=self.device, dtype=torch.long).expand(len(x_in)).clone()
            log_p = F.log_softmax(self._logits(x_in, t), dim=-1)
            chosen = log_p.gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, x_in)
        return grad.float().detach()

    @torch.inference_mode()
    def p_unhealthy(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """p(unhealthy | x) of clean slices ``images`` ((n, H, W) or (n, 1, H, W), model units) at t = 0: (n,) float64."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32) if isinstance(images, np.ndarray) else images)
        x = x.reshape(len(x), 1, *x.shape[-2:])
        per_image = 4.0 * float(np.prod(x.shape[1:])) * float(self.card["network"]["encoder"]["channels"][0]) * 8.0
        bs = memory_batch_size(per_image, self.device, int(self.card.get("inference_defaults", {}).get("batch_size", 32)))
        out = [torch.softmax(self._logits(x[i : i + bs].to(self.device, torch.float32), 0), dim=-1)[:, self.unhealthy_label]
               for i in range(0, len(x), bs)]
        return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


__all__ = ["Guidance"]
