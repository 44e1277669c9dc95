"""The super-resolution stage of a cascade (Ho et al. 2022, https://arxiv.org/abs/2106.15282, sec. 3-4):
conditioning augmentation and a network with its low-resolution image bound to it.

A stage-2 network f(x_t, t, labels, lowres, lowres_t) sees a low-resolution image that was itself noised to
level s of the same schedule, z_s = sqrt(abar_s) z + sqrt(1 - abar_s) eps', and is told s. Training draws s
uniformly from [0, max_level]; sampling fixes a small s for every step. The noise hides the difference
between real low-resolution images (training) and a stage-1 model's samples (sampling), so stage 2 learns
to forgive stage 1's artefacts (sec. 4.2: Gaussian augmentation, the level known to the model).

    z_s = augment_lowres(schedule, z, s, noise)          # s: (B,) integer levels
    net2 = bind_lowres(net, z_s, s)                       # net2(x_t, t, cond): what Denoiser and samplers call
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .process import q_sample
from .schedules import NoiseSchedule


def augment_lowres(schedule: NoiseSchedule, lowres: torch.Tensor, level: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """The low-resolution image noised to `level` (per image, a timestep of `schedule`): the forward process
    q(z_s | z) itself, so level 0 leaves it almost as it is and level T-1 is nearly pure noise."""
    return q_sample(schedule, lowres, level, noise)


def random_levels(batch: int, max_level: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training's augmentation levels: uniform over 0 .. max_level (inclusive)."""
    return torch.randint(0, max_level + 1, (batch,), generator=generator)


def bind_lowres(net: Callable, lowres: torch.Tensor, level: torch.Tensor) -> Callable:
    """`net` as a callable (x_t, t, cond=None) with the (already augmented) low-resolution image and its level
    bound. When a sampler doubles the batch for classifier-free guidance, both halves see the same image."""
    def run(x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        repeat = len(x_t) // len(lowres)
        if repeat * len(lowres) != len(x_t):
            raise ValueError(f"a batch of {len(x_t)} cannot share {len(lowres)} low-resolution images")
        z, s = (lowres, level) if repeat == 1 else (lowres.repeat(repeat, 1, 1, 1), level.repeat(repeat))
        return net(x_t, t, cond, lowres=z, lowres_t=s)
    return run
