"""CDM: conditional-diffusion finite-difference saliency (METHODS.md section 3; Hu et al., Algorithm 1, eq. 5-6).

The same conditional network as IgCONDA-PET, no counterfactual:

1. noise the input to level Q in closed form, x_Q = sqrt(abar_Q) x + sqrt(1 - abar_Q) n, with n drawn
   from a seeded ``torch.Generator`` (one draw for the whole model grid, so a slice's noise does not
   depend on the region or the batching; deterministic on the CPU);
2. run two deterministic DDIM trajectories (eta = 0, MONAI ``DDIMScheduler(clip_sample=False)`` at
   stride 1) side by side from x_Q for R unit steps, the network at t = Q, Q-1, ..., Q-R+1, each step
   moving t -> t-1: x conditioned on f(y1) (unhealthy), x' on e(tau) = tau f(y1) + (1 - tau) f(y0)
   (y0 = healthy, f = the class embedding: the cross-attention context); both conditions in one
   batch of 2 per step, so a model slice costs 2 R network evaluations;
3. a += (x_{t-1} - x'_{t-1}) / (1 - tau) after every step: the finite-difference derivative of the
   DDIM trajectory with respect to the condition (eq. 6). The heat map is |a|.

Units: a is a sum of differences of partially denoised images, so it is scaled back to the input's
units like an IgCONDA-PET difference (x the card's intensity scale; offsets cancel): SUV for PET,
divided by (1 - tau). It is a sensitivity, not a healthy-minus-input difference: its values are not
comparable with IgCONDA-PET's, and thresholds chosen for IgCONDA-PET do not carry over. The paper
min-max normalises a per image before Otsu; here the map keeps its units and the "fraction" and
"otsu" thresholds do that normalisation (a fraction of the map's maximum), so an absolute threshold
stays meaningful across cases.

Where this differs from the paper and its code (defaults Q = 400, R = 10, tau = 0.95, METHODS.md):

- Schedule: the reference code (Hu's ``cond_ddpm_wsss``) trains with a 4000-step linear schedule
  (betas scaled by 1000/4000) and noises to t = 400 there, alpha_bar = 0.896: on this project's
  1000-step schedule that noise level is t = 100 (alpha_bar_100 = 0.895). Q counts this model's own
  timesteps, so the default Q = 400 (alpha_bar = 0.194) is a much noisier start than the reference
  code's; its R = 10 steps span 10/4000 of its schedule, here 10/1000. Q is not rescaled because the
  paper's text states Q = 400 without the schedule length and METHODS.md fixes Q = 400 on T = 1000;
  ``noise_level=100`` reproduces the reference code's starting noise.
- Steps: the paper's Algorithm 1 loops "for t from Q to Q-R" (R + 1 steps as written) and noises
  step by step; the reference code noises to t = 400 in closed form (unseeded) and then evaluates
  the network at t = 399, ..., 390 (one timestep below the level it noised to). Here: closed-form
  noising with a seed, exactly R steps, the network at t = Q, ..., Q-R+1, matching the noise level.
- The reference code sums the signed differences without the 1/(1 - tau) factor (its min-max
  normalisation removes it); here the factor of eq. 6 is kept, so tau changes the map's scale.
- CG-CDM (classifier guidance on both trajectories) needs a noise-conditioned classifier and is not
  implemented here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..card import (REFERENCE_STEPS, CheckpointError, check_cdm_steps, check_noise_level, check_seed, check_tau,
                    number_from_text, shown)
from ..diffusion import DDIM
from ..pipeline import MethodResult
from ..progress import Cancel, Progress, check_cancel, report, timer
from ..volume import Volume, array_key
from .base import SliceMethod

#: the paper's defaults (METHODS.md section 3): noise level Q, DDIM steps R, embedding weight tau
DEFAULT_NOISE_LEVEL = 400
DEFAULT_STEPS = 10
DEFAULT_TAU = 0.95
#: the seed of the noise drawn for the closed-form noising
DEFAULT_SEED = 0
#: the optional model-card section ``inference_defaults.cdm`` overriding the defaults above
CARD_SECTION = "cdm"
PARAMETERS = ("noise_level", "steps", "tau", "seed")


def _given_or_default(check, value: Any, default: Any, *args: Any, field: str) -> Any:
    """``check(value)`` for a given value (a number may come as text), else the already checked default."""
    return default if value is None else check(number_from_text(value), *args, field=field)


class CdmModel(SliceMethod):
    """CDM saliency with a conditional (IgCONDA-PET) network: ``saliency`` on image batches, ``run`` on volumes."""

    #: the method's name (the checkpoint's card keeps the name of the method it was trained for)
    method = "cdm"

    def __init__(self, model, card, device="auto", source=None, precision="fp32"):
        super().__init__(model, card, device=device, source=source, precision=precision)
        self.ddim = DDIM(card["scheduler"])
        labels = card["labels"]
        missing = [name for name in ("healthy", "unhealthy") if name not in labels]
        if getattr(self.model, "embed", None) is None or missing:
            raise CheckpointError(f"model {card['id']} cannot run CDM: it needs a class-conditional network with "
                                  f"'healthy' and 'unhealthy' labels (missing: {', '.join(missing) or 'embedding'}).")
        self.healthy_label = int(labels["healthy"])
        self.unhealthy_label = int(labels["unhealthy"])
        try:  # the card's CDM defaults against what its schedule allows: refused at load, not at the first run
            self.cdm_defaults = self._card_defaults()
        except ValueError as exc:
            raise CheckpointError(f"model {card['id']}: {exc}") from None

    # ---- parameters -------------------------------------------------------------------------
    def _card_defaults(self) -> dict[str, Any]:
        """:data:`DEFAULT_NOISE_LEVEL` etc., overridden by the card's optional ``inference_defaults.cdm``."""
        section = self.card["inference_defaults"].get(CARD_SECTION, {})
        field = f"the model card's inference_defaults.{CARD_SECTION}"
        if not isinstance(section, dict) or set(section) - set(PARAMETERS):
            raise ValueError(f"{field} must be an object with only {', '.join(PARAMETERS)}, got {shown(section)}.")
        given = {key: section.get(key) for key in PARAMETERS}
        base = {"noise_level": DEFAULT_NOISE_LEVEL, "steps": DEFAULT_STEPS, "tau": DEFAULT_TAU, "seed": DEFAULT_SEED}
        return self._check({key: base[key] if given[key] is None else given[key] for key in PARAMETERS},
                           {key: f"{field}.{key}" for key in PARAMETERS})

    def _check(self, values: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
        timesteps = int(self.card["scheduler"]["num_train_timesteps"])
        q = check_noise_level(values["noise_level"], timesteps, fields["noise_level"])
        if q > self.ddim.max_noise_level:
            raise ValueError(f"{fields['noise_level']} must be at most {self.ddim.max_noise_level} for this model's "
                             f"noise schedule (beyond it alpha_bar vanishes and DDIM breaks down), got {q}.")
        return {"noise_level": q, "steps": check_cdm_steps(values["steps"], q, fields["steps"]),
                "tau": check_tau(values["tau"], fields["tau"]), "seed": check_seed(values["seed"], fields["seed"])}

    @property
    def defaults(self) -> dict[str, Any]:
        """The card's inference defaults (thresholds, ...) with CDM's own noise level, steps, tau and seed."""
        return {**self.card["inference_defaults"], **self.cdm_defaults}

    def resolve(self, noise_level: Any = None, steps: Any = None, tau: Any = None, seed: Any = None) -> dict[str, Any]:
        """The parameters of a run, checked: each one given, or the default when None (:attr:`defaults`).

        Q (``noise_level``): a whole number from 1 to the schedule's largest usable noise level;
        R (``steps``): a whole number from 1 to Q; tau: strictly between 0 and 1; ``seed``: a whole
        number from 0 to :data:`MAX_SEED`. A number may come as text ("10", not "10.5"); never
        rounded. Raises ValueError with one sentence and the valid range; changes nothing.
        """
        given = {"noise_level": noise_level, "steps": steps, "tau": tau, "seed": seed}
        if all(value is None for value in given.values()):
            return dict(self.cdm_defaults)
        values = {key: self.cdm_defaults[key] if value is None else number_from_text(value)
                  for key, value in given.items()}
        fields = {"noise_level": "the noise level", "steps": "the number of CDM steps", "tau": "tau",
                  "seed": "the seed"}
        if steps is None:  # the default R is checked against a given Q with the default named
            fields["steps"] = "the default number of CDM steps"
        return self._check(values, fields)

    @staticmethod
    def evaluations_per_slice(params: dict[str, Any]) -> int:
        """Network evaluations a model slice costs with resolved ``params``: both conditions at each of R steps."""
        return 2 * int(params["steps"])

    # ---- the network ------------------------------------------------------------------------
    def contexts(self, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The two conditions, (1, 1, dim) each: f(y1) and e(tau) = tau f(y1) + (1 - tau) f(y0)."""
        labels = torch.tensor([self.unhealthy_label, self.healthy_label], device=self.device)
        f1, f0 = self.model.context(labels).float().chunk(2)
        return f1, tau * f1 + (1.0 - tau) * f0

    def noise(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """Standard normal noise of ``shape`` (CPU, float32) from a ``torch.Generator`` seeded with ``seed``."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    @torch.inference_mode()
    def saliency(self, images: torch.Tensor, noise_level: int = DEFAULT_NOISE_LEVEL, steps: int = DEFAULT_STEPS,
                 tau: float = DEFAULT_TAU, seed: int = DEFAULT_SEED, noise: torch.Tensor | None = None,
                 progress: Progress | None = None, cancel: Cancel | None = None) -> torch.Tensor:
        """The signed CDM map a of ``images`` (B, 1, H, W) in model units; same shape (parameters as resolved).

        ``noise``: the noise for the closed-form noising, same shape as ``images`` (default: drawn with
        ``seed``; :meth:`run` passes each slice's share of one draw for the whole model grid).
        """
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, H, W); got {tuple(images.shape)}")
        q, r = int(noise_level), int(steps)
        noise = self.noise(tuple(images.shape), seed) if noise is None else noise
        c1, c_tau = self.contexts(float(tau))
        scale = 1.0 / (1.0 - float(tau))
        bs = self.batch_size(tuple(images.shape[1:]))
        out = []
        total = max(1, r * len(images))
        done = 0
        for start in range(0, len(images), bs):
            x0 = images[start : start + bs].to(self.device, torch.float32)
            n = len(x0)
            level = torch.full((n,), q, dtype=torch.long)
            x = self.ddim.scheduler.add_noise(x0.cpu(), noise[start : start + bs].cpu(), level).to(self.device)
            x_tau = x.clone()
            context = torch.cat([c1.expand(n, -1, -1), c_tau.expand(n, -1, -1)])
            a = torch.zeros_like(x)
            for t in range(q, q - r, -1):
                check_cancel(cancel)
                eps1, eps_tau = self.eps(torch.cat([x, x_tau]), t, context).chunk(2)
                x = self.ddim.move(x, eps1, t, t - 1, REFERENCE_STEPS)
                x_tau = self.ddim.move(x_tau, eps_tau, t, t - 1, REFERENCE_STEPS)
                a += (x - x_tau) * scale
                done += n
                report(progress, done / total, f"CDM step {q - t + 1} of {r} (noise level {q})")
            out.append(a.cpu())
        return torch.cat(out)

    # ---- volumes ----------------------------------------------------------------------------
    def run(self, volume: Volume, noise_level: int | None = None, steps: int | None = None, tau: float | None = None,
            seed: int | None = None, progress: Progress | None = None, cancel: Cancel | None = None,
            region: np.ndarray | Volume | None = None) -> MethodResult:
        """CDM heat map |a| of a volume on its exact grid (input units / (1 - tau)); no counterfactual.

        ``None`` parameters take the defaults (:meth:`resolve`). ``region`` (non-zero voxels on the
        volume's grid, e.g. an organ ROI): only the model slices it needs go through the network
        (:func:`.base.region_slices`); the others have heat 0. The signed map a is cached, keyed by
        (input, slices, Q, R, tau, seed), so a repeated run does no network work.
        """
        params = self.resolve(noise_level, steps, tau, seed)
        evals_before = self.network_evaluations
        timings: dict[str, float] = {}
        x, grid, todo = self.start_run(volume, self.evaluations_per_slice(params), region, progress, timings)
        key = ("cdm", array_key(x, grid, todo)) + tuple(params[name] for name in PARAMETERS)
        signed = self.cache.get_item(key)
        if signed is None:
            clock = timer()
            noise = self.noise((len(x), 1) + x.shape[1:], params["seed"])[todo]
            computed = self.saliency(torch.from_numpy(x[todo]).unsqueeze(1), params["noise_level"], params["steps"],
                                     params["tau"], params["seed"], noise,
                                     (lambda f, m: report(progress, 0.02 + 0.9 * f, m)), cancel)
            timings["saliency"] = clock()
            signed = np.zeros_like(x)
            signed[todo] = computed.squeeze(1).numpy()
            self.cache.put(key, signed)
        return self.finish_run(volume, x, grid, todo, np.abs(signed), None, params, timings, evals_before, progress,
                               heat_units=f"|{volume.units or 'intensity'} difference| / (1 - tau)")


__all__ = ["CARD_SECTION", "DEFAULT_NOISE_LEVEL", "DEFAULT_SEED", "DEFAULT_STEPS", "DEFAULT_TAU", "CdmModel"]
