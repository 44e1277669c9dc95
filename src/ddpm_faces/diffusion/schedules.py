"""Noise schedules: beta_t for t = 0..T-1 and the cumulative product alpha-bar.

Discrete time follows Ho et al. 2020 (https://arxiv.org/abs/2006.11239), eq. 4:
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s).
"""
from __future__ import annotations

import math

import torch

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
        self._padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])    # index t + 1
        self._log_sigmas = 0.5 * torch.log((1 - self.alpha_bar) / self.alpha_bar)          # increasing in t

    @classmethod
    def from_config(cls, schedule: str = "linear", timesteps: int = 1000,
                    beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        if schedule == "linear":
            return cls(linear_betas(timesteps, beta_start, beta_end))
        if schedule == "cosine":
            return cls(cosine_betas(timesteps))
        if schedule == "sigmoid":
            return cls(sigmoid_betas(timesteps))
        raise ValueError(f"unknown noise schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")

    def alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t; t = -1 means 'no noise' (abar = 1), the end of every sampler. A fractional t in [0, T-1]
        interpolates log sigma linearly between the two neighbouring steps (as k-diffusion does)."""
        t = torch.as_tensor(t).cpu()
        if not t.is_floating_point() or torch.equal(t, t.round()):
            return self._padded[t.long() + 1]
        log_sigma = _interp(t.double(), torch.arange(self.T, dtype=torch.float64), self._log_sigmas)
        return torch.sigmoid(-2 * log_sigma)                                  # 1 / (1 + sigma^2)

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep whose noise-to-signal ratio is sigma: the inverse of the above."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        return _interp(log_sigma, self._log_sigmas, torch.arange(self.T, dtype=torch.float64))

    def sigmas(self) -> torch.Tensor:
        """Noise-to-signal ratio sigma_t = sqrt((1 - abar_t) / abar_t), the EDM / k-diffusion view."""
        return ((1 - self.alpha_bar) / self.alpha_bar).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar_at(t)
        return ab / (1 - ab)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (numpy.interp) for increasing xp, clamped at both ends."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    w = (x - xp[i - 1]) / (xp[i] - xp[i - 1])
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


def _check_steps(steps: int, T: int) -> None:
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T} (the model's number of timesteps), got {steps}")


def spaced_timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """A decreasing subset of `steps` timesteps out of T (the respacing of Nichol & Dhariwal 2021).

    "trailing" starts at T-1 (Lin et al. 2024, https://arxiv.org/abs/2305.08891, table 2);
    "leading" is DDIM's arange(0, T, T // steps); "linspace" rounds an even grid over [0, T-1].
    """
    _check_steps(steps, T)
    if spacing == "trailing":
        ts = torch.round(T - torch.arange(steps, dtype=torch.float64) * T / steps).long() - 1
    elif spacing == "leading":
        ts = (torch.arange(steps) * (T // steps)).flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: choose trailing, leading or linspace")
    return [int(t) for t in ts]


SPACINGS = ("trailing", "leading", "linspace", "quadratic", "karras")


def sampling_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "trailing",
                       rho: float = 7.0, sigma_max: float = 80.0, t_max: float | None = None) -> list[float]:
    """The decreasing noise levels a sampler visits, as (possibly fractional) timesteps.

    `t_max` (an edit's start) places the steps between t_max and 0 by the same rule instead of over the whole
    schedule: evenly in t for the integer spacings (fractional then), quadratic in t, or evenly in
    sigma^(1/rho) from sigma(t_max).

    Integer spacings come from `spaced_timesteps`. "quadratic" spaces t as (T-1)(1 - i/steps)^2, denser near
    the data (Song et al. 2021, DDIM, sec. D.2); "karras" spaces sigma^(1/rho) evenly between
    min(sigma(T-1), sigma_max) and sigma(0) (Karras et al. 2022, https://arxiv.org/abs/2206.00364, eq. 5,
    rho = 7, sigma_max = 80: a cosine schedule's sigma(T-1) ~ 2e4 would waste steps and break Heun's
    trapezoid rule on the first step).
    """
    if t_max is None and spacing in ("trailing", "leading", "linspace"):
        return [float(t) for t in spaced_timesteps(schedule.T, steps, spacing)]
    _check_steps(steps, schedule.T)
    i = torch.arange(steps, dtype=torch.float64)
    top = float(schedule.T - 1 if t_max is None else min(max(t_max, 0.0), schedule.T - 1))
    if spacing in ("trailing", "leading"):
        return (top * (1 - i / steps)).tolist()
    if spacing == "linspace":
        return torch.linspace(top, 0, steps, dtype=torch.float64).tolist()
    if spacing == "quadratic":
        return (top * (1 - i / steps) ** 2).tolist()
    if spacing == "karras":
        sigmas = schedule.sigmas()
        if t_max is None:
            highest = float(sigmas[-1])
        else:
            abar = float(schedule.alpha_bar_at(torch.tensor([top], dtype=torch.float64))[0])
            highest = ((1 - abar) / abar) ** 0.5
        lo, hi = sigmas[0] ** (1 / rho), min(highest, sigma_max) ** (1 / rho)
        ramp = i / max(steps - 1, 1)
        return schedule.t_from_sigma((hi + ramp * (lo - hi)) ** rho).tolist()
    raise ValueError(f"unknown timestep spacing {spacing!r}: choose one of {', '.join(SPACINGS)}")
