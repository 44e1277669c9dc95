"""Diffusion maths: noise schedules, the forward process and its targets, losses, samplers.

Functions here raise ValueError for bad arguments; the command line and the web app word them for the user.
"""
from .cascade import augment_lowres, bind_lowres, random_levels
from .losses import diffusion_loss, min_snr_weight
from .process import PREDICTIONS, Denoiser, q_sample, to_eps_x0, training_target
from .samplers import (DEFAULT_EDIT_STEPS, DEFAULT_SAMPLER, DEFAULT_STEPS, REGISTRY, SAMPLERS, PerImageNoise, SamplerSpec, ddim_invert, get_sampler, image_seed, network_evaluations,
                       sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_heun, sample_repaint, sampler_spec)
from .schedules import SCHEDULES, SPACINGS, NoiseSchedule, sampling_timesteps, spaced_timesteps

__all__ = [
    "augment_lowres", "bind_lowres", "random_levels",
    "diffusion_loss", "min_snr_weight", "PREDICTIONS", "Denoiser", "q_sample", "to_eps_x0", "training_target",
    "DEFAULT_EDIT_STEPS", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "REGISTRY", "SAMPLERS", "PerImageNoise", "SamplerSpec", "ddim_invert", "get_sampler", "image_seed", "network_evaluations",
    "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_heun", "sample_repaint", "sampler_spec",
    "SCHEDULES", "SPACINGS", "NoiseSchedule", "sampling_timesteps", "spaced_timesteps",
]
