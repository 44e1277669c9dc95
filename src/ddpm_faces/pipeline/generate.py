"""Noise to faces: run a SamplingRequest through a Pipeline.

    images = generate(pipe, SamplingRequest(num=16, seed=0))     # (16, H, W, 3) uint8

Image i depends only on (seed, first_index + i), the attributes and the sampler settings, never on the
batch size or on how many images were asked for.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion import Denoiser, PerImageNoise, sampling_timesteps
from ..errors import UserError
from ..hardware import DTYPES
from ..images import to_uint8
from .model import Pipeline
from .request import SamplingRequest
from .runtime import fast_net


def generate(pipe: Pipeline, request: SamplingRequest, *, first_index: int = 0, progress: bool = True,
             callback=None, labels: torch.Tensor | None = None, initial_noise: torch.Tensor | None = None,
             plan=None) -> np.ndarray:
    """`request.num` images as (num, H, W, 3) uint8.

    `labels` (num, n_attributes) class indices give each image its own attributes (instead of
    `request.attributes`, the same for all); `initial_noise` (num, *codec.shape) replaces the seeded
    starting noise (e.g. interpolated noise). `callback(i, t, x, x0)` sees every step, with x0 the current
    estimate of the images, decoded. `plan` (pipeline/edit.py's EditPlan) starts from a photo instead of
    noise: it chooses the timesteps, the starting x, a projection after every step and the final blend."""
    request = request.validate(pipe)
    check_inputs(pipe, request.num, labels, initial_noise)
    run = Run(pipe, request, plan, labels, initial_noise)
    bar = tqdm(total=request.num * len(run.timesteps), desc=f"sampling ({request.sampler}, {request.steps} steps)",
               unit="step", disable=not progress, leave=False)

    def step_callback(i, t, x_i, x0):
        bar.update(len(x_i))
        if callback is not None:
            callback(i, t, x_i, pipe.codec.decode(x0))

    with torch.inference_mode():
        out = [run.batch(start, first_index, step_callback)
               for start in range(first_index, first_index + request.num, request.batch_size)]
    bar.close()
    return np.concatenate(out)


def check_inputs(pipe: Pipeline, num: int, labels: torch.Tensor | None, initial_noise: torch.Tensor | None) -> None:
    n_attributes = len(pipe.cfg.model.attributes)
    if labels is not None and (not pipe.conditional or tuple(labels.shape) != (num, n_attributes)):
        raise UserError(f"labels must be ({num}, {n_attributes}) for this model, got {tuple(labels.shape)}")
    if initial_noise is not None and tuple(initial_noise.shape) != (num, *pipe.codec.shape):
        raise UserError(f"initial noise must be {(num, *pipe.codec.shape)}, got {tuple(initial_noise.shape)}")


class Run:
    """One generate() call: the denoiser, the timesteps and what each batch of images starts from."""

    def __init__(self, pipe: Pipeline, request: SamplingRequest, plan, labels, initial_noise):
        self.pipe, self.request, self.plan, self.labels, self.initial_noise = pipe, request, plan, labels, initial_noise
        self.shared = pipe.labels(request.attributes, min(request.num, request.batch_size))
        net = fast_net(pipe.net, (min(request.num, request.batch_size), *pipe.codec.shape), request.runtime)
        self.denoiser = Denoiser(autocast_net(net, request.precision), pipe.schedule,
                                 pipe.cfg.diffusion.prediction, request.guidance, request.guidance_interval)
        timesteps = sampling_timesteps(pipe.schedule, request.steps, request.timestep_spacing)
        self.timesteps = plan.timesteps(timesteps) if plan is not None else timesteps

    def batch(self, start: int, first_index: int, callback) -> np.ndarray:
        """Images start .. start + batch_size (at most up to first_index + num), as uint8."""
        pipe, request, plan = self.pipe, self.request, self.plan
        n = min(request.batch_size, first_index + request.num - start)
        rows = slice(start - first_index, start - first_index + n)
        noise = PerImageNoise(request.seed, start, n)
        x = noise(torch.empty(n, *pipe.codec.shape, device=pipe.device))
        if self.initial_noise is not None:
            x = self.initial_noise[rows].to(pipe.device, torch.float32)
        cond = self.labels[rows].to(pipe.device) if self.labels is not None else \
            None if self.shared is None else self.shared[:n]
        options = dict(noise=noise, cond=cond, callback=callback, clip_x0=pipe.codec.bounded,
                       **request.sampler_options())
        if plan is None:
            x = request.spec.fn(self.denoiser, x, self.timesteps, **options)
        else:
            x = plan.start(x, rows, self.denoiser, cond, self.timesteps)
            x = plan.sample(request.spec.fn, self.denoiser, x, self.timesteps,
                            project=plan.project(rows, self.timesteps), **options)
        images = pipe.codec.decode(x)
        return to_uint8(plan.finish(images, rows) if plan is not None else images)


def autocast_net(net, precision: str):
    """The network, under bf16 or fp16 autocast for a resolved precision other than "fp32" (the sampler's
    arithmetic stays in fp32)."""
    if precision == "fp32":
        return net
    device_type, dtype = next(net.parameters()).device.type, DTYPES[precision]   # runtime onnx is fp32 only

    def run(*args):
        with torch.autocast(device_type, dtype=dtype):
            return net(*args)
    return run


def starting_noise(pipe: Pipeline, seed: int, index: int = 0) -> torch.Tensor:
    """(1, *codec.shape): the pure noise that image `index` of seed `seed` starts from in `generate`."""
    return PerImageNoise(seed, index, 1)(torch.empty(1, *pipe.codec.shape))


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between two Gaussian noise tensors (keeps their norm, so the result still looks
    like Gaussian noise to the model; Shoemake 1985)."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.clamp(fa @ fb / (fa.norm() * fb.norm()), -1.0, 1.0)
    omega = torch.arccos(cos)
    if float(omega) < 1e-6:
        return (1 - weight) * a + weight * b
    out = (torch.sin((1 - weight) * omega) * fa + torch.sin(weight * omega) * fb) / torch.sin(omega)
    return out.reshape(a.shape).to(a.dtype)


def interpolate(pipe: Pipeline, seed_b: int, request: SamplingRequest, **kwargs) -> np.ndarray:
    """`request.num` faces along the spherical path between the starting noise of image 0 of `request.seed`
    and of `seed_b`; a deterministic sampler (ddim, dpmpp-2m, heun) makes the row change smoothly."""
    if request.num < 2:
        raise UserError(f"interpolation needs at least 2 images, got {request.num}")
    request = request.validate(pipe)
    a, b = starting_noise(pipe, request.seed), starting_noise(pipe, seed_b)
    noise = torch.cat([slerp(a, b, i / (request.num - 1)) for i in range(request.num)])
    return generate(pipe, request, initial_noise=noise, **kwargs)
