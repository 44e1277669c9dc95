"""A patch discriminator for the autoencoder's adversarial loss (Isola et al. 2017, pix2pix, sec. 3.2.2;
as used by VQGAN, Esser et al. 2021, https://arxiv.org/abs/2012.09841, sec. 3.1).

It scores overlapping patches of an image as real or reconstructed: (B, 3, H, W) -> (B, 1, H', W') logits,
each seeing a receptive field of a few tens of pixels, so it judges local texture and sharpness (what an L1
loss blurs), not the global layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DiscriminatorConfig:
    channels: int = 32                  # width of the first layer, doubled at each strided layer
    layers: int = 3                     # strided 4x4 convolutions (receptive field 70 px for 3)
    groups: int = 8                     # GroupNorm groups (batch statistics would leak between real and fake)


class PatchDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig, in_channels: int = 3):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.layers + 1):
            c_out = cfg.channels * min(2 ** i, 8)
            stride = 2 if i < cfg.layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(math.gcd(cfg.groups, c_out), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for m in self.modules():                                   # pix2pix: N(0, 0.02) weights
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
