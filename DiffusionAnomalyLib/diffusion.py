"""Diffusion building blocks shared by the methods (METHODS.md, "Shared building blocks").

Noise schedules come from MONAI's schedulers; the deterministic DDIM step and its reversal
("noise encoding") are written out here because the reference loops need exact control over
which timestep the network sees and no sample clipping (MONAI's DDIM clips by default).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler

from .card import REFERENCE_STEPS, Steps

def alphas_cumprod(scheduler: dict[str, Any]) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 from a model card's scheduler section.

    Taken from MONAI's scheduler (float32, as the reference implementation computes it) so the
    stride-1 loop reproduces the reference numbers, not just its timesteps.
    """
    kwargs = {"num_train_timesteps": int(scheduler["num_train_timesteps"]), "schedule": scheduler["schedule"]}
    for key in ("beta_start", "beta_end"):
        if key in scheduler:
            kwargs[key] = float(scheduler[key])
    sched = DDPMScheduler(**kwargs)
    return sched.alphas_cumprod.clone()


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
    """Deterministic DDIM move between noise levels (eta = 0); also the inversion step.

    x0_hat = (x - sqrt(1 - abar_from) eps) / sqrt(abar_from);  x' = sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps
    """
    x0 = (x - (1.0 - abar_from) ** 0.5 * eps) / abar_from**0.5
    return abar_to**0.5 * x0 + (1.0 - abar_to) ** 0.5 * eps


def memory_batch_size(bytes_per_item: float, device: torch.device, cap: int, fraction: float = 0.25) -> int:
    """How many items fit in ``fraction`` of the free memory of ``device`` (at least 1, at most cap)."""
    free = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    if not free:
        return max(1, cap)
    return int(np.clip(free * fraction // max(bytes_per_item, 1), 1, cap))
