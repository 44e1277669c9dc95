"""The latent-diffusion first stage: the autoencoder, its losses, reconstruction metrics, the latent codec and
the latent cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_faces.evaluation.reconstruction import psnr, ssim
from ddpm_faces.models.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from ddpm_faces.models.codec import LatentCodec
from ddpm_faces.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from ddpm_faces.config import ReconstructionConfig
from ddpm_faces.training.reconstruction import adaptive_weight, fft_loss, hinge_discriminator_loss, reconstruction_loss

TINY = AutoencoderConfig(resolution=16, latent_channels=4, channels=[8, 16, 16], groups=4)


def test_shapes_follow_the_downsampling_factor():
    for channels, factor in (([8, 16], 2), ([8, 16, 16], 4), ([8, 8, 16, 16], 8)):
        cfg = AutoencoderConfig(resolution=32, channels=channels, groups=4, latent_channels=3)
        ae = Autoencoder(cfg)
        recon, posterior = ae(torch.randn(2, 3, 32, 32))
        assert cfg.factor == factor and posterior.mean.shape == (2, 3, 32 // factor, 32 // factor)
        assert recon.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible"):
        Autoencoder(AutoencoderConfig(resolution=30, channels=[8, 16, 16]))


def test_kl_of_a_diagonal_gaussian_matches_the_closed_form():
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    q = DiagonalGaussian(torch.cat([mean, logvar], 1))
    var = logvar.exp()
    # KL(N(m, v) || N(0, 1)) per element, against torch.distributions
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, var.sqrt()),
                                                 torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(q.kl(), expected, rtol=1e-5)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 4, 2, 2)).kl(), torch.zeros(1))   # N(0, 1) itself
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([q.sample(g) for _ in range(4000)])
    assert torch.allclose(samples.mean(0), mean, atol=0.15 * var.sqrt().max())


def test_a_round_trip_improves_with_training_on_a_tiny_set():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)            # some spatial structure
    ae = Autoencoder(TINY)
    opt = torch.optim.Adam(ae.parameters(), 3e-3)

    def error():
        with torch.no_grad():
            return float((ae(images, sample=False)[0] - images).abs().mean())

    before = error()
    for _ in range(150):
        recon, posterior = ae(images)
        loss = reconstruction_loss(images, recon, ReconstructionConfig())["rec"] + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert error() < 0.5 * before


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.randn(5, requires_grad=True)
    rec, gan = (3.0 * w).sum(), (0.5 * w).pow(2).sum()
    expected = (3.0 * torch.ones(5)).norm() / ((0.5 * w).norm() + 1e-4)       # d/dw of each loss
    assert torch.allclose(adaptive_weight(rec, gan, w, scale=0.5), 0.5 * expected.detach(), rtol=1e-5)


def test_hinge_loss_is_zero_for_a_confident_discriminator_and_counts_margins():
    assert float(hinge_discriminator_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -3.0))) == 0
    assert float(hinge_discriminator_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))) == pytest.approx(1.0)
    d = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2, groups=4))
    assert d(torch.randn(2, 3, 32, 32)).shape[:2] == (2, 1)


def test_fft_loss_sees_blur_that_barely_moves_l1():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert float(fft_loss(x, x)) == 0.0 and float(fft_loss(x, blurred)) > 0.1


def test_psnr_and_ssim_against_closed_forms():
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = a + np.uint8(10)
    assert psnr(a, b)[0] == pytest.approx(10 * np.log10(255 ** 2 / 100))
    c1 = (0.01 * 255) ** 2                      # constant images: only the luminance term differs from 1
    assert ssim(a, b)[0] == pytest.approx((2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    assert ssim(noise, noise).min() == pytest.approx(1.0) and ssim(noise, 255 - noise).max() < 0


def test_latent_codec_normalises_with_its_statistics():
    torch.manual_seed(0)
    codec = LatentCodec(Autoencoder(TINY)).eval()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    z = codec.latents(images)
    codec.set_statistics(z.mean((0, 2, 3)), z.std((0, 2, 3)))
    x = codec.encode(images)
    assert codec.shape == (4, 4, 4) and codec.image_size == 16
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.allclose(codec.decode(x), codec.autoencoder.decode(z).clamp(-1, 1), atol=1e-5)


def test_latent_cache_holds_both_flips_is_keyed_and_rebuilt_when_damaged(tmp_path, face_folder):
    from ddpm_faces.data import prepare_dataset
    from ddpm_faces.data.latents import LatentLoader, encode_latents
    from ddpm_faces.data.loader import to_model_range

    data = prepare_dataset(str(face_folder), 16, cache_dir=tmp_path, progress=False)
    torch.manual_seed(0)
    codec = LatentCodec(Autoencoder(TINY)).eval()
    calls = []

    def encode(images):
        calls.append(len(images))
        return codec.encode(images)

    latents = encode_latents(data, encode, "key-a", cache_dir=tmp_path, batch_size=16, progress=False)
    assert latents.latents.shape == (2, len(data), 4, 4, 4) and latents.latents.dtype == np.float16
    images = to_model_range(torch.from_numpy(np.array(data.images[:3])))
    with torch.no_grad():
        plain, flipped = codec.encode(images), codec.encode(images.flip(-1))
    assert np.allclose(latents.latents[0, :3], plain.numpy(), atol=2e-3)
    assert np.allclose(latents.latents[1, :3], flipped.numpy(), atol=2e-3)

    encoded = sum(calls)
    again = encode_latents(data, encode, "key-a", cache_dir=tmp_path, progress=False)
    assert sum(calls) == encoded and again.root == latents.root                  # reused, not encoded again
    other = encode_latents(data, encode, "key-b", cache_dir=tmp_path, progress=False)
    assert other.root != latents.root and sum(calls) == 2 * encoded               # a new autoencoder: new latents

    file = latents.root / "latents.npy"
    file.write_bytes(file.read_bytes()[:200])                                     # truncated
    rebuilt = encode_latents(data, encode, "key-a", cache_dir=tmp_path, progress=False)
    assert np.allclose(rebuilt.latents[0, :3], plain.numpy(), atol=2e-3)

    loader = LatentLoader(rebuilt, "train", 8, seed=0, hflip=True)
    batch = next(iter(loader))
    rows = batch["rows"].numpy()
    assert batch["x"].shape == (8, 4, 4, 4)
    for x, row in zip(batch["x"].numpy(), rows):                                   # each is one of its two flips
        assert any(np.allclose(x, rebuilt.latents[f, row].astype(np.float32)) for f in (0, 1))
