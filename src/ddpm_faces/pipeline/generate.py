"""Noise to faces: run a SamplingRequest through a Pipeline.

    images = generate(pipe, SamplingRequest(num=16, seed=0))     # (16, H, W, 3) uint8

Image i depends only on (seed, first_index + i), the attributes and the sampler settings, never on the
batch size or on how many images were asked for. The attributes not asked for are drawn per image from the
training data's frequencies (request.unasked "data", the default; `drawn_labels`), so guidance has something
to guide on every face.

A cascade (a super-resolution stage whose `previous` stage draws its low-resolution images) runs stage by
stage for each batch: stage 1 as asked by the request, then stage 2 with its own steps, augmentation level and
guidance (request.sr_*, else the stage's lowres config), on its own noise (PerImageNoise stream 1), from
stage 1's images rounded to 8 bits, as if read from a PNG. Given
`lowres` images, a super-resolution stage upscales those instead of drawing them.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion import Denoiser, PerImageNoise, augment_lowres, bind_lowres, image_seed, sampling_timesteps
from ..errors import UserError
from ..hardware import DTYPES
from ..images import resize_images, to_uint8
from ..models.conditioning import UNSPECIFIED, draw_unasked
from .edit import EditPlan
from .model import Pipeline
from .request import SamplingRequest
from .runtime import fast_net

LABEL_STREAM = 1000          # the per-image generator stream that draws unasked attributes (stages' noise: 0, 1, ...)


def generate(pipe: Pipeline, request: SamplingRequest, *, first_index: int = 0, progress: bool = True,
             callback=None, labels: torch.Tensor | None = None, initial_noise: torch.Tensor | None = None,
             plan: EditPlan | None = None, lowres: torch.Tensor | None = None) -> np.ndarray:
    """`request.num` images as (num, H, W, 3) uint8.

    `labels` (num, n_attributes) class indices give each image its own attributes (instead of
    `request.attributes`, the same for all); `initial_noise` (num, *codec.shape) replaces the seeded
    starting noise (e.g. interpolated noise). `callback(i, t, x, x0)` sees every step, with x0 the current
    estimate of the images, decoded. `plan` (pipeline/edit.py's EditPlan) starts from a photo instead of
    noise: it chooses the timesteps, the starting x, a projection after every step and the final blend; with a
    cascade it edits at stage 1 (a plan built on `pipe.stages[0]`) and the later stages upscale the edit.
    `lowres` (num, 3, r, r) in [-1, 1]: the images a super-resolution stage upscales (instead of its stage 1's).
    """
    request = request.validate(pipe)
    check_inputs(pipe, request.num, labels, initial_noise, lowres)
    if labels is None and plan is None and lowres is None:
        labels = drawn_labels(pipe.stages[0], request, first_index)
    runs = chain(pipe, request, plan, labels, initial_noise, given_lowres=lowres is not None)
    total = sum(len(run.timesteps) for run in runs)
    bar = tqdm(total=request.num * total, desc=f"sampling ({request.sampler}, {total} steps)",
               unit="step", disable=not progress, leave=False)

    with torch.inference_mode():
        out = []
        for start in range(first_index, first_index + request.num, request.batch_size):
            images = lowres[start - first_index: start - first_index + request.batch_size] \
                if lowres is not None else None
            for run in runs:                    # each stage's images as 8-bit pictures: what `upscale` would read
                images = run.images(start, first_index, stage_callback(run, bar, callback), lowres=images)
                images = images.clamp(-1, 1).add(1).mul(127.5).round().div(127.5).sub(1)
            out.append(to_uint8(images))
    bar.close()
    return np.concatenate(out)


def drawn_labels(pipe: Pipeline, request: SamplingRequest, first_index: int = 0) -> torch.Tensor | None:
    """(num, n_attributes) labels where request.unasked is "data": the asked attributes, and each one not asked
    drawn for image i from the training data's frequencies given the asked ones (model.label_counts), with the
    generator of image i (stream LABEL_STREAM), so image i depends only on (seed, first_index + i). None where
    nothing is drawn: request.unasked "model", an unconditional model, every attribute asked, or a model
    exported before it recorded label counts."""
    m = pipe.cfg.model
    if request.unasked != "data" or not pipe.conditional or not m.label_counts or \
            len(request.attributes) == len(m.attributes):
        return None
    asked = pipe.labels(request.attributes, 1)
    asked = asked[0].cpu() if asked is not None else torch.full((len(m.attributes),), UNSPECIFIED)
    generators = [torch.Generator().manual_seed(image_seed(request.seed, i, LABEL_STREAM))
                  for i in range(first_index, first_index + request.num)]
    return draw_unasked(m.label_counts, [len(m.vocab[a]) for a in m.attributes], asked, generators)


def stage_steps(pipe: Pipeline, request: SamplingRequest, upscaling: bool = False) -> list[int]:
    """The number of sampling steps of each stage that `generate` runs for `request` (first stage first)."""
    stages = [pipe] if upscaling or pipe.previous is None else pipe.stages
    return [request.for_stage(s).steps if s.superres else request.steps for s in stages]


def stage_callback(run: StageRun, bar, callback):
    """The sampler's per-step callback for one stage: the progress bar and the caller's callback, with the
    current estimate decoded to images."""
    def step(i, t, x_i, x0):
        bar.update(len(x_i))
        if callback is not None:
            callback(i, t, x_i, run.pipe.codec.decode(x0))
    return step


def chain(pipe: Pipeline, request: SamplingRequest, plan: EditPlan | None, labels, initial_noise, given_lowres: bool) -> list[StageRun]:
    """One StageRun per stage that draws the images, first stage first (one for a plain model; with given lowres
    images a super-resolution stage alone). The request's sampler settings and attributes go to stage 1; a
    super-resolution stage takes its own steps, level and guidance."""
    stages = [pipe] if given_lowres or pipe.previous is None else pipe.stages
    if plan is not None and given_lowres:
        raise UserError("an edit starts from a photo, not from low-resolution images: give one or the other")
    runs = []
    for k, stage in enumerate(stages):                  # an edit (plan) runs on stage 1; later stages upscale it
        stage_request = request if k == 0 and not stage.superres else request.for_stage(stage)
        runs.append(StageRun(stage, stage_request, plan if k == 0 else None, labels, initial_noise if k == 0 else None,
                        stream=int(stage.superres)))
    return runs


def check_inputs(pipe: Pipeline, num: int, labels: torch.Tensor | None, initial_noise: torch.Tensor | None,
                 lowres: torch.Tensor | None = None) -> None:
    n_attributes = len(pipe.cfg.model.attributes)
    if labels is not None and (not pipe.conditional or tuple(labels.shape) != (num, n_attributes)):
        raise UserError(f"labels must be ({num}, {n_attributes}) for this model, got {tuple(labels.shape)}")
    first = pipe.stages[0] if lowres is None else pipe
    if initial_noise is not None and tuple(initial_noise.shape) != (num, *first.codec.shape):
        raise UserError(f"initial noise must be {(num, *first.codec.shape)}, got {tuple(initial_noise.shape)}")
    if lowres is not None:
        side = pipe.cfg.lowres.resolution
        if not pipe.superres:
            raise UserError(f"{pipe.source} is not a super-resolution stage: it cannot upscale images")
        if tuple(lowres.shape) != (num, 3, side, side):
            raise UserError(f"low-resolution images must be ({num}, 3, {side}, {side}), got {tuple(lowres.shape)}")
    elif pipe.superres and pipe.previous is None:
        raise UserError(f"{pipe.source} is a super-resolution stage loaded without its stage 1: give it images to "
                        "upscale, or load it with its stage 1")


class StageRun:
    """One generate() call: the denoiser, the timesteps and what each batch of images starts from."""

    def __init__(self, pipe: Pipeline, request: SamplingRequest, plan: EditPlan | None, labels, initial_noise,
                 stream: int = 0):
        self.pipe, self.request, self.plan, self.labels, self.initial_noise = pipe, request, plan, labels, initial_noise
        self.stream = stream
        self.shared = pipe.labels(request.attributes, min(request.num, request.batch_size))
        runtime = "plain" if pipe.superres else request.runtime      # ONNX export takes the plain signature only
        net = fast_net(pipe.net, (min(request.num, request.batch_size), *pipe.codec.shape), runtime)
        self.net = autocast_net(net, request.precision)
        self.denoiser = self.denoiser_for(self.net)
        self.timesteps = plan.timesteps(request.steps, request.timestep_spacing) if plan is not None else \
            sampling_timesteps(pipe.schedule, request.steps, request.timestep_spacing)

    def denoiser_for(self, net) -> Denoiser:
        request = self.request
        return Denoiser(net, self.pipe.schedule, self.pipe.cfg.diffusion.prediction, request.guidance,
                        request.interval_for(self.pipe.schedule.T))

    def images(self, start: int, first_index: int, callback, lowres: torch.Tensor | None = None) -> torch.Tensor:
        """Images start .. start + batch_size (at most up to first_index + num), decoded, in [-1, 1]; a
        super-resolution stage upscales `lowres`, the previous stage's images of the same rows."""
        pipe, request, plan = self.pipe, self.request, self.plan
        n = min(request.batch_size, first_index + request.num - start)
        rows = slice(start - first_index, start - first_index + n)
        noise = PerImageNoise(request.seed, start, n, self.stream)
        denoiser = self.denoiser
        if pipe.superres:
            denoiser = self.denoiser_for(self.with_lowres(lowres, noise))
        x = noise(torch.empty(n, *pipe.codec.shape, device=pipe.device))
        if self.initial_noise is not None:
            x = self.initial_noise[rows].to(pipe.device, torch.float32)
        cond = self.labels[rows].to(pipe.device) if self.labels is not None else \
            None if self.shared is None else self.shared[:n]
        common = dict(noise=noise, cond=cond, callback=callback, clip_x0=pipe.codec.bounded)
        own = request.sampler_options()             # the sampler's own options, as the registry lists them
        if plan is None:
            x = request.spec.fn(denoiser, x, self.timesteps, **common, **own)
        else:
            x = plan.starting_latents(x, denoiser, self.timesteps)
            x = plan.denoise(request.spec, denoiser, x, self.timesteps, project=plan.kept_region(rows),
                             common=common, own=own)
        images = pipe.codec.decode(x)
        return plan.blend(images) if plan is not None else images

    def with_lowres(self, lowres: torch.Tensor, noise: PerImageNoise):
        """The network with the low-resolution images bound, augmented to the request's level with noise drawn
        first from each image's own generator."""
        pipe = self.pipe
        lowres = resize_images(lowres.to(pipe.device, torch.float32), pipe.cfg.lowres.resolution)
        level = torch.full((len(lowres),), self.request.sr_level, dtype=torch.long, device=pipe.device)
        z = augment_lowres(pipe.schedule, lowres, level, noise(lowres))
        return bind_lowres(self.net, z, level)


def autocast_net(net, precision: str):
    """The network, under bf16 or fp16 autocast for a resolved precision other than "fp32" (the sampler's
    arithmetic stays in fp32)."""
    if precision == "fp32":
        return net
    device_type, dtype = next(net.parameters()).device.type, DTYPES[precision]   # runtime onnx is fp32 only

    def run(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return net(*args, **kwargs)
    return run


def starting_noise(pipe: Pipeline, seed: int, index: int = 0) -> torch.Tensor:
    """(1, *codec.shape): the pure noise that image `index` of seed `seed` starts from in `generate` (for a
    cascade, its first stage's)."""
    return PerImageNoise(seed, index, 1)(torch.empty(1, *pipe.stages[0].codec.shape))


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
    and of `seed_b`; a deterministic sampler (ddim, dpmpp-2m, heun) makes the row change smoothly. Attributes
    not asked for (request.unasked "data") are drawn once, for image 0 of `request.seed`, and kept along the row."""
    if request.num < 2:
        raise UserError(f"interpolation needs at least 2 images, got {request.num}")
    request = request.validate(pipe)
    a, b = starting_noise(pipe, request.seed), starting_noise(pipe, seed_b)
    noise = torch.cat([slerp(a, b, i / (request.num - 1)) for i in range(request.num)])
    drawn = drawn_labels(pipe.stages[0], request.replace(num=1))        # one draw for the whole row
    labels = drawn.repeat(request.num, 1) if drawn is not None else None
    return generate(pipe, request, initial_noise=noise, labels=labels, **kwargs)
