"""Diffusion building blocks shared by the methods (METHODS.md, "Shared building blocks").

Noise schedules, training noising and the stride-1 ("reference") DDIM and DDPM loops come from
MONAI's schedulers (:func:`monai_scheduler`, :class:`DDIM`, :class:`DDPM`); only the strided moves
are written out here (:func:`ddim_step`, :func:`ddpm_posterior`), because MONAI's uniform stride
cannot express the grid ending at the noise level. The random noise of the stochastic methods
comes from one generator per model slice (:func:`slice_generators`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler

from .card import REFERENCE_STEPS, Steps


def monai_scheduler(section: dict[str, Any], kind: type[Scheduler] = DDPMScheduler, **options) -> Scheduler:
    """The MONAI scheduler ``kind`` of a model card's ``scheduler`` section: the one place a card's
    schedule becomes alpha_bar (float32, as the reference code computes it), training noise
    (``DDPMScheduler.add_noise``) and the DDIM loops (:class:`DDIM`).

    ``options`` are passed on to ``kind`` (e.g. ``clip_sample=False`` for DDIM).
    """
    kwargs = {"num_train_timesteps": int(section["num_train_timesteps"]), "schedule": section["schedule"]}
    for key in ("beta_start", "beta_end"):
        if key in section:
            kwargs[key] = float(section[key])
    return kind(**kwargs, **options)


def timestep_grid(noise_level: int, steps: Steps) -> list[int]:
    """The grid 0 = t_0 < t_1 < ... < t_K = D (METHODS.md).

    ``steps="reference"`` is the reference stride-1 grid (K = D); an integer gives K = steps
    points spaced as evenly as integers allow (duplicates removed, so K <= D).
    """
    d = int(noise_level)
    if d < 1:
        raise ValueError("noise level must be >= 1")
    if steps == REFERENCE_STEPS:
        return list(range(d + 1))
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 or '{REFERENCE_STEPS}', got {steps!r}")
    k = int(steps)
    return sorted({int(round(n * d / k)) for n in range(k + 1)})


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_from: float, abar_to: float) -> torch.Tensor:
    """Deterministic DDIM move between any two noise levels (eta = 0); also the inversion step.

    Hand-written: MONAI's DDIMScheduler strides by T // K from T - 1, not along :func:`timestep_grid` to D.

    x0_hat = (x - sqrt(1 - abar_from) eps) / sqrt(abar_from);  x' = sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps
    """
    x0 = (x - (1.0 - abar_from) ** 0.5 * eps) / abar_from**0.5
    return abar_to**0.5 * x0 + (1.0 - abar_to) ** 0.5 * eps


#: the smallest alpha_bar a DDIM move may divide by (sqrt: x0 error x 1000 at most); float32 reaches 0 beyond it
MIN_ALPHA_BAR = 1e-6


class DDIM:
    """The deterministic (eta = 0, no clipping) DDIM moves of a model card's schedule.

    With ``steps="reference"`` a move is MONAI's ``DDIMScheduler(clip_sample=False)`` at stride 1
    (``reversed_step`` t -> t+1 while encoding, ``step`` t -> t-1 while decoding), as in the
    IgCONDA-PET reference code; with an integer ``steps`` it is :func:`ddim_step` between grid points.
    Both use the same float32 alpha_bar from MONAI.
    """

    def __init__(self, section: dict[str, Any]):
        self.scheduler = monai_scheduler(section, DDIMScheduler, clip_sample=False)  # stride 1 (K = T)
        self.abar: list[float] = self.scheduler.alphas_cumprod.tolist()
        #: the largest usable noise level: DDIM divides by sqrt(alpha_bar), so beyond MIN_ALPHA_BAR it amplifies noise
        self.max_noise_level: int = max((t for t, a in enumerate(self.abar) if a > MIN_ALPHA_BAR), default=0)

    def move(self, x: torch.Tensor, eps: torch.Tensor, t_from: int, t_to: int, steps: Steps) -> torch.Tensor:
        """``x`` at timestep ``t_from`` moved to ``t_to`` with the noise estimate ``eps`` (on the grid of ``steps``)."""
        if steps != REFERENCE_STEPS:
            return ddim_step(x, eps, self.abar[t_from], self.abar[t_to])
        if t_to == t_from + 1:
            return self.scheduler.reversed_step(eps, t_from, x)[0]
        if t_to == t_from - 1:
            return self.scheduler.step(eps, t_from, x)[0]
        raise ValueError(f"the reference loop moves by one timestep, not {t_from} -> {t_to}")


class DDPM:
    """The ancestral (stochastic) DDPM moves of a model card's schedule: fixed-small posterior variance,
    no clipping.

    With ``steps="reference"`` a move t -> t-1 is MONAI's ``DDPMScheduler(clip_sample=False).step``
    (one call per slice, each with the slice's own generator); with an integer ``steps`` it is the
    posterior q(x_s | x_t, x0_hat) between two grid points (:func:`ddpm_posterior`), its noise drawn
    from the same generators in the same order, so ``steps = L`` equals the reference within rounding.
    """

    def __init__(self, section: dict[str, Any]):
        self.scheduler = monai_scheduler(section, DDPMScheduler, clip_sample=False)  # variance: fixed_small
        self.abar: list[float] = self.scheduler.alphas_cumprod.tolist()
        # log prod_{u <= t} (1 - beta_u) in float64, so beta_{t|s} = 1 - abar_t / abar_s keeps its digits when
        # t - s is small (at stride 1 it is MONAI's beta_t)
        self._log_alpha = np.concatenate([[0.0], np.cumsum(np.log1p(-self.scheduler.betas.double().numpy()))])

    def beta(self, t_from: int, t_to: int) -> float:
        """beta_{t|s} = 1 - prod_{s < u <= t} (1 - beta_u): the forward noise added between s = ``t_to`` and t."""
        return float(-np.expm1(self._log_alpha[t_from + 1] - self._log_alpha[t_to + 1]))

    def variance(self, t_from: int, t_to: int) -> float:
        """The posterior variance of a move t -> s: (1 - abar_s) / (1 - abar_t) beta_{t|s} (MONAI's fixed_small
        at stride 1, clamped at 1e-20 as there)."""
        return max((1.0 - self.abar[t_to]) / (1.0 - self.abar[t_from]) * self.beta(t_from, t_to), 1e-20)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
        """Closed-form forward noising to ``level``: sqrt(abar) x0 + sqrt(1 - abar) noise (MONAI ``add_noise``)."""
        levels = torch.full((len(x0),), int(level), dtype=torch.long)
        return self.scheduler.add_noise(x0.cpu(), noise.cpu(), levels).to(x0.device)

    def move(self, x: torch.Tensor, eps: torch.Tensor, t_from: int, t_to: int, steps: Steps,
             generators: list[torch.Generator], shift: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral move of ``x`` (n, ...) from ``t_from`` down to ``t_to``: posterior mean (+ ``shift``, e.g.
        classifier guidance) plus its standard deviation times the next draw of each slice's generator."""
        if steps == REFERENCE_STEPS:
            if t_to != t_from - 1:
                raise ValueError(f"the reference loop moves by one timestep, not {t_from} -> {t_to}")
            out = torch.cat([self.scheduler.step(eps[i : i + 1].cpu(), t_from, x[i : i + 1].cpu(), generator=g)[0]
                             for i, g in enumerate(generators)]).to(x.device)
        else:
            mean, variance = ddpm_posterior(x, eps, self.abar[t_from], self.abar[t_to], self.beta(t_from, t_to))
            out = mean + variance**0.5 * draw_noise(generators, tuple(x.shape[1:])).to(x.device)
        return out if shift is None else out + shift


def ddpm_posterior(x: torch.Tensor, eps: torch.Tensor, abar_from: float, abar_to: float,
                   beta: float) -> tuple[torch.Tensor, float]:
    """Mean and variance of the DDPM posterior q(x_s | x_t, x0_hat) between any two noise levels (s < t).

    Hand-written: MONAI's DDPMScheduler steps one timestep at a time, not along :func:`timestep_grid` to L.
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); with beta = beta_{t|s} = 1 - abar_t / abar_s:
    mean = sqrt(abar_s) beta / (1 - abar_t) x0_hat + sqrt(1 - beta) (1 - abar_s) / (1 - abar_t) x_t,
    variance = (1 - abar_s) / (1 - abar_t) beta: Ho et al. eq. 6-7 across a stride, i.e. DDIM with eta = 1.
    """
    x0 = (x - (1.0 - abar_from) ** 0.5 * eps) / abar_from**0.5
    mean = (abar_to**0.5 * beta / (1.0 - abar_from)) * x0 + ((1.0 - beta) ** 0.5 * (1.0 - abar_to) / (1.0 - abar_from)) * x
    return mean, max((1.0 - abar_to) / (1.0 - abar_from) * beta, 1e-20)


def slice_generators(seed: int, slice_ids) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per model slice, seeded from (``seed``, slice id) through numpy's
    ``SeedSequence``: a slice's noise depends on the run's seed and its own position only, not on the
    region computed or the batching, and is the same on every CPU."""
    return [torch.Generator(device="cpu").manual_seed(
        int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, np.uint64)[0])) for i in slice_ids]


def draw_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise (len(generators),) + ``shape`` on the CPU, float32: row i is the next draw of
    generator i (the same numbers MONAI's ``DDPMScheduler.step`` draws for a one-slice batch)."""
    return torch.cat([torch.randn((1,) + tuple(shape), generator=g, dtype=torch.float32) for g in generators])


def memory_batch_size(bytes_per_item: float, device: torch.device, cap: int, fraction: float = 0.25) -> int:
    """How many items fit in ``fraction`` of the free memory of ``device`` (at least 1, at most cap)."""
    free = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    if not free:
        return max(1, cap)
    return int(np.clip(free * fraction // max(bytes_per_item, 1), 1, cap))
