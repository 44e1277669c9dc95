"""Noise schedules: beta_t for t = 0..T-1 and the cumulative product alpha-bar.

Discrete time follows Ho et al. 2020 (https://arxiv.org/abs/2006.11239), eq. 4:
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError

SCHEDULES = ("linear", "cosine", "sigmoid")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: betas evenly spaced from 1e-4 to 0.02 (for T = 1000)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021 (https://arxiv.org/abs/2102.09672), eq. 17, f(t)/f(0) with t in [0, 1]."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - abar(t+1)/abar(t), clipped at 0.999 to avoid a singularity at t = T."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    abar = cosine_alpha_bar(t, s)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def sigmoid_alpha_bar(t: torch.Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Jabri et al. 2022 (https://arxiv.org/abs/2212.11972), alg. 1: abar(t) = normalised 1 - sigmoid."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    v = torch.sigmoid((t * (end - start) + start) / tau)
    return (v_end - v) / (v_end - v_start)


def sigmoid_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    t = torch.arange(T + 1, dtype=torch.float64) / T
    abar = sigmoid_alpha_bar(t)
    return (1 - abar[1:] / abar[:-1]).clamp(min=0.0, max=max_beta)


class NoiseSchedule:
    """Discrete schedule of T noise levels, kept in float64 on the CPU; callers index and cast."""

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float64)
        self.alphas = 1 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.T = len(betas)

    @classmethod
    def from_config(cls, schedule: str = "linear", timesteps: int = 1000,
                    beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        if schedule == "linear":
            return cls(linear_betas(timesteps, beta_start, beta_end))
        if schedule == "cosine":
            return cls(cosine_betas(timesteps))
        if schedule == "sigmoid":
            return cls(sigmoid_betas(timesteps))
        raise UserError(f"unknown noise schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t for integer t; t = -1 means 'no noise' (abar = 1), the end of every sampler."""
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])
        return padded[t.long().cpu() + 1]

    def sigmas(self) -> torch.Tensor:
        """Noise-to-signal ratio sigma_t = sqrt((1 - abar_t) / abar_t), the EDM / k-diffusion view."""
        return ((1 - self.alpha_bar) / self.alpha_bar).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar_at(t)
        return ab / (1 - ab)


def spaced_timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """A decreasing subset of `steps` timesteps out of T (the respacing of Nichol & Dhariwal 2021).

    "trailing" starts at T-1 (Lin et al. 2024, https://arxiv.org/abs/2305.08891, table 2);
    "leading" is DDIM's arange(0, T, T // steps); "linspace" rounds an even grid over [0, T-1].
    """
    if not 1 <= steps <= T:
        raise UserError(f"--steps must be between 1 and {T} (the model's number of timesteps), got {steps}")
    if spacing == "trailing":
        ts = torch.round(T - torch.arange(steps, dtype=torch.float64) * T / steps).long() - 1
    elif spacing == "leading":
        ts = (torch.arange(steps) * (T // steps)).flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0)
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}: choose trailing, leading or linspace")
    return [int(t) for t in ts]
