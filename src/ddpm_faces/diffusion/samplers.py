"""Samplers over a decreasing list of timesteps, all with one signature:

    sample_x(denoiser, x, timesteps, *, noise=None, cond=None, clip_x0=True, callback=None, project=None, ...)

`x` is pure noise at timesteps[0] (or a noised image, for editing); each step moves to the next timestep in
the list and the last step to t = -1 (no noise, abar = 1), so the result is an image. `noise(like)` draws the
fresh Gaussian noise of stochastic steps (see `PerImageNoise`); `callback(i, t, x, x0)` sees every step;
`project(x, s)`, when given, replaces x after every step that lands on timestep s (s = -1 at the end): how
inpainting re-imposes the known part of an image (RePaint, Lugmayr et al. 2022).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .process import Denoiser



def image_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of image `index` of a run seeded `seed`, mixed so that seeds s and s + 1 share no image;
    `stream` k > 0 gives each stage of a cascade its own noise (stage k + 1 of the same image)."""
    if seed < 0 or index < 0 or stream < 0:
        raise ValueError(f"seeds must be 0 or more, got {seed}")
    return int(np.random.SeedSequence([seed, index] + ([stream] if stream else [])).generate_state(1)[0])


class PerImageNoise:
    """Gaussian noise where image i is drawn from its own generator, seeded with image_seed(seed, i).

    Image i of seed s is then the same whether 4 or 16 images are asked for, and whatever the
    batch size: a batch of images (start, start + n) draws from generators start..start+n-1.
    """

    def __init__(self, seed: int, start: int, count: int, stream: int = 0):
        self.generators = [torch.Generator().manual_seed(image_seed(seed, i, stream))
                           for i in range(start, start + count)]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if len(like) != len(self.generators):
            raise ValueError(f"PerImageNoise holds {len(self.generators)} generators, asked for a batch of {len(like)}")
        per_image = like.shape[1:]
        z = torch.stack([torch.randn(per_image, generator=g) for g in self.generators])
        return z.to(device=like.device, dtype=like.dtype)


def _pairs(timesteps: Sequence[int]):
    """(t, s) for every step: from timesteps[i] to timesteps[i + 1], the last one to s = -1."""
    return zip(timesteps, list(timesteps[1:]) + [-1])


def _abar(denoiser: Denoiser, t: float) -> float:
    return float(denoiser.schedule.alpha_bar_at(torch.tensor([t]))[0])


# ---------------------------------------------------------------------------------------------
# DDPM ancestral sampling (Ho et al. 2020, alg. 2) on a respaced schedule (Nichol & Dhariwal 2021,
# sec. 4): from t to s, beta = 1 - abar_t / abar_s, and the posterior q(x_s | x_t, x0) (eq. 6-7):
#   mean = sqrt(abar_s) beta / (1 - abar_t) x0 + sqrt(1 - beta) (1 - abar_s) / (1 - abar_t) x_t
#   var  = beta_tilde = (1 - abar_s) / (1 - abar_t) beta   (variance="beta_tilde")   or   beta   (variance="beta")
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[int], *, noise: Callable | None = None,
                cond=None, clip_x0: bool = True, variance: str = "beta_tilde", callback: Callable | None = None,
                project: Callable | None = None):
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"unknown DDPM variance {variance!r}: choose beta_tilde or beta")
    noise = noise or torch.randn_like
    for i, (t, s) in enumerate(_pairs(timesteps)):
        x, x0 = ddpm_step(denoiser, x, t, s, noise=noise, cond=cond, clip_x0=clip_x0, variance=variance)
        x = project(x, s) if project is not None else x
        if callback is not None:
            callback(i, t, x, x0)
    return x


def ddpm_step(denoiser: Denoiser, x: torch.Tensor, t: float, s: float, *, noise: Callable, cond=None,
              clip_x0: bool = True, variance: str = "beta_tilde") -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step from timestep t to s < t (s = -1: to the clean image): (x_s, the x0 estimate)."""
    eps, x0 = denoiser.predict(x, t, cond, clip_x0=clip_x0)
    abar_t, abar_s = _abar(denoiser, t), _abar(denoiser, s)
    beta = 1 - abar_t / abar_s
    mean = (math.sqrt(abar_s) * beta / (1 - abar_t)) * x0 + (math.sqrt(1 - beta) * (1 - abar_s) / (1 - abar_t)) * x
    var = (1 - abar_s) / (1 - abar_t) * beta if variance == "beta_tilde" else beta
    return (mean + math.sqrt(var) * noise(x) if s >= 0 else mean), x0


# ---------------------------------------------------------------------------------------------
# RePaint's resampling (Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865, sec. 4.2, jump length 1):
# after each ancestral step t -> s and the re-imposition of the known region, diffuse x_s back to t,
#   x_t = sqrt(abar_t / abar_s) x_s + sqrt(1 - abar_t / abar_s) z     (q(x_t | x_s), Ho et al. 2020, eq. 2)
# and take the step again, `resample` times in all, so the generated region catches up with the known one
# instead of only being pasted next to it. resample = 1 is sample_ddpm.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_repaint(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[int], *, project: Callable,
                   resample: int, noise: Callable | None = None, cond=None, clip_x0: bool = True,
                   callback: Callable | None = None):
    if resample < 1:
        raise ValueError(f"resample must be 1 or more, got {resample}")
    noise = noise or torch.randn_like
    for i, (t, s) in enumerate(_pairs(timesteps)):
        for u in range(resample if s >= 0 else 1):
            if u:
                keep = _abar(denoiser, t) / _abar(denoiser, s)
                x = math.sqrt(keep) * x_s + math.sqrt(1 - keep) * noise(x_s)
            x_s, x0 = ddpm_step(denoiser, x, t, s, noise=noise, cond=cond, clip_x0=clip_x0)
            x_s = project(x_s, s)
        x = x_s
        if callback is not None:
            callback(i, t, x, x0)
    return x


# ---------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021, https://arxiv.org/abs/2010.02502, eq. 12 and 16):
#   x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z,
#   sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s).
# eta = 0 is deterministic; eta = 1 is DDPM's beta_tilde variance.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[int], *, noise: Callable | None = None,
                cond=None, clip_x0: bool = True, eta: float = 0.0, callback: Callable | None = None,
                project: Callable | None = None):
    noise = noise or torch.randn_like
    for i, (t, s) in enumerate(_pairs(timesteps)):
        eps, x0 = denoiser.predict(x, t, cond, clip_x0=clip_x0)
        abar_t, abar_s = _abar(denoiser, t), _abar(denoiser, s)
        sigma = eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        x = math.sqrt(abar_s) * x0 + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise(x)
        x = project(x, s) if project is not None else x
        if callback is not None:
            callback(i, t, x, x0)
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022, https://arxiv.org/abs/2211.01095, alg. 2), data prediction, multistep.
# With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), h = lambda_s - lambda_t:
#   x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D,
#   D = x0_t on the first step, else (1 + 1/(2r)) x0_t - 1/(2r) x0_prev with r = h_prev / h.
# The last step (to no noise) returns x0.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[float], *,
                    noise: Callable | None = None, cond=None, clip_x0: bool = True, callback: Callable | None = None,
                    project: Callable | None = None):
    x0_prev, h_prev = None, None
    for i, (t, s) in enumerate(_pairs(timesteps)):
        _, x0 = denoiser.predict(x, t, cond, clip_x0=clip_x0)
        if s < 0:
            x = x0
        else:
            (a_t, sig_t), (a_s, sig_s) = _alpha_sigma(denoiser, t), _alpha_sigma(denoiser, s)
            h = math.log(a_s / sig_s) - math.log(a_t / sig_t)
            d = x0 if x0_prev is None else (1 + 1 / (2 * h_prev / h)) * x0 - (1 / (2 * h_prev / h)) * x0_prev
            x = (sig_s / sig_t) * x - a_s * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        x = project(x, s) if project is not None else x
        if callback is not None:
            callback(i, t, x, x0)
    return x


# ---------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023, https://arxiv.org/abs/2302.04867, sec. 3 and app.), data prediction x0, B(h) = e^h - 1
# ("bh2"), multistep. alpha, sigma, lambda as above; the step from t_{i-1} to t_i has h_i = lambda_{t_i} -
# lambda_{t_{i-1}} > 0, and the data-prediction form is the noise-prediction one with h -> -h (write hh = -h_i):
#   x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{hh} - 1) x0_{i-1}
#             - alpha_{t_i} B(hh) sum_{m=1..K} (a_m / r_m) D_m,
#   r_m = (lambda_{s_m} - lambda_{t_{i-1}}) / h_i,   D_m = x0(s_m) - x0_{i-1},   x0_{i-1} = x0 at t_{i-1},
# with a = (a_1..a_K) solving R_K(h) a = phi_K(h) / B(h), i.e.  sum_m a_m r_m^{k-1} = k! hh phi_{k+1}(hh) / B(hh),
# k = 1..K, where phi_1(hh) = (e^{hh} - 1) / hh and phi_{k+1}(hh) = (phi_k(hh) - 1/k!) / hh.
#   UniP-p, the predictor x~_{t_i}: the s_m are the p - 1 timesteps before t_{i-1} (p = 1: DDIM; p = 2: s_1 = t_{i-2}).
#   UniC-p, the corrector x~^c_{t_i}: the same points plus the new one, s_K = t_i, r_K = 1, with x0(t_i) taken at
#   the predicted x~_{t_i}. That evaluation is also x0_i for the next step, so the corrector costs no network
#   call; the state x_{t_i} carried on is x~^c_{t_i}.
# A one-coefficient system (UniP-2, UniC-1) uses a_1 = 1/2, its h -> 0 limit, as the authors' code does: UniP-2
# is then DPM-Solver++(2M) exactly (and it measured better than the exact a_1 at 5 to 20 steps, on the Gaussian
# test and on the bundled models). Order p = 1 on the first step, 2 after; the last step (to no noise, lambda =
# inf) is order 1 and returns x0, as DPM-Solver++ does, so no corrector follows it (and the corrector before it
# only reaches the callback: that x0 was evaluated at the predicted point). With `project`, the predicted point
# is projected before the network sees it and the corrected one after.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[float], *, noise: Callable | None = None,
                 cond=None, clip_x0: bool = True, callback: Callable | None = None, project: Callable | None = None):
    _, x0 = denoiser.predict(x, timesteps[0], cond, clip_x0=clip_x0)
    before = None                                   # (lambda, x0) at the timestep before t, once there is one
    for i, (t, s) in enumerate(_pairs(timesteps)):
        x0_t = x0
        if s < 0:
            x = x0_t
        else:
            (a_t, sig_t), (a_s, sig_s) = _alpha_sigma(denoiser, t), _alpha_sigma(denoiser, s)
            lam_t = math.log(a_t / sig_t)
            h = math.log(a_s / sig_s) - lam_t
            hh = -h
            base = (sig_s / sig_t) * x - a_s * math.expm1(hh) * x0_t             # order 1: DDIM
            rs, ds = ([(before[0] - lam_t) / h], [before[1] - x0_t]) if before is not None else ([], [])

            def uni(rs, ds):
                a = _unipc_coefficients(hh, rs)
                return base - (a_s * math.expm1(hh)) * sum(a_m / r_m * d_m for a_m, r_m, d_m in zip(a, rs, ds))

            x_pred = uni(rs, ds) if rs else base                                 # UniP
            x_pred = project(x_pred, s) if project is not None else x_pred
            _, x0 = denoiser.predict(x_pred, s, cond, clip_x0=clip_x0)
            x = uni(rs + [1.0], ds + [x0 - x0_t])                                # UniC
            before = (lam_t, x0_t)
        x = project(x, s) if project is not None else x
        if callback is not None:
            callback(i, t, x, x0_t)
    return x


def _unipc_coefficients(hh: float, rs: Sequence[float]) -> list[float]:
    """UniPC's a_1..a_K for the r_1..r_K (the system above, B(hh) = e^{hh} - 1); a_1 = 1/2 when K = 1."""
    if len(rs) == 1:
        return [0.5]
    b_of_h = math.expm1(hh)
    hh_phi, factorial, rhs = math.expm1(hh) / hh - 1, 1, []                # hh phi_2(hh), 1!
    for k in range(1, len(rs) + 1):
        rhs.append(factorial * hh_phi / b_of_h)
        factorial *= k + 1
        hh_phi = hh_phi / hh - 1 / factorial                                   # hh phi_{k+2}(hh)
    powers = np.array([[r ** (k - 1) for r in rs] for k in range(1, len(rs) + 1)], dtype=np.float64)
    return np.linalg.solve(powers, np.array(rhs)).tolist()


# ---------------------------------------------------------------------------------------------
# Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, alg. 1, no churn), written in
# the variance-exploding variable x~ = x_t / alpha_t = x0 + sigma eps with sigma = sqrt((1 - abar) / abar):
#   d = (x~ - x0(x~, sigma)) / sigma;  x~' = x~ + (sigma_s - sigma_t) d;
#   x~_s = x~ + (sigma_s - sigma_t) (d + d') / 2,  d' at (x~', sigma_s)   (Euler on the last step, to sigma 0).
# Two network evaluations per step except the last.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[float], *, noise: Callable | None = None,
                cond=None, clip_x0: bool = True, callback: Callable | None = None, project: Callable | None = None):
    def slope(x_ve, t):
        a, sig = _alpha_sigma(denoiser, t)
        _, x0 = denoiser.predict(a * x_ve, t, cond, clip_x0=clip_x0)
        return (x_ve - x0) / (sig / a), x0

    x = x / _alpha_sigma(denoiser, timesteps[0])[0]
    for i, (t, s) in enumerate(_pairs(timesteps)):
        sigma_t, sigma_s = _ve_sigma(denoiser, t), _ve_sigma(denoiser, s)
        d, x0 = slope(x, t)
        x_next = x + (sigma_s - sigma_t) * d
        if s >= 0:
            d_next, _ = slope(x_next, s)
            x_next = x + (sigma_s - sigma_t) * (d + d_next) / 2
        x = x_next
        if project is not None:                              # in the variance-preserving variable x_s = alpha_s x~
            a_s = _alpha_sigma(denoiser, s)[0]
            x = project(x * a_s, s) / a_s
        if callback is not None:
            callback(i, t, x * _alpha_sigma(denoiser, s)[0], x0)
    return x


def _alpha_sigma(denoiser: Denoiser, t: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) of the variance-preserving process."""
    ab = _abar(denoiser, t)
    return math.sqrt(ab), math.sqrt(1 - ab)


def _ve_sigma(denoiser: Denoiser, t: float) -> float:
    a, sig = _alpha_sigma(denoiser, t)
    return sig / a


# ---------------------------------------------------------------------------------------------
# DDIM inversion (Song et al. 2021, sec. 4.3): the deterministic update run from the data towards the noise
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_invert(denoiser, x0: torch.Tensor, timesteps: list[float], between_steps=None) -> torch.Tensor:
    """x at timesteps[0] from the clean x0 by the DDIM update run backwards (eta = 0), visiting the timesteps in
    increasing order; the network is evaluated at the point reached so far (at the lowest timestep for x0).
    `between_steps()`, when given, is called before every step (a caller stops the inversion by raising)."""
    schedule, x, prev = denoiser.schedule, x0, -1.0
    for t in reversed(timesteps):
        if between_steps is not None:
            between_steps()
        eps, _ = denoiser.predict(x, t if prev < 0 else prev, None, clip_x0=False)
        abar_prev = float(schedule.alpha_bar_at(torch.tensor([prev]))[0])
        abar_t = float(schedule.alpha_bar_at(torch.tensor([t]))[0])
        x0_hat = (x - math.sqrt(1 - abar_prev) * eps) / math.sqrt(abar_prev)
        x, prev = math.sqrt(abar_t) * x0_hat + math.sqrt(1 - abar_t) * eps, t
    return x


# ---------------------------------------------------------------------------------------------
# The registry: one row per sampler. A new sampler is one function above plus one row here.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable                          # sample_x(denoiser, x, timesteps, *, noise, cond, clip_x0, callback, ...)
    spacing: str                          # default timestep spacing (see schedules.sampling_timesteps)
    calls_per_step: int = 1               # network calls per step; every sampler's last step makes one
    options: tuple[str, ...] = ()         # its own keyword options, e.g. DDIM's eta
    stochastic: bool = False              # draws fresh noise at every step (else deterministic given its start;
    #                                       DDIM with eta > 0 too: SamplingRequest.deterministic)

    def network_evaluations(self, steps: int) -> int:
        return self.calls_per_step * steps - (self.calls_per_step - 1)


REGISTRY: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ddpm", sample_ddpm, "trailing", stochastic=True),
    SamplerSpec("ddim", sample_ddim, "trailing", options=("eta",)),
    SamplerSpec("dpmpp-2m", sample_dpmpp_2m, "karras"),
    SamplerSpec("unipc", sample_unipc, "karras"),
    SamplerSpec("heun", sample_heun, "karras", calls_per_step=2),
)}
SAMPLERS = tuple(REGISTRY)
# The fewest steps whose FID (500 samples against val, benchmarks/step_sweep.py) stays within 2% of 20 steps of
# DPM-Solver++ on both bundled models: 8 (faces32 40.0 against 43.6, latent128 78.5 against 84.5).
# Edits start part-way through the steps (strength 0.8 starts near t = 590 of 1000 on a cosine schedule), so they keep 20.
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_EDIT_STEPS = "dpmpp-2m", 8, 20


def sampler_spec(name: str) -> SamplerSpec:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}") from None


def network_evaluations(sampler: str, steps: int) -> int:
    """How many times a sampler calls the network for `steps` timesteps."""
    return sampler_spec(sampler).network_evaluations(steps)


def get_sampler(name: str) -> Callable:
    return sampler_spec(name).fn
