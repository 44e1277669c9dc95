"""The denoising loss: MSE to the prediction target, optionally min-SNR-gamma weighted.

Min-SNR-gamma (Hang et al. 2023, https://arxiv.org/abs/2303.09556, eq. 9 and table 1) weights each
timestep by min(SNR_t, gamma) expressed in the units of the chosen target:
    eps: min(SNR, gamma) / SNR,   x0: min(SNR, gamma),   v: min(SNR, gamma) / (SNR + 1).
"""
from __future__ import annotations

import torch

from .process import q_sample, training_target
from .schedules import NoiseSchedule


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "x0":
        return clipped
    raise ValueError(f"unknown prediction target {prediction!r}")


def diffusion_loss(net, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
                   prediction: str = "eps", min_snr_gamma: float | None = None, cond=None,
                   reduce: bool = True) -> torch.Tensor:
    """Mean squared error between the network's output at x_t and its target (Ho et al. 2020, eq. 14)."""
    x_t = q_sample(schedule, x0, t, noise)
    out = net(x_t, t, cond) if cond is not None else net(x_t, t)
    target = training_target(prediction, schedule, x0, t, noise)
    per_sample = (out.float() - target).pow(2).flatten(1).mean(1)
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weight(schedule.snr(t), min_snr_gamma, prediction).to(per_sample)
    return per_sample.mean() if reduce else per_sample
