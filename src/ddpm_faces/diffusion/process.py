"""The forward process q(x_t | x_0) and conversions between what a network predicts.

A network predicts one of eps (Ho et al. 2020), x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0
(Salimans & Ho 2022, https://arxiv.org/abs/2202.00512, section 4). Every sampler works on the pair
(eps, x0) that `Denoiser.predict` returns, whatever the network was trained to predict.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .schedules import NoiseSchedule

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction target {prediction!r}: choose one of {', '.join(PREDICTIONS)}")
    return prediction


def _coef(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients shaped (B, 1, 1, 1), float32 on x's device (the maths runs in float32)."""
    return values.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4)."""
    ab = schedule.alpha_bar_at(t)
    return _coef(ab.sqrt(), x0) * x0 + _coef((1 - ab).sqrt(), x0) * noise


def training_target(prediction: str, schedule: NoiseSchedule, x0, t, noise) -> torch.Tensor:
    if check_prediction(prediction) == "eps":
        return noise
    if prediction == "x0":
        return x0
    ab = schedule.alpha_bar_at(t)                                              # v
    return _coef(ab.sqrt(), x0) * noise - _coef((1 - ab).sqrt(), x0) * x0


def to_eps_x0(prediction: str, schedule: NoiseSchedule, x_t, t, out) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output into (eps, x0) at timestep t (floats; t = -1 never reaches a network)."""
    ab = schedule.alpha_bar_at(t)
    a, s = _coef(ab.sqrt(), x_t), _coef((1 - ab).sqrt(), x_t)
    if check_prediction(prediction) == "eps":
        return out, (x_t - s * out) / a
    if prediction == "x0":
        return (x_t - a * out) / s, out
    return s * x_t + a * out, a * x_t - s * out                                # v


class Denoiser:
    """Wraps a network f(x_t, t, cond) with its schedule and target; the one interface samplers use.

    With labels (`cond`, -1 = unspecified) and `guidance` w != 1, the prediction is classifier-free guided
    (Ho & Salimans 2022, eq. 6, written for any linear target): out = out_uncond + w (out_cond - out_uncond),
    both halves in one batched forward. `guidance_interval` (lo, hi) limits guidance to timesteps
    lo <= t <= hi (Kynkaanniemi et al. 2024); outside it the plain conditional prediction (w = 1) is used.
    """

    def __init__(self, net: Callable, schedule: NoiseSchedule, prediction: str = "eps", guidance: float = 1.0,
                 guidance_interval: tuple[float, float] | None = None):
        self.net, self.schedule, self.prediction = net, schedule, check_prediction(prediction)
        self.guidance, self.guidance_interval = float(guidance), guidance_interval

    def guided_at(self, t: float) -> bool:
        if self.guidance == 1.0:
            return False
        lo, hi = self.guidance_interval or (-math.inf, math.inf)
        return lo <= t <= hi

    def output(self, x_t: torch.Tensor, tt: torch.Tensor, cond=None) -> torch.Tensor:
        """The network's (guided) output at timesteps tt, in float32."""
        if cond is None:
            return self.net(x_t, tt).float()
        if not self.guided_at(float(tt[0])):
            return self.net(x_t, tt, cond).float()
        both = self.net(torch.cat([x_t, x_t]), torch.cat([tt, tt]),
                        torch.cat([cond, torch.full_like(cond, -1)])).float()
        out_cond, out_uncond = both.chunk(2)
        return out_uncond + self.guidance * (out_cond - out_uncond)

    def predict(self, x_t: torch.Tensor, t: float, cond=None, clip_x0: bool = False):
        """(eps, x0) at timestep t (an integer, or fractional between two steps) for the whole batch; x0 is
        clipped to [-1, 1] when asked, with eps recomputed from the clipped x0 so the two stay consistent."""
        dtype = torch.long if float(t).is_integer() else torch.float32
        tt = torch.full((x_t.shape[0],), t, dtype=dtype, device=x_t.device)
        eps, x0 = to_eps_x0(self.prediction, self.schedule, x_t, tt, self.output(x_t, tt, cond))
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            ab = self.schedule.alpha_bar_at(tt)
            eps = (x_t - _coef(ab.sqrt(), x_t) * x0) / _coef((1 - ab).sqrt(), x_t)
        return eps, x0
