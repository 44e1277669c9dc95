"""The denoising UNet: shapes, zero-initialised output, parameter count from the architecture,
timestep embedding, attention maths, and the time / conditioning inputs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_config
from ddpm_faces.models import UNet, UNetConfig, count_parameters, timestep_embedding
from ddpm_faces.models.unet import Attention


def tiny(**kw) -> UNetConfig:
    """The shared tiny network's config, `kw` replacing its fields."""
    return tiny_config(**kw).model


def perturb_zero_params(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Give every all-zero parameter (zero-initialised output convs, norm biases) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("cfg", [
    tiny(),
    tiny(resolution=32, channel_mults=[1, 2, 2], blocks_per_level=2, attn_resolutions=[16, 8]),
    tiny(resolution=32, channel_mults=[1, 2], attn_resolutions=[]),
    tiny(resolution=16, channel_mults=[1, 1, 2], blocks_per_level=2, attn_resolutions=[16], in_channels=1),
], ids=["16px-2lvl-attn8", "32px-3lvl-2blk-attn", "32px-noattn", "16px-3lvl-1ch-attn16"])
def test_output_shape_matches_input(cfg):
    model = perturb_zero_params(UNet(cfg)).eval()
    x = torch.randn(2, cfg.in_channels, cfg.resolution, cfg.resolution)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_output_is_exactly_zero_at_init_and_not_after_perturbing_conv_out():
    model = UNet(tiny()).eval()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([1, 50, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t), torch.zeros_like(x))
        nn.init.normal_(model.conv_out.weight, std=0.1)
        assert (model(x, t) != 0).float().mean() > 0.9


def test_batch_elements_are_independent():
    """GroupNorm (not BatchNorm): one image's output does not depend on the others in the batch."""
    model = perturb_zero_params(UNet(tiny())).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 100, 700])
    with torch.no_grad():
        together = model(x, t)
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- parameter count by hand

def conv(cin, cout, k):
    return cin * cout * k * k + cout


def gn(c):
    return 2 * c


def linear(n_in, n_out):
    return n_in * n_out + n_out


def resblock(cin, cout, emb):
    skip = conv(cin, cout, 1) if cin != cout else 0
    return gn(cin) + conv(cin, cout, 3) + linear(emb, 2 * cout) + gn(cout) + conv(cout, cout, 3) + skip


def attention(c):
    return gn(c) + conv(c, 3 * c, 1) + conv(c, c, 1)


def expected_parameters(cfg: UNetConfig) -> int:
    """Ho et al.'s UNet: the encoder keeps every block's output (and each downsampled map, and conv_in's)
    as a skip; each decoder level has one block more than the encoder and eats one skip per block."""
    ch, emb = cfg.base_channels, 4 * cfg.base_channels
    total = linear(ch, emb) + linear(emb, emb) + conv(cfg.in_channels, ch, 3)
    widths = [ch * m for m in cfg.channel_mults]
    skips, c, res = [ch], ch, cfg.resolution
    for level, w in enumerate(widths):
        for _ in range(cfg.blocks_per_level):
            total += resblock(c, w, emb) + (attention(w) if res in cfg.attn_resolutions else 0)
            c = w
            skips.append(w)
        if level < len(widths) - 1:
            total += conv(w, w, 3)                        # stride-2 conv
            skips.append(w)
            res //= 2
    total += 2 * resblock(c, c, emb) + attention(c)        # middle: res, attn, res
    for level in reversed(range(len(widths))):
        w = widths[level]
        for _ in range(cfg.blocks_per_level + 1):
            total += resblock(c + skips.pop(), w, emb) + (attention(w) if res in cfg.attn_resolutions else 0)
            c = w
        if level > 0:
            total += conv(w, w, 3)                        # nearest upsampling + conv
            res *= 2
    assert not skips
    return total + gn(c) + conv(c, cfg.in_channels, 3)


def test_parameter_count_of_smallest_unet_computed_by_hand():
    # base 8, one level, one block, no attention at 8 px (the middle attention always exists):
    # time MLP 8*32+32 + 32*32+32 = 1344; conv_in 3*8*9+8 = 224
    # down ResBlock(8->8): 16 + 584 + (32*16+16) + 16 + 584 = 1728
    # middle: 2 * 1728 + attention(8) (16 + 8*24+24 + 8*8+8 = 304) = 3760
    # up: 2 * ResBlock(16->8): 32 + 1160 + 528 + 16 + 584 + 136 (1x1 skip) = 2456 each -> 4912
    # out: GroupNorm 16 + conv 8*3*9+3 = 235
    cfg = tiny(resolution=8, channel_mults=[1], attn_resolutions=[])
    assert expected_parameters(cfg) == 12203
    assert count_parameters(UNet(cfg)) == 12203


@pytest.mark.parametrize("cfg", [
    tiny(),
    tiny(resolution=32, base_channels=16, channel_mults=[1, 2, 2], blocks_per_level=2, attn_resolutions=[16, 8]),
    tiny(resolution=16, base_channels=12, channel_mults=[1, 1, 3], blocks_per_level=1, attn_resolutions=[16],
         in_channels=1),
])
def test_parameter_count_matches_architecture(cfg):
    assert count_parameters(UNet(cfg)) == expected_parameters(cfg)


# --------------------------------------------------------------------------- timestep embedding

@pytest.mark.parametrize("dim", [2, 8, 16])
def test_timestep_embedding_closed_form(dim):
    ts = [0.0, 1.0, 2.5, 37.0, 999.0]
    half = dim // 2
    expected = torch.tensor([
        [math.cos(t * math.exp(-math.log(10000) * i / half)) for i in range(half)]
        + [math.sin(t * math.exp(-math.log(10000) * i / half)) for i in range(half)]
        for t in ts])
    got = timestep_embedding(torch.tensor(ts), dim)
    assert got.shape == (len(ts), dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    # integer timesteps give the same embedding as the equal floats; t = 0 is [1, ..., 1, 0, ..., 0]
    assert torch.equal(timestep_embedding(torch.tensor([0, 37]), dim), got[[0, 3]])
    assert torch.equal(got[0], torch.cat([torch.ones(half), torch.zeros(half)]))


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("channels, head_channels, heads", [(16, 8, 2), (16, 16, 1), (16, 32, 1), (32, 8, 4)])
def test_attention_matches_manual_softmax(channels, head_channels, heads):
    torch.manual_seed(0)
    attn = Attention(channels, head_channels, groups=4)
    assert attn.heads == heads
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(channels)[:, :, None, None])     # proj = identity
        attn.proj.bias.zero_()
        nn.init.normal_(attn.norm.weight, 1.0, 0.2)
        nn.init.normal_(attn.norm.bias, 0.0, 0.2)
        x = torch.randn(2, channels, 4, 3)
        out = attn(x)

        # by hand: GroupNorm, 1x1 conv to q, k, v, per-head softmax(q k^T / sqrt(d)) v
        B, C, H, W = x.shape
        g = x.reshape(B, 4, -1)
        n = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5))
        n = n.reshape(B, C, H * W) * attn.norm.weight[:, None] + attn.norm.bias[:, None]
        qkv = attn.qkv.weight[:, :, 0, 0] @ n + attn.qkv.bias[:, None]          # (B, 3C, HW)
        q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
        d = C // heads
        heads_out = []
        for h in range(heads):
            qh, kh, vh = (m[:, h * d:(h + 1) * d] for m in (q, k, v))            # (B, d, HW)
            weights = torch.softmax(qh.transpose(1, 2) @ kh / math.sqrt(d), dim=-1)  # (B, HW, HW)
            heads_out.append(vh @ weights.transpose(1, 2))                       # (B, d, HW)
        expected = x + torch.cat(heads_out, dim=1).reshape(B, C, H, W)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)


def test_attention_starts_as_identity():
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(Attention(16, 8, groups=4)(x), x)


# --------------------------------------------------------------------------- time and conditioning inputs

def test_output_depends_on_timestep():
    model = perturb_zero_params(UNet(tiny())).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = model(x, torch.tensor([10, 10]))
        b = model(x, torch.tensor([10, 600]))
    assert torch.equal(a[0], b[0])                          # same (x, t): same output
    assert (a[1] - b[1]).abs().mean() > 1e-3 * a[1].abs().mean()


class LabelEmbedding(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(n, dim)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        assert cond.dtype == torch.long
        return self.table(cond)


def test_conditioning_embedding_is_added_and_changes_the_output():
    cfg = tiny()
    cond_emb = LabelEmbedding(3, 4 * cfg.base_channels)
    model = perturb_zero_params(UNet(cfg, cond_embedding=cond_emb)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([20, 20])
    with torch.no_grad():
        torch.testing.assert_close(model.embed(t, torch.tensor([2, 0])),
                                   model.embed(t) + cond_emb.table.weight[[2, 0]])
        a = model(x, t, torch.tensor([0, 1]))
        b = model(x, t, torch.tensor([0, 2]))
        unconditional = model(x, t)
    assert torch.equal(a[0], b[0])
    assert (a[1] - b[1]).abs().mean() > 1e-3 * a[1].abs().mean()
    assert not torch.allclose(a, unconditional)


def test_model_without_conditioning_rejects_cond():
    model = UNet(tiny())
    with pytest.raises(ValueError, match="without conditioning"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([3]), torch.tensor([1]))
