"""Codecs: where the diffusion runs. A model is (codec, denoiser, schedule); the denoiser works on
`x = codec.encode(images)` and the sampler's result goes back through `codec.decode(x)`.

    codec.encode(images)  (B, 3, H, W) in [-1, 1]  ->  x  (B, *codec.shape)
    codec.decode(x)       x                         ->  (B, 3, H, W) in [-1, 1]

`PixelCodec` is the identity: the diffusion runs on the pixels themselves. A latent autoencoder (Rombach et
al. 2022, https://arxiv.org/abs/2112.10752) is another codec with the same three members; nothing outside a
codec needs to know the number of channels or the size of x.
"""
from __future__ import annotations

import torch
from torch import nn


class Codec(nn.Module):
    """The interface: `shape` of one encoded image, `image_size` in pixels, `encode`, `decode`."""

    shape: tuple[int, int, int]            # (channels, height, width) of x
    image_size: int                        # side of the images it encodes and decodes

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelCodec(Codec):
    """Diffusion in pixel space: encode and decode return their input (RGB in [-1, 1])."""

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.shape, self.image_size = (channels, resolution, resolution), resolution

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x
