"""Editing a real photo with any model: start the sampler from the photo instead of from noise.

    photo = to_model_range(...)                                  # (1, 3, S, S) in [-1, 1], S = codec.image_size
    plan = EditPlan(pipe, photo, EditRequest(strength=0.8))      # + mask=..., invert=True, resample=...
    faces = generate(pipe, SamplingRequest(num=4, attributes={"age": "60-69"}, guidance=3), plan=plan)

generate() asks the plan, in order: `timesteps` (where the edit's steps fall), `starting_latents` (the photo
noised or inverted to the first of them), `kept_region` (the projection of the region a mask keeps),
`denoise` (the sampler, or RePaint's resampled steps) and `blend` (the kept pixels from the photo itself).

- SDEdit (Meng et al. 2022, https://arxiv.org/abs/2108.01073, sec. 3): encode the photo, x0 = E(photo), noise it
  to the timestep that `strength` picks, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z (Ho et al. 2020, eq. 4),
  and denoise with the attributes and guidance asked for. The strength is the noise's share of that start,
  sqrt(1 - abar_t) = strength (`start_timestep`): strength 0 gives the photo back (through the codec), 1 a
  fresh sample, and what is kept of the photo falls evenly in between on every schedule. round(strength x
  steps) steps run, placed by the sampler's spacing between the start and 0.
- DDIM inversion (Song et al. 2021, https://arxiv.org/abs/2010.02502, sec. 4.3): instead of fresh noise, run
  the deterministic DDIM update backwards, x_t = sqrt(abar_t) x0(x_s) + sqrt(1 - abar_t) eps(x_s), from the
  photo up to that timestep, so what is not asked to change keeps the person. It inverts without guidance
  (the photo's attributes are unknown); guided sampling from an inverted start drifts from the photo as the
  guidance grows (Mokady et al. 2023, https://arxiv.org/abs/2211.09794, sec. 3).
- Inpainting (RePaint, Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865, eq. 8-9): with a mask (1 =
  redraw, 0 = keep), after every step to timestep s the kept region is replaced by the photo noised to s,
  x_s = m x_s + (1 - m) q(x_s | x0), and at the end by the photo itself. For a latent model the mask is taken
  down to the latent grid (a cell is redrawn if any of its pixels is) and the decoded faces are blended with
  the photo at full resolution. `resample` > 1 adds RePaint's resampling (sec. 4.2): each ancestral step is
  taken `resample` times, diffusing the result back in between (diffusion.sample_repaint), so the redrawn
  region is made to agree with the kept one, at `resample` times the network calls.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..diffusion import SamplerSpec, ddim_invert, image_seed, q_sample, sample_repaint, sampling_timesteps
from ..errors import UserError
from .model import Pipeline
from .request import EditRequest

MASK_SEED = 2**40            # the noise that re-imposes the kept region has its own seeds, apart from the image's


class EditPlan:
    """The edit `edit` of `photo` (1, 3, S, S) in [-1, 1] as generate() runs it: the timesteps, the starting
    latents, the projection of the kept region, the denoising and the final blend. `seed` seeds the noise that
    re-imposes a mask's kept region; `between_steps` is called between DDIM inversion steps (raise to stop)."""

    def __init__(self, pipe: Pipeline, photo: torch.Tensor, edit: EditRequest = EditRequest(), *, seed: int = 0,
                 between_steps=None):
        edit.validate()
        check_photo(pipe, photo, edit.mask)
        self.pipe, self.edit, self.seed, self.between_steps = pipe, edit, seed, between_steps
        self.photo = photo.to(pipe.device, torch.float32)
        with torch.inference_mode():
            self.x0 = pipe.codec.encode(self.photo)
        mask = edit.mask
        self.mask = None if mask is None else mask.to(pipe.device, torch.float32)
        self.latent_mask = None if mask is None else F.adaptive_max_pool2d(self.mask, self.x0.shape[-2:])

    def timesteps(self, steps: int, spacing: str) -> list[float]:
        """The edit's timesteps: round(strength x steps) of them (at least one), placed by the sampler's spacing
        between the start (start_timestep) and 0; the whole schedule at strength 1, none at 0."""
        schedule = self.pipe.schedule
        if self.edit.strength >= 1:
            return sampling_timesteps(schedule, steps, spacing)
        if self.edit.strength <= 0:
            return []
        count = max(1, round(self.edit.strength * steps))
        return sampling_timesteps(schedule, count, spacing, t_max=start_timestep(schedule, self.edit.strength))

    def starting_latents(self, noise_x: torch.Tensor, denoiser, timesteps: list[float]) -> torch.Tensor:
        """The photo's x0 taken to timesteps[0]: noised with the batch's seeded noise, or DDIM-inverted."""
        x0 = self.x0.expand(len(noise_x), *self.x0.shape[1:])
        if not timesteps:
            return x0.clone()
        if self.edit.strength >= 1 and not self.edit.invert:     # a fresh sample: the same start as without a photo
            return noise_x
        if self.edit.invert:
            return ddim_invert(denoiser, x0, timesteps, between_steps=self.between_steps)
        t = torch.full((len(x0),), timesteps[0])
        return q_sample(self.pipe.schedule, x0, t, noise_x)

    def kept_region(self, rows: slice):
        """RePaint's re-imposition of the kept region after every step, for the images `rows` (None without a
        mask)."""
        if self.latent_mask is None:
            return None
        keep = 1.0 - self.latent_mask
        generator = torch.Generator().manual_seed(image_seed(self.seed, MASK_SEED + rows.start))

        def project(x: torch.Tensor, s: float) -> torch.Tensor:
            x0 = self.x0.expand_as(x)
            if s < 0:
                known = x0
            else:
                z = torch.randn(x.shape, generator=generator).to(x.device)
                known = q_sample(self.pipe.schedule, x0, torch.full((len(x),), s), z)
            return self.latent_mask * x + keep * known
        return project

    def denoise(self, spec: SamplerSpec, denoiser, x: torch.Tensor, timesteps: list[float], *, project,
                common: dict, own: dict) -> torch.Tensor:
        """Run the sampler `spec` from the start with the options every sampler takes (`common`) and its own
        (`own`, the registry's spec.options), or with resample > 1 RePaint's resampled ancestral steps, which take
        none of a sampler's own options."""
        resample = self.edit.resample_for(own)
        if resample > 1:
            given = {k: v for k, v in own.items() if v}
            if given:
                raise UserError(f"resampling (RePaint) takes ancestral DDPM steps, which have no {', '.join(given)}: "
                                f"leave {', '.join(given)} at 0, or resample at 1")
            return sample_repaint(denoiser, x, timesteps, project=project, resample=resample, **common)
        return spec.fn(denoiser, x, timesteps, project=project, **common, **own)

    def blend(self, images: torch.Tensor) -> torch.Tensor:
        """With a mask, the kept pixels come from the photo itself (the codec may have changed them)."""
        if self.mask is None:
            return images
        return self.mask * images + (1.0 - self.mask) * self.photo.expand_as(images)


def start_timestep(schedule, strength: float) -> float:
    """The (fractional) timestep an edit of `strength` in (0, 1) starts from: where the noise's share of
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z is the strength, sqrt(1 - abar_t) = strength, so the photo's
    signal sqrt(abar_t) = sqrt(1 - strength^2) goes evenly from all (0) to none (1) with the strength,
    whatever the schedule or the sampler's spacing (a fraction of the timesteps would not: a cosine schedule's
    signal is almost gone long before its last timestep)."""
    sigma = strength / math.sqrt(1 - strength ** 2)          # sigma_t = sqrt((1 - abar_t) / abar_t)
    return float(schedule.t_from_sigma(torch.tensor([sigma]))[0])


def check_photo(pipe: Pipeline, photo: torch.Tensor, mask: torch.Tensor | None) -> None:
    """One-line errors for a photo or mask of a shape the model cannot edit."""
    size = pipe.codec.image_size
    if tuple(photo.shape) != (1, 3, size, size):
        raise UserError(f"the photo must be (1, 3, {size}, {size}) for this model, got {tuple(photo.shape)}")
    if mask is None:
        return
    if tuple(mask.shape) != (1, 1, size, size):
        raise UserError(f"the mask must be (1, 1, {size}, {size}) like the photo, got {tuple(mask.shape)}")
