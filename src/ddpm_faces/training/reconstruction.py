"""The autoencoder's losses: reconstruction, a frequency term, KL, and a patch GAN with VQGAN's adaptive weight.

Without LPIPS (no pretrained VGG can be downloaded here) the generator's loss is

    L = L_rec + w_fft L_fft + w_kl KL(q(z|x) || N(0, I)) + lambda * f(step) * L_G

with L_rec = |x - x~| (+ w_mse (x - x~)^2), L_fft the L1 distance between the images' amplitude spectra
(blur removes high-frequency energy that pixel losses barely notice), L_G = -D(x~) averaged over patches, and
VQGAN's adaptive weight (Esser et al. 2021, https://arxiv.org/abs/2012.09841, eq. 7)

    lambda = w_disc * ||grad_{G_L} L_rec'|| / (||grad_{G_L} L_G|| + delta),   delta = 1e-4,

taken at the decoder's last layer G_L, where L_rec' is the reconstruction part; or, with
`disc_weight_mode: fixed`, lambda = w_disc itself (a small constant, ~0.1, as in decoder fine-tunes: the
adaptive ratio explodes to 25-140 while the discriminator has not learned anything yet and its gradient is
tiny). f(step) switches the GAN on after `disc_start` steps, once reconstruction has settled (Rombach et al.
2022, appendix G). The discriminator minimises the hinge loss 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x~))]),
plus, with `lecam_weight` > 0, the LeCAM regulariser (Tseng et al. 2021, https://arxiv.org/abs/2104.03310,
eq. 3)

    R_LC = E[(D(x) - alpha_F)^2] + E[(D(x~) - alpha_R)^2],

alpha_R and alpha_F the exponential moving averages of D's mean logits on real and reconstructed images
(decay `lecam_decay`): it keeps D's outputs on the two near each other's running mean, so a discriminator on
a limited set of crops cannot push them arbitrarily far apart (overfit) and hand the decoder a useless
gradient.
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


def gan_weight(rec: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor, cfg: ReconstructionConfig
               ) -> torch.Tensor:
    """lambda of the GAN term: disc_weight itself (disc_weight_mode fixed) or VQGAN's adaptive weight scaled by it."""
    if cfg.disc_weight_mode == "fixed":
        return torch.tensor(float(cfg.disc_weight), device=gan.device)
    return adaptive_weight(rec, gan, last_layer, cfg.disc_weight)


def generator_objective(rec: torch.Tensor, kl: torch.Tensor, cfg: ReconstructionConfig,
                        gan: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L = L_rec (+ w_fft L_fft, inside rec) + w_kl KL + lambda L_G; the GAN term only when `gan` is given."""
    loss = rec + cfg.kl_weight * kl
    return loss if gan is None else loss + weight * gan


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def lecam_penalty(logits_real: torch.Tensor, logits_fake: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Tseng et al. 2021 eq. 3: mean (D(x) - alpha_F)^2 + mean (D(x~) - alpha_R)^2 over images and patches,
    with means = [alpha_R, alpha_F] (the discriminator's `logit_means`, constants here)."""
    alpha_real, alpha_fake = means.detach().float()
    return (logits_real.float() - alpha_fake).pow(2).mean() + (logits_fake.float() - alpha_real).pow(2).mean()
