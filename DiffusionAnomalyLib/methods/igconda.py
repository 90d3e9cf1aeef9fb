"""IgCONDA-PET: implicit (classifier-free) guidance counterfactuals (METHODS.md section 1).

1. encode: DDIM-invert the input from t = 0 to the noise level D with the unconditional model;
2. decode: from D to 0, evaluate the unconditional and healthy-conditioned model in one batch,
   eps = eps_u + w (eps_healthy - eps_u), take a DDIM step;
3. anomaly map = |input - counterfactual|  (paper sections 2.3-2.4, eq. 9-10).

``steps`` is an integer K >= 1 (a strided grid of K DDIM moves per direction, :func:`timestep_grid`)
or ``"reference"`` (:data:`REFERENCE_STEPS`): the reference loop exactly, with MONAI's
``DDIMScheduler(clip_sample=False)`` at stride 1 (network at t = 0..D-1 while encoding, t = D..1
while decoding). ``None`` only means "the model card's default" in :meth:`IgcondaModel.resolve`
and :meth:`IgcondaModel.run`.
The inverted latents of a case are cached, keyed by (input, D, steps), so a new guidance scale
only re-decodes; the counterfactual is cached by (input, D, steps, w), so a repeated run with
unchanged parameters does no network work.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..card import (REFERENCE_STEPS, CheckpointError, Steps, check_guidance_scale, check_noise_level, check_steps,
                    number_from_text, parse_steps)
from ..diffusion import DDIM, timestep_grid
from ..pipeline import MethodResult
from ..progress import Cancel, Progress, check_cancel, report, timer
from ..volume import Volume, array_key
from .base import SliceMethod


def _given_or_default(check, value: Any, default: Any, name: str, *args: Any) -> Any:
    """``check(value)``, or ``check(default)`` when ``value`` is None, a bad default being blamed on the card."""
    if value is not None:
        return check(number_from_text(value), *args, field=f"the {name}")
    return check(default, *args, field=f"the model card's default {name}")


class IgcondaModel(SliceMethod):
    """A loaded IgCONDA-PET model: ``counterfactual`` on image batches, ``run`` on volumes."""

    def __init__(self, model, card, device="auto", source=None, precision="fp32"):
        super().__init__(model, card, device=device, source=source, precision=precision)
        self.ddim = DDIM(card["scheduler"])
        labels = card["labels"]
        self.null_label = int(labels.get("null", 0))
        self.healthy_label = int(labels.get("healthy", 1))
        try:  # the card's defaults against what its schedule allows: refused at load, not at the first run
            self.resolve()
        except ValueError as exc:
            raise CheckpointError(f"model {card['id']}: {exc}") from None

    def _eps(self, x: torch.Tensor, t: int, labels: torch.Tensor) -> torch.Tensor:
        return self.eps(x, t, self.model.context(labels))

    def _labels(self, n: int, label: int) -> torch.Tensor:
        return torch.full((n,), label, device=self.device, dtype=torch.long)

    # ---- the two halves ---------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: torch.Tensor, noise_level: int, steps: Steps,
               progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
        """DDIM inversion with the unconditional model from t = 0 to D.

        ``steps``: an integer K >= 1 or ``"reference"`` (network at t = 0..D-1, MONAI ``reversed_step``).
        """
        grid = timestep_grid(noise_level, steps)
        bs = self.batch_size(tuple(images.shape[1:]))
        out = []
        total = max(1, (len(grid) - 1) * len(images))
        done = 0
        for start in range(0, len(images), bs):
            x = images[start : start + bs].to(self.device, torch.float32)
            null = self._labels(len(x), self.null_label)
            for t_from, t_to in zip(grid[:-1], grid[1:]):
                check_cancel(cancel)
                eps = self._eps(x, t_from, null)
                x = self.ddim.move(x, eps, t_from, t_to, steps)
                done += len(x)
                report(progress, done / total, f"encoding to noise level {noise_level}")
            out.append(x.cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, noise_level: int, guidance_scale: float, steps: Steps,
               progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
        """Guided DDIM decoding from D to 0, unconditional + healthy in one batch.

        ``steps``: an integer K >= 1 or ``"reference"`` (network at t = D..1, MONAI ``step``).
        """
        grid = timestep_grid(noise_level, steps)
        bs = self.batch_size(tuple(latents.shape[1:]))
        w = float(guidance_scale)
        out = []
        total = max(1, (len(grid) - 1) * len(latents))
        done = 0
        for start in range(0, len(latents), bs):
            x = latents[start : start + bs].to(self.device, torch.float32)
            n = len(x)
            labels = torch.cat([self._labels(n, self.null_label), self._labels(n, self.healthy_label)])
            for t_from, t_to in zip(grid[:0:-1], grid[-2::-1]):
                check_cancel(cancel)
                eps_u, eps_h = self._eps(torch.cat([x, x]), t_from, labels).chunk(2)
                eps = eps_u + w * (eps_h - eps_u)
                x = self.ddim.move(x, eps, t_from, t_to, steps)
                done += n
                report(progress, done / total, f"decoding towards healthy (w = {w:g})")
            out.append(x.cpu())
        return torch.cat(out)

    def counterfactual(self, images: torch.Tensor, noise_level: int = 400, guidance_scale: float = 3.0,
                       steps: Steps = REFERENCE_STEPS, progress: Progress | None = None,
                       cancel: Cancel | None = None) -> torch.Tensor:
        """Healthy counterfactual of ``images`` (B, 1, H, W) in model intensity space; same shape.

        ``steps``: an integer K >= 1 or ``"reference"`` (no "card default" here: see :meth:`resolve`).
        """
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, H, W); got {tuple(images.shape)}")
        split = None if progress is None else (lambda f, m: progress(0.5 * f, m))
        latents = self.encode(images, noise_level, steps, split, cancel)
        split = None if progress is None else (lambda f, m: progress(0.5 + 0.5 * f, m))
        return self.decode(latents, noise_level, guidance_scale, steps, split, cancel)

    # ---- volumes ----------------------------------------------------------------------------
    def resolve(self, noise_level: Any = None, guidance_scale: Any = None, steps: Any = None) -> dict[str, Any]:
        """The parameters of a run, checked: each one given, or the model card's default when None.

        The one check of the method parameters, called by :meth:`run` before any work and by every
        caller that wants to refuse bad parameters up front (CLI, evaluation, worker); it changes
        nothing. The rules are the card's (:func:`.card.check_noise_level`: a whole number from 1
        to T - 1, 20.7 refused, never rounded; :func:`.card.check_guidance_scale`: finite, >= 0) and
        :func:`check_steps`; a number may come as text ("20", not "20.7"). The result's ``steps`` is
        always an integer >= 1 or ``"reference"``. Raises ValueError with the valid range.
        """
        d = self.defaults
        timesteps = int(self.card["scheduler"]["num_train_timesteps"])
        params = {
            "noise_level": _given_or_default(check_noise_level, noise_level, d["noise_level"], "noise level",
                                             timesteps),
            "guidance_scale": _given_or_default(check_guidance_scale, guidance_scale, d["guidance_scale"],
                                                "guidance scale"),
            "steps": _given_or_default(check_steps, parse_steps(steps), d["steps"], "steps", timesteps),
        }
        if params["noise_level"] > self.ddim.max_noise_level:
            given = "the model card's default noise level" if noise_level is None else "the noise level"
            raise ValueError(f"{given} must be at most {self.ddim.max_noise_level} for this model's noise schedule "
                             f"(beyond it alpha_bar vanishes and the DDIM inversion breaks down), "
                             f"got {params['noise_level']}.")
        return params

    def evaluations_per_slice(self, params: dict[str, Any], guidance_scales: int = 1) -> int:
        """Network evaluations a model slice costs with resolved ``params``: one encode, and a decode of
        two evaluations per move for each of ``guidance_scales`` guidance scales (a sweep decodes several)."""
        moves = len(timestep_grid(params["noise_level"], params["steps"])) - 1
        return moves * (1 + 2 * guidance_scales)

    def run(self, volume: Volume, noise_level: int | None = None, guidance_scale: float | None = None,
            steps: Steps | None = None, progress: Progress | None = None,
            cancel: Cancel | None = None, region: np.ndarray | Volume | None = None) -> MethodResult:
        """Counterfactual and heat map of a volume, back on its exact grid.

        ``None`` parameters take the model card's defaults (:meth:`resolve`); ``steps`` is an integer
        >= 1 or ``"reference"``. ``region`` (non-zero voxels on the volume's grid, e.g. an organ ROI):
        only the model slices it needs go through the network (:func:`.base.region_slices`); the
        others keep the input as their counterfactual, so their heat is 0.
        """
        params = self.resolve(noise_level, guidance_scale, steps)
        evals_before = self.network_evaluations
        timings: dict[str, float] = {}
        x, grid, todo = self.start_run(volume, self.evaluations_per_slice(params), region, progress, timings)
        case = array_key(x, grid, todo)
        enc_key = (case, params["noise_level"], params["steps"])
        dec_key = enc_key + (params["guidance_scale"],)
        cf = self.cache.get_item(("cf",) + dec_key)
        if cf is None:
            latents = self.cache.get_item(("latent",) + enc_key)
            images = torch.from_numpy(x[todo]).unsqueeze(1)
            if latents is None:
                clock = timer()
                latents = self.encode(images, params["noise_level"], params["steps"],
                                      (lambda f, m: report(progress, 0.02 + 0.45 * f, m)), cancel)
                timings["encode"] = clock()
                self.cache.put(("latent",) + enc_key, latents)
            clock = timer()
            cf = self.decode(latents, params["noise_level"], params["guidance_scale"], params["steps"],
                             (lambda f, m: report(progress, 0.47 + 0.45 * f, m)), cancel)
            timings["decode"] = clock()
            computed, cf = cf.squeeze(1).numpy(), x.copy()
            cf[todo] = computed
            self.cache.put(("cf",) + dec_key, cf)
        return self.finish_run(volume, x, grid, todo, np.abs(x - cf), cf, params, timings, evals_before, progress)
