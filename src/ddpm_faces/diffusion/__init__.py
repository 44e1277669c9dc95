"""Diffusion maths: noise schedules, the forward process and its targets, losses, samplers."""
from .losses import diffusion_loss, min_snr_weight
from .process import PREDICTIONS, Denoiser, q_sample, to_eps_x0, training_target
from .samplers import (DEFAULT_SPACING, SAMPLERS, PerImageNoise, image_seed, get_sampler, network_evaluations, sample_ddim, sample_ddpm,
                       sample_dpmpp_2m, sample_heun)
from .schedules import SCHEDULES, SPACINGS, NoiseSchedule, sampling_timesteps, spaced_timesteps

__all__ = [
    "diffusion_loss", "min_snr_weight", "PREDICTIONS", "Denoiser", "q_sample", "to_eps_x0", "training_target",
    "SAMPLERS", "PerImageNoise", "get_sampler", "sample_ddim", "sample_ddpm", "SCHEDULES", "NoiseSchedule",
    "spaced_timesteps", "image_seed", "DEFAULT_SPACING", "network_evaluations", "sample_dpmpp_2m", "sample_heun", "SPACINGS", "sampling_timesteps",
]
