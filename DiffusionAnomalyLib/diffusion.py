"""Diffusion building blocks shared by the methods (METHODS.md, "Shared building blocks").

Noise schedules, training noising and the stride-1 ("reference") DDIM loop come from MONAI's
schedulers (:func:`monai_scheduler`, :class:`DDIM`); only the strided DDIM move is written out
here (:func:`ddim_step`), because MONAI's uniform stride cannot express the grid ending at D.
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
