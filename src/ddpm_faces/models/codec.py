"""Codecs: where the diffusion runs. A model is (codec, denoiser, schedule); the denoiser works on
`x = codec.encode(images)` and the sampler's result goes back through `codec.decode(x)`.

    codec.encode(images)  (B, 3, H, W) in [-1, 1]  ->  x  (B, *codec.shape)
    codec.decode(x)       x                         ->  (B, 3, H, W) in [-1, 1]

`PixelCodec` is the identity: the diffusion runs on the pixels themselves. A latent autoencoder (Rombach et
al. 2022, https://arxiv.org/abs/2112.10752) (`LatentCodec`) is another codec with the same members
(`shape`, `image_size`, `encode`, `decode`, `bounded`); nothing outside a codec needs to know the number of
channels or the size of x.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hardware import DTYPES, resolve_precision


class Codec(nn.Module):
    """The interface: `shape` of one encoded image, `image_size` in pixels, `encode`, `decode`, and whether x
    is bounded to [-1, 1] (`bounded`: samplers may then clip their x0 estimates to that range)."""

    shape: tuple[int, int, int]            # (channels, height, width) of x
    image_size: int                        # side of the images it encodes and decodes
    bounded: bool                          # every x lies in [-1, 1]
    ENCODING: tuple[str, ...] = ()         # names (prefixes) of the tensors that x depends on

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelCodec(Codec):
    """Diffusion in pixel space: encode and decode return their input (RGB in [-1, 1])."""

    bounded = True                         # pixels in [-1, 1]: clipping x0 estimates there is right

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.shape, self.image_size = (channels, resolution, resolution), resolution

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LatentCodec(Codec):
    """Diffusion on an autoencoder's latents (Rombach et al. 2022, sec. 3 and 4.3.2): x = (mu(E(images)) - shift)
    / scale, images = D(x * scale + shift). `shift` and `scale` (per channel, measured on the training
    latents) give x roughly zero mean and unit variance, as the noise schedule assumes; they are buffers, so
    they travel with the autoencoder's weights. The latents are not bounded: about a third of them lie outside
    [-1, 1], so clipping x0 estimates there (right for pixels) would shrink every sample toward grey."""

    bounded = False
    ENCODING = ("autoencoder.encoder.", "shift", "scale")   # the tensors a latent depends on (not the decoder's)

    def __init__(self, autoencoder):
        super().__init__()
        cfg = autoencoder.cfg
        self.autoencoder = autoencoder
        self.shape, self.image_size = (cfg.latent_channels, cfg.latent_size, cfg.latent_size), cfg.resolution
        self.register_buffer("shift", torch.zeros(cfg.latent_channels))
        self.register_buffer("scale", torch.ones(cfg.latent_channels))

    def _per_channel(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's mean latents, unnormalised."""
        return self.autoencoder.encode(images).mean

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.latents(images) - self._per_channel(self.shift)) / self._per_channel(self.scale)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        z = x * self._per_channel(self.scale) + self._per_channel(self.shift)
        return self.autoencoder.decode(z.to(self.scale.dtype)).clamp(-1, 1)

    def fast_encoder(self, precision: str = "auto"):
        """`encode` in channels-last layout (and under bf16 autocast where the device has bf16 units, or when
        asked), for encoding a whole data set once. On a CPU with bf16 units: 81 against 28 images/s in fp32
        on one thread (benchmarks/latent_speed.py), with an error of std 0.004 on the unit-variance latents,
        below the smallest noise level of a cosine schedule (0.006). Without them bf16 would be ~20x slower,
        so "auto" stays in fp32."""
        self.to(memory_format=torch.channels_last)
        dtype = DTYPES[resolve_precision(precision, next(self.parameters()).device)]

        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return self.encode(images.contiguous(memory_format=torch.channels_last)).float()
        return encode

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel mean and standard deviation of the training latents."""
        self.shift.copy_(mean)
        self.scale.copy_(std.clamp_min(1e-6))
