"""The loss of one batch, shared by the training step and the validation loss.

    loss = diffusion_step(pipe, batch["images"], labels=labels, label_dropout=0.1)     # random t and noise
    losses = diffusion_step(pipe, images, t=t, noise=noise, reduce=False)               # fixed ones

The images go through the pipeline's codec first, so the loss is taken wherever the diffusion runs (the
pixels for PixelCodec, a latent space for an autoencoder); nothing here knows the shape of x.
"""
from __future__ import annotations

import torch

from ..diffusion import augment_lowres, bind_lowres, diffusion_loss, random_levels
from ..images import resize_images
from ..models.conditioning import drop_labels
from ..pipeline import Pipeline


def diffusion_step(pipe: Pipeline, images: torch.Tensor | None, *, x0: torch.Tensor | None = None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, label_dropout: float = 0.0, reduce: bool = True,
                   lowres: torch.Tensor | None = None, lowres_t: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising loss of `images` (B, 3, H, W) in [-1, 1] under `pipe.net`, or of `x0`, images already
    encoded (cached latents).

    x0 = codec.encode(images); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4) and the
    MSE to the prediction target (eq. 14, min-SNR weighted per cfg.diffusion). `t` (uniform over 0..T-1) and
    `noise` (standard normal) are drawn in that order when not given. `labels` lose each entry with
    probability `label_dropout`, which teaches the unconditional path of classifier-free guidance (Ho &
    Salimans 2022, https://arxiv.org/abs/2207.12598). The mean loss, or with reduce=False one per image.

    A super-resolution stage also sees `lowres` (B, 3, r, r) in [-1, 1], by default `images` taken down to
    lowres.resolution, noise-augmented to levels `lowres_t` (default: uniform over 0 .. lowres.train_max_level;
    diffusion/cascade.py); its noise is drawn after t and the noise of x."""
    device = pipe.device
    if x0 is None:
        with torch.no_grad():                                # the codec is fixed: no gradient through it
            x0 = pipe.codec.encode(images.to(device))
    x0 = x0.to(device)
    if t is None:
        t = torch.randint(0, pipe.schedule.T, (len(x0),))
    if noise is None:
        noise = torch.randn_like(x0)
    cond = None if labels is None else drop_labels(labels, label_dropout).to(device)
    d, net = pipe.cfg.diffusion, pipe.net
    if pipe.cfg.model.lowres_channels:
        net = lowres_net(pipe, images, lowres, lowres_t, len(x0))
    return diffusion_loss(net, pipe.schedule, x0, t.to(device), noise.to(device), prediction=d.prediction,
                          min_snr_gamma=d.min_snr_gamma, cond=cond, reduce=reduce)


def lowres_net(pipe: Pipeline, images: torch.Tensor | None, lowres: torch.Tensor | None,
               lowres_t: torch.Tensor | None, batch: int):
    """pipe.net with its augmented low-resolution images bound (a super-resolution stage)."""
    lr = pipe.cfg.lowres
    if lowres is None:
        if images is None:
            raise ValueError("a super-resolution stage's loss needs its low-resolution images (or the images)")
        lowres = resize_images(images, lr.resolution)
    if lowres_t is None:
        lowres_t = random_levels(batch, lr.train_max_level)
    lowres, lowres_t = lowres.to(pipe.device), lowres_t.to(pipe.device)
    z = augment_lowres(pipe.schedule, lowres, lowres_t, torch.randn_like(lowres))
    return bind_lowres(pipe.net, z, lowres_t)
