"""The first stage of latent diffusion: a small convolutional autoencoder, 128x128x3 <-> 32x32x4 (f = 4).

Rombach et al. 2022 (https://arxiv.org/abs/2112.10752), sec. 3.1 and appendix G: the encoder E maps an image
x to a latent z = E(x) of a lower resolution, the decoder D maps it back, x~ = D(z). KL-regularised: the
encoder predicts a diagonal Gaussian q(z | x) = N(mu, sigma^2) and the loss adds a small
KL(q(z | x) || N(0, I)) (weight ~1e-6), which keeps the latents' scale bounded without trading away detail.
The discriminator of the adversarial loss is in models/discriminator.py; the losses in training/.

    ae = Autoencoder(AutoencoderConfig())
    posterior = ae.encode(images)            # images (B, 3, 128, 128) in [-1, 1]
    z = posterior.sample()                   # or posterior.mean: (B, 4, 32, 32)
    recon = ae.decode(z)                     # (B, 3, 128, 128)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Upsample, group_norm


@dataclass
class AutoencoderConfig:
    resolution: int = 128                       # image side in pixels
    in_channels: int = 3
    latent_channels: int = 4                    # channels of z
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])   # per level; f = 2^(levels - 1)
    blocks_per_level: int = 1                   # residual blocks per level, each side
    groups: int = 8                             # GroupNorm groups; 0 = no normalisation
    variational: bool = True                    # predict (mu, log sigma^2) and regularise with KL

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.factor


class PlainResBlock(nn.Module):
    """norm-SiLU-conv twice with a skip connection: the UNet's ResBlock without a time embedding (the
    autoencoder sees one image, at no noise level)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _blocks(c_in: int, c_out: int, n: int, groups: int) -> list[nn.Module]:
    return [PlainResBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)]


class Encoder(nn.Module):
    """x (B, 3, R, R) -> (B, out_channels, R/f, R/f): blocks at each level, a strided conv between levels."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            layers += _blocks(ch[i - 1] if i else ch[0], c, cfg.blocks_per_level, cfg.groups)
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += [PlainResBlock(ch[-1], ch[-1], cfg.groups), group_norm(ch[-1], cfg.groups), nn.SiLU(),
                   nn.Conv2d(ch[-1], out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """z (B, latent, R/f, R/f) -> (B, 3, R, R): the encoder's levels in reverse, nearest-neighbour upsampling."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1),
                                   PlainResBlock(ch[0], ch[0], cfg.groups)]
        for i, c in enumerate(ch):
            layers += _blocks(ch[i - 1] if i else ch[0], c, cfg.blocks_per_level, cfg.groups)
            if i < len(ch) - 1:
                layers.append(Upsample(c))
        layers += [group_norm(ch[-1], cfg.groups), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)   # "the last layer" of VQGAN eq. 7

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.layers(z))


class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)); KL against N(0, I) summed over z's elements (Kingma & Welling 2014,
    appendix B): KL = 1/2 sum(mean^2 + var - 1 - logvar)."""

    def __init__(self, moments: torch.Tensor, deterministic: bool = False):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.deterministic:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + (0.5 * self.logvar).exp() * noise

    def kl(self) -> torch.Tensor:
        """Per-image KL divergence, (B,), in float32 (a sum over every element of z: in bf16 it would round)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.resolution % cfg.factor:
            raise ValueError(f"autoencoder resolution {cfg.resolution} is not divisible by its factor {cfg.factor}")
        self.cfg = cfg
        moments = 2 * cfg.latent_channels if cfg.variational else cfg.latent_channels
        self.encoder, self.decoder = Encoder(cfg, moments), Decoder(cfg)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.encoder(x)
        if not self.cfg.variational:
            h = torch.cat([h, torch.zeros_like(h)], dim=1)
        return DiagonalGaussian(h, deterministic=not self.cfg.variational)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample() if sample else posterior.mean), posterior

    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, where VQGAN's adaptive weight compares gradient norms (eq. 7)."""
        return self.decoder.conv_out.weight
