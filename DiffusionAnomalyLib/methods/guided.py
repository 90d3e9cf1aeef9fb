"""Classifier-guided counterfactuals, DDIM and DDPM (METHODS.md section 2; Wolleb et al. 2022, the pancreas
paper, the kidney thesis section 4.1.2).

Both run on the conditional IgCONDA-PET network with the NULL label (its unconditional branch, which
the label dropout of training made an unconditional model of all slices) and steer it with a
noise-conditioned classifier C(y | x_t, t) of the same schedule and model grid
(:class:`.guidance.Guidance`), towards the classifier's 'healthy' class:

- CG-DDIM (:class:`CgDdimModel`, "cg-ddim"): 1. DDIM-invert the input from t = 0 to the noise level L,
  unguided (the IgCONDA-PET encoder); 2. decode from L to 0 with DDIM steps on the guided noise
  eps_hat = eps(x_t, t) - s sqrt(1 - abar_t) grad_x log C(healthy | x_t, t) (Wolleb's ``condition_score``).
- CG-DDPM (:class:`CgDdpmModel`, "cg-ddpm"): 1. noise the input to L in closed form,
  x_L = sqrt(abar_L) x + sqrt(1 - abar_L) n, n from the slice's own generator seeded by (seed, model slice
  index) (:func:`..diffusion.slice_generators`); 2. ancestral sampling from L to 0, the classifier's
  gradient added to the posterior mean: mean += Sigma_t s grad_x log C(healthy | x_t, t) (Wolleb's
  ``condition_mean``), then x_s = mean + sqrt(Sigma_t) z with z the slice generator's next draw.

Anomaly map = |input - counterfactual|; confidence = p(unhealthy | slice) of the classifier at t = 0,
reported per model slice (the pancreas paper prints it beside each map).

``steps``: an integer K (a strided grid of K moves, :func:`..diffusion.timestep_grid`) or "reference":
stride 1, MONAI's ``DDIMScheduler(clip_sample=False)`` (``reversed_step`` t = 0..L-1, ``step`` t = L..1)
for CG-DDIM and ``DDPMScheduler(clip_sample=False)`` (fixed-small variance, ``step`` t = L..1) for CG-DDPM;
the classifier is evaluated at the network's timestep.

Where this differs from the papers and Wolleb's reference code (``diffusion-anomaly``):

- Defaults (:data:`..method_catalog.METHODS`): L = 500 and s = 100 are the reference code's; its loops run
  at stride 1 (500 network evaluations each way), here 100 strided steps by default (CPU time;
  ``steps="reference"`` is the stride-1 loop). The reference images are 256 x 256, these 64 x 64, and the
  thesis finds s = 1600-1800 best in its latent space: s is a per-dataset knob, swept by ``sweep``.
- The reference DDPM path noises at a fixed t = 499 whatever the noise level asked (a bug); here x is
  noised at the requested L, with a seed, and sampling starts there.
- The reference models learn their variance; this network predicts eps only, so Sigma_t is the DDPM
  posterior variance (fixed-small, MONAI's default). On a strided grid a move t -> s is the posterior
  q(x_s | x_t, x0_hat) across the stride (:func:`..diffusion.ddpm_posterior`, DDIM with eta = 1) and
  Sigma_t its variance.
- The diffusion model is the conditional network's null branch (trained on all slices), not a separate
  unconditional model; the classifier is MONAI's ``DiffusionModelEncoder`` (the reference code: the
  UNet's encoder half), trained the same way (cross-entropy on x_t, t uniform).
- No clipping of x0_hat anywhere (as in the IgCONDA-PET loops).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..card import Steps
from ..diffusion import DDPM, draw_noise, slice_generators, timestep_grid
from ..progress import Cancel, Progress, check_cancel, report, timer
from .base import DdimCounterfactual, SliceMethod


class CgDdimModel(DdimCounterfactual):
    """Classifier-guided DDIM counterfactuals: unguided inversion to L, guided decoding (module docstring)."""

    method = "cg-ddim"
    scale_parameter = "classifier_scale"
    scale_symbol = "s"

    def decode_eps(self, x: torch.Tensor, t: int, scale: float) -> torch.Tensor:
        """eps(x_t, t, null) - s sqrt(1 - abar_t) grad log C(healthy | x_t, t); the unguided eps at s = 0."""
        eps = self._eps(x, t, self._labels(len(x), self.null_label))
        return self.guided(eps, x, t, scale, None if self.classifier is None else self.classifier.healthy_label)


class CgDdpmModel(SliceMethod):
    """Classifier-guided DDPM counterfactuals: seeded closed-form noising to L, guided ancestral sampling."""

    method = "cg-ddpm"

    def __init__(self, model, card, device="auto", source=None, precision="fp32", classifier=None):
        super().__init__(model, card, device=device, source=source, precision=precision, classifier=classifier)
        self.ddpm = DDPM(card["scheduler"])

    @torch.inference_mode()
    def sample(self, images: torch.Tensor, slice_ids: np.ndarray | None, noise_level: int, classifier_scale: float,
               steps: Steps, seed: int, progress: Progress | None = None,
               cancel: Cancel | None = None) -> torch.Tensor:
        """Healthy counterfactual of ``images`` (B, 1, H, W) in model units: x noised to L with the first draw of
        each slice's generator (``seed``, ``slice_ids[i]``; default ids 0..B-1), then guided ancestral moves
        along the grid of ``steps`` (network and classifier at t = L..1 at stride 1), each drawing the
        generator's next noise; s = 0 is unguided ancestral sampling."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, H, W); got {tuple(images.shape)}")
        slice_ids = np.arange(len(images)) if slice_ids is None else np.asarray(slice_ids)
        grid = timestep_grid(noise_level, steps)
        bs = self.batch_size(tuple(images.shape[1:]))
        s = float(classifier_scale)
        out = []
        total = max(1, (len(grid) - 1) * len(images))
        done = 0
        for start in range(0, len(images), bs):
            x0 = images[start : start + bs].to(self.device, torch.float32)
            generators = slice_generators(seed, slice_ids[start : start + bs])
            x = self.ddpm.add_noise(x0, draw_noise(generators, tuple(x0.shape[1:])), noise_level)
            null = self._labels(len(x), self.null_label)
            for t_from, t_to in zip(grid[:0:-1], grid[-2::-1]):
                check_cancel(cancel)
                eps = self._eps(x, t_from, null)
                shift = None
                if s != 0:
                    grad = self.classifier.grad_log_prob(x, t_from, self.classifier.healthy_label)
                    shift = (self.ddpm.variance(t_from, t_to) * s) * grad
                x = self.ddpm.move(x, eps, t_from, t_to, steps, generators, shift)
                done += len(x)
                report(progress, done / total, f"sampling towards healthy (s = {s:g})")
            out.append(x.cpu())
        return torch.cat(out)

    def evaluations_per_slice(self, params: dict[str, Any], guidance_values: int = 1) -> int:
        """Network evaluations a model slice costs: one per move, all of them again for each classifier scale."""
        return (len(timestep_grid(params["noise_level"], params["steps"])) - 1) * guidance_values

    def maps(self, images, slice_ids, case, params, progress, cancel, timings):
        """|input - counterfactual| and the counterfactual; every parameter change resamples."""
        clock = timer()
        cf = self.sample(torch.from_numpy(images).unsqueeze(1), slice_ids, params["noise_level"],
                         params["classifier_scale"], params["steps"], params["seed"], progress, cancel)
        timings["sample"] = clock()
        cf = cf.squeeze(1).numpy()
        return np.abs(images - cf), cf


__all__ = ["CgDdimModel", "CgDdpmModel"]
