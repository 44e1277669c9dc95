"""Training the first stage of latent diffusion: the autoencoder, with the diffusion runs' conventions.

`ddpm-faces train --config ae128` (a config with `task: autoencoder`) goes through the same loop as a
diffusion run (trainer.py): run folder and lock, Accelerate, bf16, EMA, TensorBoard, checkpoints that resume
bit for bit, SIGTERM, exports. Only what happens in a step and what is measured differ, here:

- a step: random crops (reconstruction.crop), reconstruction + KL loss, and once `disc_start` steps have
  passed the patch GAN's generator term with VQGAN's adaptive weight; from `disc_start - disc_warmup` on,
  one discriminator step (training/reconstruction.py). Against a fixed autoencoder at 35 dB the
  discriminator needs some 500 steps to tell its reconstructions from photos, so a discriminator switched on
  together with its term pushes the decoder with noise (measured: logits of real and reconstructed crops
  equal for the first 1,000 steps); the warm-up lets it learn first;
- validation: PSNR, SSIM and L1 of the EMA autoencoder on whole val images (L1 is `val/loss`, which picks
  `best/`); with train.fid_every, reconstruction FID;
- the picture: val faces above their reconstructions;
- the export: the EMA autoencoder as a LatentCodec, with the per-channel mean and std of its latents over
  train images, so that a latent diffusion run can use it as it is (codec.autoencoder).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from ..data import BatchLoader, PreparedData, load_batch
from ..errors import UserError
from ..evaluation import InceptionFeatures
from ..evaluation.reconstruction import reconstruct, reconstruction_metrics
from ..evaluation.reference import spread
from ..images import make_grid, save_image
from ..models.autoencoder import Autoencoder
from ..models.codec import LatentCodec
from ..models.discriminator import DiscriminatorConfig, PatchDiscriminator
from ..runs import export_model
from .ema import EMA
from .lr import make_scheduler
from .reconstruction import adaptive_weight, generator_loss, hinge_discriminator_loss, reconstruction_loss
from .run import Run, Trainees, check_sharding

log = logging.getLogger("ddpm_faces.train")
STATS_IMAGES = 256                  # train images whose latents give the codec's shift and scale (x 2 flips)
TERMS = ("l1", "kl", "gan_g", "gan_d", "logits_real", "logits_fake", "adaptive_weight")


@dataclass
class Adversary:
    """The patch discriminator and its optimizer (both prepared by Accelerate)."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer


def build_autoencoder_trainees(cfg: Config, rank: int) -> tuple[Trainees, Adversary]:
    """The autoencoder (the same initial weights on every rank), its EMA, AdamW with warmup-cosine, and the
    discriminator with its own AdamW; then seeds each rank's own crops."""
    tc, rc = cfg.train, cfg.reconstruction
    torch.manual_seed(tc.seed)
    ae = Autoencoder(cfg.autoencoder)
    disc = PatchDiscriminator(DiscriminatorConfig(rc.disc_channels, rc.disc_layers))
    ema = EMA(ae, tc.ema_decay, tc.ema_warmup)
    torch.manual_seed(tc.seed + rank)
    betas = tuple(tc.adam_betas)
    optimizer = torch.optim.AdamW(ae.parameters(), lr=tc.lr, betas=betas, weight_decay=tc.weight_decay, foreach=True)
    d_optimizer = torch.optim.AdamW(disc.parameters(), lr=rc.disc_lr, betas=betas, foreach=True)
    scheduler = make_scheduler(optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    return Trainees(ae, ema, optimizer, scheduler), Adversary(disc, d_optimizer)


def random_crops(images: torch.Tensor, size: int) -> torch.Tensor:
    """A random `size` x `size` window of each image (offsets from torch's RNG, restored on resume)."""
    if not size or size >= images.shape[-1]:
        return images
    offsets = torch.randint(0, images.shape[-1] - size + 1, (len(images), 2))
    return torch.stack([im[:, i:i + size, j:j + size] for im, (i, j) in zip(images, offsets.tolist())])


class ReconstructionCheck:
    """Reconstructions of fixed val images (reconstruction.eval_images, spread over the split)."""

    def __init__(self, data: PreparedData, cfg: Config):
        self.data, self.rows = data, spread(data.indices("val"), cfg.reconstruction.eval_images)
        self.size = len(self.rows)

    def reconstruct(self, ae: Autoencoder, rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(originals, reconstructions) as uint8 pictures; decoded from the posterior mean."""
        return reconstruct(lambda images: ae(images, sample=False)[0], self.data, rows, batch_size,
                           next(ae.parameters()).device)

    def __call__(self, ae: Autoencoder, batch_size: int, extractor=None) -> dict[str, float]:
        originals, recons = self.reconstruct(ae, self.rows, batch_size)
        metrics = reconstruction_metrics(originals, recons, extractor)
        metrics["l1"] = float(np.abs(originals.astype(np.float64) - recons).mean() / 127.5)   # in [-1, 1] units
        return metrics


@torch.no_grad()
def latent_statistics(ae: Autoencoder, data: PreparedData, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the posterior means of STATS_IMAGES train images (both flips), encoded the way
    the latent cache encodes (channels-last, bf16 where the CPU has bf16 units: a few seconds per export)."""
    device = next(ae.parameters()).device
    encode = LatentCodec(copy.deepcopy(ae)).fast_encoder()          # shift 0, scale 1: the raw latents
    rows = spread(data.indices("train"), STATS_IMAGES)
    latents = []
    for start in range(0, len(rows), batch_size):
        images = load_batch(data, rows[start:start + batch_size])["images"].to(device)
        latents += [encode(images), encode(images.flip(-1))]
    z = torch.cat(latents).transpose(0, 1).flatten(1)              # (channels, everything else)
    return z.mean(1).cpu(), z.std(1).cpu()


def export_codec(ae: Autoencoder, data: PreparedData, cfg: Config, folder, step: int, batch_size: int):
    """The autoencoder as a LatentCodec with its latent statistics, exported like a model. (A copy, not a new
    network: building one would draw initial weights from the RNG and a resumed run would then differ.)"""
    codec = LatentCodec(copy.deepcopy(ae))
    codec.set_statistics(*latent_statistics(ae, data, batch_size))
    return export_model(codec, cfg, folder, step=step)


class AutoencoderRun(Run):
    """Run's loop and events with an autoencoder's step, measurements, picture and export."""

    def __init__(self, cfg: Config, accelerator, trainees: Trainees, adversary: Adversary, *, data: PreparedData,
                 check: ReconstructionCheck, extractor=None, **kwargs):
        self.adversary, self.data, self.check, self.extractor = adversary, data, check, extractor
        super().__init__(cfg, accelerator, trainees, **kwargs)
        self.raw_disc = accelerator.unwrap_model(adversary.net)

    @property
    def val_images(self) -> int:
        return self.check.size

    def reset_sums(self) -> None:
        super().reset_sums()
        self.terms = {name: self.zeros() for name in TERMS}

    @property
    def gan_on(self) -> bool:
        rc = self.cfg.reconstruction
        return rc.disc_weight > 0 and self.step >= rc.disc_start

    @property
    def disc_training(self) -> bool:
        rc = self.cfg.reconstruction
        return rc.disc_weight > 0 and self.step >= rc.disc_start - rc.disc_warmup

    def micro_step(self, batch: dict) -> bool:
        """One generator (autoencoder) step, then, from the discriminator's warm-up on, one discriminator step."""
        if self.world > 1 and not self.sharding_checked:
            check_sharding(self.acc, batch["rows"], self.main)
            self.sharding_checked = True
        rc = self.cfg.reconstruction
        x = random_crops(batch["images"], rc.crop).to(self.acc.device)
        recon, posterior = self.model(x)
        rec = reconstruction_loss(x, recon, rc)
        kl = posterior.kl().mean()
        loss = rec["rec"] + rc.kl_weight * kl
        if self.gan_on:
            g = generator_loss(self.adversary.net(recon))
            weight = adaptive_weight(rec["rec"], g, self.raw_model.last_layer(), rc.disc_weight)
            loss = loss + weight * g
            self.add_terms(gan_g=g.detach(), adaptive_weight=weight)
        self.acc.backward(loss)
        self.micro_loss += loss.detach().float()
        finite = self.clip_and_check()
        if finite:
            self.trainees.optimizer.step()
        self.trainees.optimizer.zero_grad(set_to_none=True)
        if finite and self.disc_training:
            self.discriminator_step(x, recon.detach())
        self.add_terms(l1=rec["l1"].detach(), kl=kl.detach())
        return finite

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """The hinge loss on real crops and their reconstructions (Esser et al. 2021, Rombach et al. 2022)."""
        self.adversary.optimizer.zero_grad(set_to_none=True)       # drop what the generator's term left there
        logits_real, logits_fake = self.adversary.net(real), self.adversary.net(fake)
        d_loss = hinge_discriminator_loss(logits_real, logits_fake)
        self.acc.backward(d_loss)
        self.adversary.optimizer.step()
        self.adversary.optimizer.zero_grad(set_to_none=True)
        self.add_terms(gan_d=d_loss.detach(), logits_real=logits_real.detach().float().mean(),
                       logits_fake=logits_fake.detach().float().mean())

    def add_terms(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self.terms[name] += value.float()

    def log(self) -> None:
        """The training loss as for diffusion, and each term of it (means since the last log)."""
        if self.main:
            for name, total in self.terms.items():
                self.writer.add_scalar(f"train/{name}", float(total) / max(self.n_logged, 1), self.step)
        super().log()

    def validation_loss(self) -> float | None:
        """L1 of the EMA autoencoder's reconstructions of the val images, measured on the main process and
        shared with the others; PSNR and SSIM to TensorBoard."""
        if self.check.size == 0:
            return None
        l1 = 0.0
        if self.main:
            metrics = self.check(self.ema.model, self.tc.batch_size)
            for name in ("psnr", "ssim"):
                self.writer.add_scalar(f"val/{name}", metrics[name], self.step)
            self.say(f"step {self.step}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                     f"L1 {metrics['l1']:.4f}")
            l1 = metrics["l1"]
        return float(self.acc.gather(torch.tensor([l1], device=self.acc.device))[0])

    def measure_quality(self) -> None:
        """Reconstruction FID of the val images (main process)."""
        if not self.main or self.check.size < 2:
            return
        metrics = self.check(self.ema.model, self.tc.batch_size, self.extractor)
        self.writer.add_scalar("val/rfid", metrics["rfid"], self.step)
        self.say(f"step {self.step}: reconstruction FID {metrics['rfid']:.2f} ({self.check.size} val images)")

    def save_samples(self) -> None:
        """Val faces (top row) above their reconstructions by the EMA autoencoder."""
        rows = self.check.rows[: self.tc.sample_images]
        originals, recons = self.check.reconstruct(self.ema.model, rows, self.tc.batch_size)
        grid = make_grid(np.concatenate([originals, recons]), nrow=len(rows))
        save_image(grid, self.folder.sample_grid(self.step))
        self.writer.add_image("reconstructions", grid, self.step, dataformats="HWC")

    def checkpoint_extras(self) -> dict:
        return {"discriminator": (self.raw_disc, self.adversary.optimizer.optimizer)}

    def export(self, folder) -> None:
        """The EMA autoencoder as a codec with its latent statistics."""
        export_codec(self.ema.model, self.data, self.cfg, folder, self.step, self.tc.batch_size)


def check_autoencoder_config(cfg: Config) -> None:
    if cfg.train.grad_accum != 1:
        raise UserError("an autoencoder run steps its discriminator after every generator step: "
                        "set train.grad_accum=1 (raise train.batch_size instead)")
    rc = cfg.reconstruction
    side = rc.crop or cfg.data.resolution
    if rc.crop and rc.crop % cfg.autoencoder.factor:
        raise UserError(f"reconstruction.crop {rc.crop} must be a multiple of the autoencoder's "
                        f"factor {cfg.autoencoder.factor} (or 0 for whole images)")
    if rc.disc_weight and side < 3 * 2 ** rc.disc_layers:       # two strides of 2 per layer, then two 4x4 convs
        raise UserError(f"the discriminator's {rc.disc_layers} layers need crops of at least "
                        f"{3 * 2 ** rc.disc_layers} px, got {side}: raise reconstruction.crop or lower disc_layers")


def prepare_autoencoder_run(cfg: Config, accelerator, data: PreparedData, restore, *, writer, progress: bool,
                            until_step: int | None) -> AutoencoderRun:
    """The autoencoder's trainees, restored by `restore(trainees, extras, loader) -> (step, stopper)` when
    resuming, prepared by Accelerate, and wrapped in an AutoencoderRun."""
    check_autoencoder_config(cfg)
    tc, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    loader = BatchLoader(data, "train", tc.batch_size, seed=tc.seed, hflip=cfg.data.hflip,
                         random_crop=cfg.data.random_crop, rank=rank, world_size=world)
    trainees, adversary = build_autoencoder_trainees(cfg, rank)
    step, stopper = restore(trainees, {"discriminator": (adversary.net, adversary.optimizer)}, loader)
    trainees.model, trainees.optimizer, adversary.net, adversary.optimizer = accelerator.prepare(
        trainees.model, trainees.optimizer, adversary.net, adversary.optimizer)
    trainees.ema.model.to(accelerator.device)
    extractor = InceptionFeatures(accelerator.device) if (tc.fid_every and accelerator.is_main_process) else None
    return AutoencoderRun(cfg, accelerator, trainees, adversary, data=data, check=ReconstructionCheck(data, cfg),
                          extractor=extractor, loader=loader, writer=writer, step=step, stopper=stopper,
                          until_step=until_step, progress=progress)
