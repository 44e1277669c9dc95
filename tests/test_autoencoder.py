"""The latent-diffusion first stage: the autoencoder, its losses, reconstruction metrics, the latent codec and
the latent cache."""
from __future__ import annotations

import dataclasses

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
    from ddpm_faces.images import to_model_range

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


# ---- a sharper decoder for a trained latent model: init_from, a frozen encoder, a fixed GAN weight, LeCAM -------

AE_TINY = {"task": "autoencoder", "name": "dec", "autoencoder.resolution": 16, "autoencoder.channels": "[8,16,16]",
           "autoencoder.groups": 4, "reconstruction.crop": 0, "reconstruction.disc_channels": 8,
           "reconstruction.disc_layers": 2, "reconstruction.eval_images": 8, "reconstruction.kl_weight": 0.01,
           "train.adam_betas": "[0.5,0.9]", "train.lr": 2e-3}


def tiny_autoencoder_config(tmp_path, face_folder, **extra):
    from conftest import tiny_overrides
    from ddpm_faces.config import load_config

    return load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{**AE_TINY, **extra}))


@pytest.fixture(scope="module")
def source_export(tmp_path_factory, face_folder):
    """A tiny autoencoder export (random weights, made-up latent statistics): what init_from starts from."""
    from ddpm_faces.runs import export_model

    root = tmp_path_factory.mktemp("source")
    cfg = tiny_autoencoder_config(root, face_folder)
    torch.manual_seed(123)
    codec = LatentCodec(Autoencoder(cfg.autoencoder))
    codec.set_statistics(torch.tensor([0.1, -0.2, 0.3, 0.05]), torch.tensor([1.5, 0.7, 2.0, 1.1]))
    return export_model(codec, cfg, root / "export")


def source_codec(export) -> LatentCodec:
    from ddpm_faces.pipeline import load_codec

    return load_codec(export)


@pytest.mark.parametrize("overrides, words", [
    (["reconstruction.disc_weight_mode=constant"], ["reconstruction.disc_weight_mode", "adaptive", "fixed"]),
    (["reconstruction.lecam_weight=-0.1"], ["reconstruction.lecam_weight", "0 or more"]),
    (["reconstruction.lecam_decay=1"], ["reconstruction.lecam_decay", "[0, 1)"]),
    (["reconstruction.disc_weight=-1"], ["reconstruction.disc_weight", "0 or more"]),
    (["reconstruction.disc_lr=0"], ["reconstruction.disc_lr", "positive"]),
    (["reconstruction.freeze_encoder=true"], ["freeze_encoder", "init_from"]),
    (["reconstruction.freeze_encoder=yes"], ["reconstruction.freeze_encoder", "bool"]),
    (["reconstruction.init_from=' '"], ["reconstruction.init_from"]),
])
def test_new_reconstruction_keys_are_validated_in_one_line(overrides, words):
    from ddpm_faces.config import load_config
    from ddpm_faces.errors import UserError

    with pytest.raises(UserError) as err:
        load_config("quickstart", overrides)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_the_gan_weight_is_fixed_or_adaptive():
    from ddpm_faces.training.reconstruction import gan_weight

    w = torch.randn(5, requires_grad=True)
    rec, gan = (3.0 * w).sum(), (0.5 * w).pow(2).sum()
    fixed = ReconstructionConfig(disc_weight=0.1, disc_weight_mode="fixed")
    assert float(gan_weight(rec, gan, w, fixed)) == pytest.approx(0.1)
    adaptive = ReconstructionConfig(disc_weight=0.5, disc_weight_mode="adaptive")
    assert torch.equal(gan_weight(rec, gan, w, adaptive), adaptive_weight(rec, gan, w, 0.5))


def test_lecam_penalty_and_its_running_means_follow_the_formulas():
    from ddpm_faces.training.reconstruction import lecam_penalty

    real, fake = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[-1.0, 0.5], [0.0, -2.5]])
    means = torch.tensor([0.5, -0.25])                             # [alpha_R, alpha_F]
    # Tseng et al. 2021 eq. 3, by hand: mean (D(x) - alpha_F)^2 + mean (D(x~) - alpha_R)^2
    by_hand = ((1.25 ** 2 + 2.25 ** 2 + 3.25 ** 2 + 0.25 ** 2) / 4) + ((1.5 ** 2 + 0 + 0.5 ** 2 + 3.0 ** 2) / 4)
    assert float(lecam_penalty(real, fake, means)) == pytest.approx(by_hand)
    d = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2, groups=4))
    assert torch.equal(d.logit_means, torch.zeros(2))
    d.update_logit_means(real, fake, decay=0.9)                  # alpha <- 0.9 alpha + 0.1 mean
    d.update_logit_means(real, fake, decay=0.9)
    expected = torch.tensor([1.5, -0.75]) * (1 - 0.9 ** 2)
    assert torch.allclose(d.logit_means, expected)
    state = {k: v for k, v in d.state_dict().items() if k != "logit_means"}    # a checkpoint from before LeCAM
    fresh = PatchDiscriminator(DiscriminatorConfig(channels=8, layers=2, groups=4))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.logit_means, torch.zeros(2))


def test_init_from_starts_from_the_source_and_freezes_only_the_encoder(tmp_path, face_folder, source_export):
    from ddpm_faces.training.autoencoder import build_autoencoder_trainees, read_initial_weights

    cfg = tiny_autoencoder_config(tmp_path, face_folder, **{"reconstruction.init_from": str(source_export),
                                                            "reconstruction.freeze_encoder": True})
    source = source_codec(source_export)
    initial = read_initial_weights(cfg)
    trainees, _ = build_autoencoder_trainees(cfg, 0, initial)
    for net in (trainees.model, trainees.ema.model):                  # the decoder starts equal to the source's
        expected = source.autoencoder.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    assert torch.equal(initial.statistics[0], source.shift) and torch.equal(initial.statistics[1], source.scale)
    optimized = {id(p) for group in trainees.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainees.model.decoder.parameters()}
    assert not any(p.requires_grad for p in trainees.model.encoder.parameters())


def test_init_from_reads_the_bundled_latent_models_autoencoder():
    from safetensors.torch import load_file

    from ddpm_faces.config import load_config
    from ddpm_faces.runs import CODEC_FILE, bundled
    from ddpm_faces.training.autoencoder import read_initial_weights

    initial = read_initial_weights(load_config("decoder128"))           # init_from: latent128
    shipped = load_file(bundled("latent128") / CODEC_FILE)
    assert initial.source == bundled("latent128") / CODEC_FILE
    assert all(torch.equal(v, shipped[f"autoencoder.{k}"].float()) for k, v in initial.state.items())
    assert torch.equal(initial.statistics[0], shipped["shift"]) and torch.equal(initial.statistics[1], shipped["scale"])


def test_a_bad_init_from_is_one_line(tmp_path, face_folder, source_export):
    from ddpm_faces.errors import UserError
    from ddpm_faces.training import train

    missing = tiny_autoencoder_config(tmp_path, face_folder, **{"reconstruction.init_from": str(tmp_path / "nope")})
    with pytest.raises(UserError) as err:
        train(missing, progress=False)
    assert "\n" not in str(err.value) and "nope" in str(err.value) and "latent128" in str(err.value)
    other = tiny_autoencoder_config(tmp_path, face_folder, **{"reconstruction.init_from": str(source_export),
                                                              "autoencoder.channels": "[8,8,16]"})
    with pytest.raises(UserError, match="another autoencoder section") as err:
        train(other, progress=False)
    assert "\n" not in str(err.value)


def test_the_fixed_gan_weight_is_what_the_training_loss_adds(tmp_path, face_folder, source_export):
    """One generator step with the GAN on: loss = L_rec + w_kl KL + 0.1 L_G, by value (not the adaptive weight);
    then the discriminator's step, with LeCAM's term and its running means."""
    from ddpm_faces.training.trainer import make_accelerator, prepare_run

    cfg = tiny_autoencoder_config(tmp_path, face_folder, **{
        "reconstruction.init_from": str(source_export), "reconstruction.freeze_encoder": True,
        "reconstruction.disc_weight": 0.1, "reconstruction.disc_weight_mode": "fixed",
        "reconstruction.disc_start": 0, "reconstruction.lecam_weight": 0.5, "reconstruction.fft_weight": 0.1})
    run = prepare_run(cfg, make_accelerator(cfg.train))
    assert run.gan_on
    run.micro_step(next(iter(run.loader)))
    t = {k: float(v) for k, v in run.terms.items()}
    assert t["gan_weight"] == pytest.approx(0.1) and t["gan_g"] != 0 and t["kl"] > 0 and t["rec"] > t["l1"]
    assert float(run.micro_loss) == pytest.approx(t["rec"] + 0.01 * t["kl"] + 0.1 * t["gan_g"], rel=1e-5)
    assert t["lecam"] > 0 and not torch.equal(run.raw_disc.logit_means, torch.zeros(2))
    run.finish()


def test_a_frozen_encoder_and_its_latents_stay_bit_identical(tmp_path, face_folder, source_export):
    from safetensors.torch import load_file

    from ddpm_faces.data import load_batch, prepare_dataset
    from ddpm_faces.runs import RunFolder
    from ddpm_faces.training import train

    cfg = tiny_autoencoder_config(tmp_path, face_folder, **{
        "reconstruction.init_from": str(source_export), "reconstruction.freeze_encoder": True,
        "reconstruction.disc_weight": 0.1, "reconstruction.disc_weight_mode": "fixed",
        "reconstruction.disc_start": 3, "reconstruction.disc_warmup": 2, "reconstruction.lecam_weight": 0.1,
        "train.max_steps": 6, "train.checkpoint_every": 6})
    folder = RunFolder(train(cfg, progress=False).run_dir)
    source = source_codec(source_export)
    data = prepare_dataset(str(face_folder), 16, cache_dir=tmp_path / "cache", progress=False)
    images = load_batch(data, np.arange(8))["images"]
    for name in ("model.safetensors", "ema.safetensors"):
        ae = Autoencoder(cfg.autoencoder)
        ae.load_state_dict(load_file(folder.checkpoint(6) / name))
        for k, v in source.autoencoder.encoder.state_dict().items():
            assert torch.equal(ae.encoder.state_dict()[k], v), (name, k)
        with torch.no_grad():
            assert torch.equal(ae.encode(images).mean, source.autoencoder.encode(images).mean), name
        before = source.autoencoder.decoder.state_dict()
        assert any(not torch.equal(v, before[k]) for k, v in ae.decoder.state_dict().items()), f"{name}: no training"
    exported = load_file(folder.export / "model.safetensors")            # the source's statistics, not re-measured
    assert torch.equal(exported["shift"], source.shift) and torch.equal(exported["scale"], source.scale)
    # paused after step 4 and resumed: bit for bit the same, LeCAM's running means (in the discriminator) included
    paused = dataclasses.replace(cfg, name="dec-paused")
    assert train(paused, progress=False, until_step=4).step == 4
    assert train(paused, progress=False, resume=True).step == 6
    for name in ("model.safetensors", "ema.safetensors", "discriminator.safetensors"):
        a, b = (load_file(f.checkpoint(6) / name) for f in (folder, RunFolder(paused.run_dir)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(load_file(folder.checkpoint(6) / "discriminator.safetensors")["logit_means"], torch.zeros(2))
