"""The autoencoder's losses: reconstruction, a frequency term, KL, and a patch GAN with VQGAN's adaptive weight.

Without LPIPS (no pretrained VGG can be downloaded here) the generator's loss is

    L = L_rec + w_fft L_fft + w_kl KL(q(z|x) || N(0, I)) + lambda * f(step) * L_G

with L_rec = |x - x~| (+ w_mse (x - x~)^2), L_fft the L1 distance between the images' amplitude spectra
(blur removes high-frequency energy that pixel losses barely notice), L_G = -D(x~) averaged over patches, and
VQGAN's adaptive weight (Esser et al. 2021, https://arxiv.org/abs/2012.09841, eq. 7)

    lambda = w_disc * ||grad_{G_L} L_rec'|| / (||grad_{G_L} L_G|| + delta),   delta = 1e-4,

taken at the decoder's last layer G_L, where L_rec' is the reconstruction part. f(step) switches the GAN on
after `disc_start` steps, once reconstruction has settled (Rombach et al. 2022, appendix G). The
discriminator minimises the hinge loss 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x~))]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ReconstructionConfig


def fft_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean |(|F(x)| - |F(x~)|)| over the orthonormal 2-D spectra of every channel."""
    ax = torch.fft.rfft2(x.float(), norm="ortho").abs()
    ar = torch.fft.rfft2(recon.float(), norm="ortho").abs()
    return (ax - ar).abs().mean()


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, cfg: ReconstructionConfig) -> dict[str, torch.Tensor]:
    """The pixel and frequency terms, each a scalar, and their weighted sum under "rec"."""
    diff = recon.float() - x.float()
    terms = {"l1": diff.abs().mean(), "mse": diff.pow(2).mean()}
    terms["rec"] = cfg.l1_weight * terms["l1"] + cfg.mse_weight * terms["mse"]
    if cfg.fft_weight:
        terms["fft"] = fft_loss(x, recon)
        terms["rec"] = terms["rec"] + cfg.fft_weight * terms["fft"]
    return terms


def adaptive_weight(rec: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor, scale: float,
                    delta: float = 1e-4) -> torch.Tensor:
    """VQGAN eq. 7: the ratio of the two losses' gradient norms at the decoder's last layer, times `scale`,
    clamped to [0, 1e4] and detached."""
    g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
    weight = g_rec.norm() / (g_gan.norm() + delta)
    return (scale * weight.clamp(0.0, 1e4)).detach()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())
