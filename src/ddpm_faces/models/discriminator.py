"""A patch discriminator for the autoencoder's adversarial loss (Isola et al. 2017, pix2pix, sec. 3.2.2;
as used by VQGAN, Esser et al. 2021, https://arxiv.org/abs/2012.09841, sec. 3.1).

It scores overlapping patches of an image as real or reconstructed: (B, 3, H, W) -> (B, 1, H', W') logits,
each seeing a receptive field of a few tens of pixels, so it judges local texture and sharpness (what an L1
loss blurs), not the global layout.

It also keeps the exponential moving averages of its mean logits on real and on reconstructed images
(`logit_means` = [alpha_R, alpha_F]), the anchors of the LeCAM regulariser (Tseng et al. 2021,
https://arxiv.org/abs/2104.03310, eq. 3; training/reconstruction.py). They are a buffer, so they are saved
and resumed with the discriminator's weights; checkpoints written before they existed load with zeros.
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
        self.register_buffer("logit_means", torch.zeros(2))       # EMA of mean D(x), mean D(x~): LeCAM's anchors
        self.register_load_state_dict_pre_hook(_zero_missing_means)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @torch.no_grad()
    def update_logit_means(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, decay: float) -> None:
        """alpha <- decay * alpha + (1 - decay) * mean logit, for real and reconstructed images (LeCAM's EMA)."""
        batch = torch.stack([logits_real.float().mean(), logits_fake.float().mean()])
        self.logit_means.lerp_(batch.to(self.logit_means), 1.0 - decay)


def _zero_missing_means(module, state_dict, prefix, *args) -> None:
    """A discriminator saved before `logit_means` existed loads with zero means (its logits start near 0)."""
    state_dict.setdefault(prefix + "logit_means", torch.zeros(2))
