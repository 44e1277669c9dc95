"""The denoising UNet (Ho et al. 2020, appendix B; with the improvements of Dhariwal & Nichol 2021,
https://arxiv.org/abs/2105.05233, sec. 3: scale-shift norm, attention at several resolutions).

    x_t (B, C, H, W), t (B,) ->  eps / v / x0 prediction (B, C, H, W)

Levels are built from `channel_mults`; each level holds `blocks_per_level` residual blocks and halves the
resolution after it (except the last). Self-attention runs at every resolution listed in `attn_resolutions`.
With `attributes` set (e.g. [age, gender, race], vocabularies in `vocab`), an embedding of the labels is
added to the time embedding (models/conditioning.py); labels left out mean "unspecified".

With `lowres_channels` set, the network is a super-resolution stage of a cascade (Ho et al. 2022,
https://arxiv.org/abs/2106.15282, sec. 3): a low-resolution image is resized to the grid of x and concatenated
to it, and the level of the noise it was augmented with, `lowres_t`, has its own timestep embedding, added
to the time embedding:  f(x_t, t, labels, lowres, lowres_t).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import AttributeEmbedding


@dataclass
class UNetConfig:
    resolution: int = 32                       # side of x: the image in pixels, or the latent grid
    in_channels: int = 3                       # channels of x (and of the prediction)
    lowres_channels: int = 0                   # a super-resolution stage: channels of its low-resolution image
    base_channels: int = 64                    # channels at the first level
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    blocks_per_level: int = 2                  # residual blocks per level on the way down
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    head_channels: int = 64                    # channels per attention head
    dropout: float = 0.1
    groups: int = 32                           # GroupNorm groups (fewer when channels are few)
    attributes: list[str] = field(default_factory=list)   # labels it is conditioned on; [] = unconditional
    vocab: dict[str, list[str]] = field(default_factory=dict)   # values of each attribute (from the data)
    label_counts: list[int] = field(default_factory=list)  # training faces per combination of values (row-major
    #                                            over attributes, from the data; not part of the network): sampling
    #                                            draws the attributes not asked for from these


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def group_norm(channels: int, groups: int) -> nn.Module:
    """GroupNorm with the largest group count that divides `channels` and `groups`; groups 0: no norm."""
    return nn.GroupNorm(math.gcd(groups, channels), channels) if groups else nn.Identity()


def zero(module: nn.Module) -> nn.Module:
    """Zero-initialised output layers make every residual block start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding modulates the second norm as (1 + scale) * h + shift."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.dropout = group_norm(c_out, groups), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions through scaled_dot_product_attention."""

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)                 # (B, heads, HW, C/heads)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks, each optionally followed by attention, at one resolution."""

    def __init__(self, channels_in: list[int], c_out: int, emb_dim: int, attn: bool, cfg: UNetConfig):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, c_out, emb_dim, cfg.dropout, cfg.groups) for c in channels_in)
        self.attn = nn.ModuleList(Attention(c_out, cfg.head_channels, cfg.groups) if attn else nn.Identity()
                                  for _ in channels_in)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig, cond_embedding: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        ch, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cond_embedding is None and cfg.attributes:
            missing = [a for a in cfg.attributes if not cfg.vocab.get(a)]
            if missing:
                raise ValueError(f"conditional model without vocabularies for {', '.join(missing)}: they are "
                                 "filled in from the data by training, or read from an export's config.yaml")
            cond_embedding = AttributeEmbedding([len(cfg.vocab[a]) for a in cfg.attributes], emb_dim)
        self.cond_embedding = cond_embedding                   # maps cond -> (B, emb_dim), or None
        self.lowres_mlp = None                                 # embeds lowres_t, the augmentation level
        if cfg.lowres_channels:
            self.lowres_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), zero(nn.Linear(emb_dim, emb_dim)))
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.lowres_channels, ch, 3, padding=1)

        widths = [ch * m for m in cfg.channel_mults]
        skips, c, res = [ch], ch, cfg.resolution
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, w in enumerate(widths):
            ins = [c] + [w] * (cfg.blocks_per_level - 1)
            self.down.append(Level(ins, w, emb_dim, res in cfg.attn_resolutions, cfg))
            skips += [w] * cfg.blocks_per_level
            c = w
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else Downsample(w))
            if not last:
                skips.append(w)
                res //= 2

        self.mid1 = ResBlock(c, c, emb_dim, cfg.dropout, cfg.groups)
        self.mid_attn = Attention(c, cfg.head_channels, cfg.groups)
        self.mid2 = ResBlock(c, c, emb_dim, cfg.dropout, cfg.groups)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            ins = []
            for _ in range(cfg.blocks_per_level + 1):
                ins.append(c + skips.pop())
                c = w
            self.up.append(Level(ins, w, emb_dim, res in cfg.attn_resolutions, cfg))
            self.upsample.append(Upsample(w) if i > 0 else nn.Identity())
            if i > 0:
                res *= 2

        self.norm_out = group_norm(c, cfg.groups)
        self.conv_out = zero(nn.Conv2d(c, cfg.in_channels, 3, padding=1))

    @property
    def conditional(self) -> bool:
        return isinstance(self.cond_embedding, AttributeEmbedding)

    def embed(self, t: torch.Tensor, cond=None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        if cond is None and self.conditional:                  # no labels: every attribute unspecified
            cond = self.cond_embedding.unspecified(len(t), t.device)
        if cond is not None:
            if self.cond_embedding is None:
                raise ValueError("this model was built without conditioning; it cannot take labels")
            emb = emb + self.cond_embedding(cond)
        return emb

    def add_lowres(self, x: torch.Tensor, emb: torch.Tensor, lowres: torch.Tensor | None,
                   lowres_t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x with the low-resolution image (resized to x's grid) as extra channels; emb with the embedding of
        its augmentation level (0 when not given)."""
        if lowres is None or lowres.shape[1] != self.cfg.lowres_channels:
            raise ValueError(f"this super-resolution stage needs a low-resolution image of {self.cfg.lowres_channels} "
                             f"channels, got {None if lowres is None else tuple(lowres.shape)}")
        if lowres.shape[-2:] != x.shape[-2:]:
            lowres = F.interpolate(lowres.float(), size=x.shape[-2:], mode="bicubic", align_corners=False)
        if lowres_t is None:
            lowres_t = torch.zeros(len(x), device=x.device)
        emb = emb + self.lowres_mlp(timestep_embedding(lowres_t, self.cfg.base_channels))
        return torch.cat([x, lowres.to(x.dtype)], dim=1), emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None, lowres: torch.Tensor | None = None,
                lowres_t: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, cond)
        if self.lowres_mlp is not None:
            x, emb = self.add_lowres(x, emb, lowres, lowres_t)
        h = self.conv_in(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level, up in zip(self.up, self.upsample):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), emb))
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
