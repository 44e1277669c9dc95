"""Training the first stage of latent diffusion: the autoencoder, with the diffusion runs' conventions.

`ddpm-faces train --config ae128` (a config with `task: autoencoder`) goes through the same loop as a
diffusion run (trainer.py): run folder and lock, Accelerate, bf16, EMA, TensorBoard, checkpoints that resume
bit for bit, SIGTERM, exports. Only what happens in a step and what is measured differ, here:

- a step: random crops (reconstruction.crop), reconstruction + KL loss, and once `disc_start` steps have
  passed the patch GAN's generator term with VQGAN's adaptive weight or a fixed one (disc_weight_mode); from
  `disc_start - disc_warmup` on, one discriminator step, hinge loss plus optional LeCAM
  (training/reconstruction.py). Against a fixed autoencoder at 35 dB the discriminator needs some 500 steps
  to tell its reconstructions from photos, so a discriminator switched on together with its term pushes the
  decoder with noise (measured: logits of real and reconstructed crops equal for the first 1,000 steps); the
  warm-up lets it learn first;
- the start: random weights, or with reconstruction.init_from those of another autoencoder (an export, a run,
  or the codec a latent model carries, e.g. the bundled latent128); with reconstruction.freeze_encoder only
  the decoder trains (the encoder has no gradients and is not in the optimizer), so the latents, a latent
  cache and every diffusion model trained on them stay valid: a sharper decoder for a trained latent model,
  as Stable Diffusion's released decoders were fine-tuned;
- validation: PSNR, SSIM and L1 of the EMA autoencoder on whole val images (L1 is `val/loss`, which picks
  `best/`); with train.fid_every, reconstruction FID (which picks `best/` under train.best_metric fid);
- the picture: val faces above their reconstructions;
- the export: the EMA autoencoder as a LatentCodec, with the per-channel mean and std of its latents over
  train images, so that a latent diffusion run can use it as it is (codec.autoencoder); with a frozen
  encoder the statistics init_from recorded, unchanged, so the new decoder drops into the latent model.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data import BatchLoader, PreparedData, load_batch
from ..errors import UserError
from ..evaluation import InceptionFeatures
from ..evaluation.reconstruction import original_stats, reconstruct, reconstruction_metrics
from ..evaluation.reference import spread
from ..images import make_grid, save_image
from ..models.autoencoder import Autoencoder
from ..models.codec import LatentCodec
from ..models.discriminator import DiscriminatorConfig, PatchDiscriminator
from ..pipeline import read_config
from ..runs import CODEC_FILE, bundled, bundled_folders, export_model, find_model, read_codec, read_weights
from .ema import EMA
from .lr import make_scheduler
from .reconstruction import (gan_weight, generator_loss, generator_objective, hinge_discriminator_loss,
                             lecam_penalty, reconstruction_loss)
from .run import Run, Trainees, check_sharding

log = logging.getLogger("ddpm_faces.train")
STATS_IMAGES = 256                  # train images whose latents give the codec's shift and scale (x 2 flips)
TERMS = ("l1", "rec", "kl", "gan_g", "gan_weight", "gan_d", "lecam", "logits_real", "logits_fake")
Statistics = tuple[torch.Tensor, torch.Tensor]     # a codec's per-channel (shift, scale) of the latents


@dataclass
class Adversary:
    """The patch discriminator and its optimizer (both prepared by Accelerate)."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class InitialWeights:
    """What reconstruction.init_from holds: an Autoencoder's state dict and, when it was exported as a codec,
    the latent statistics recorded with it."""
    state: dict[str, torch.Tensor]
    statistics: Statistics | None
    source: Path


def init_source_files(name: str) -> tuple[Path, Config]:
    """The safetensors file with the autoencoder that init_from names, and the config beside it: an autoencoder
    export, run or checkpoint (its weights), or a latent diffusion model (the codec it carries)."""
    if not Path(name).exists() and not bundled(name).is_dir():
        models = ", ".join(f.name for f in bundled_folders())
        raise UserError(f"reconstruction.init_from {name}: no such file, folder or bundled model: give an autoencoder "
                        f"export or run folder, or a bundled latent model ({models})")
    files, source_cfg = find_model(name), read_config(name)
    if source_cfg.kind.codec:
        return files.weights, source_cfg
    carried = files.folder / CODEC_FILE
    if not source_cfg.codec.autoencoder or not carried.is_file():
        raise UserError(f"reconstruction.init_from {name} is a pixel diffusion model without an autoencoder: give "
                        "an autoencoder export or run, or a latent model that carries one (e.g. latent128)")
    return carried, source_cfg


def read_initial_weights(cfg: Config) -> InitialWeights:
    """The weights reconstruction.init_from names, with safetensors only, checked against cfg.autoencoder."""
    name = cfg.reconstruction.init_from
    path, source_cfg = init_source_files(name)
    if source_cfg.autoencoder != cfg.autoencoder:
        raise UserError(f"reconstruction.init_from {name} has another autoencoder section than this config: copy "
                        f"its autoencoder section (from {path.parent / 'config.yaml'}) into the config")
    if source_cfg.kind.codec:
        state = read_weights(find_model(name), source_cfg)[0]
    else:
        state = read_codec(path)
    statistics = (state.pop("shift"), state.pop("scale")) if "shift" in state else None    # an export is a codec
    prefix = "autoencoder."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    return InitialWeights(state, statistics, path)


def start_from(ae: Autoencoder, initial: InitialWeights, freeze_encoder: bool) -> None:
    """Load init_from's weights into `ae`; with freeze_encoder the encoder (with the layer that predicts the
    posterior's moments) gets no gradients, so it stays bit for bit what it was."""
    try:
        ae.load_state_dict(initial.state)
    except RuntimeError:
        raise UserError(f"reconstruction.init_from: the weights in {initial.source} do not fit the autoencoder "
                        "section: use the config that came with them") from None
    if freeze_encoder:
        ae.encoder.requires_grad_(False)


def build_autoencoder_trainees(cfg: Config, rank: int, initial: InitialWeights | None = None
                               ) -> tuple[Trainees, Adversary]:
    """The autoencoder (the same initial weights on every rank, or init_from's), its EMA, AdamW with
    warmup-cosine over the weights that train (the decoder only with freeze_encoder), and the discriminator
    with its own AdamW; then seeds each rank's own crops."""
    tc, rc = cfg.train, cfg.reconstruction
    torch.manual_seed(tc.seed)
    ae = Autoencoder(cfg.autoencoder)
    if initial is not None:
        start_from(ae, initial, rc.freeze_encoder)
    disc = PatchDiscriminator(DiscriminatorConfig(rc.disc_channels, rc.disc_layers))
    ema = EMA(ae, tc.ema_decay, tc.ema_warmup)
    torch.manual_seed(tc.seed + rank)
    betas = tuple(tc.adam_betas)
    trained = [p for p in ae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=tc.lr, betas=betas, weight_decay=tc.weight_decay, foreach=True)
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
        self.reference = None               # the originals' Inception statistics, measured at the first FID

    def reconstruct(self, ae: Autoencoder, rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(originals, reconstructions) as uint8 pictures; decoded from the posterior mean."""
        return reconstruct(lambda images: ae(images, sample=False)[0], self.data, rows, batch_size,
                           next(ae.parameters()).device)

    def __call__(self, ae: Autoencoder, batch_size: int, extractor=None) -> dict[str, float]:
        originals, recons = self.reconstruct(ae, self.rows, batch_size)
        if extractor is not None and self.reference is None:
            self.reference = original_stats(originals, extractor)
        metrics = reconstruction_metrics(originals, recons, extractor, self.reference)
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


def export_codec(ae: Autoencoder, data: PreparedData, cfg: Config, folder, step: int, batch_size: int,
                 statistics: Statistics | None = None):
    """The autoencoder as a LatentCodec with its latent statistics (measured, or `statistics` as given: those of
    a frozen encoder's source), exported like a model. (A copy, not a new network: building one would draw
    initial weights from the RNG and a resumed run would then differ.)"""
    codec = LatentCodec(copy.deepcopy(ae))
    codec.set_statistics(*(statistics if statistics is not None else latent_statistics(ae, data, batch_size)))
    return export_model(codec, cfg, folder, step=step)


class AutoencoderRun(Run):
    """Run's loop and events with an autoencoder's step, measurements, picture and export."""

    def __init__(self, cfg: Config, accelerator, trainees: Trainees, adversary: Adversary, *, data: PreparedData,
                 check: ReconstructionCheck, extractor=None, statistics: Statistics | None = None, **kwargs):
        self.adversary, self.data, self.check, self.extractor = adversary, data, check, extractor
        self.statistics = statistics            # the latent statistics to export (a frozen encoder's), else measured
        self.measured: tuple[int, dict] | None = None        # (step, metrics): the val images reconstructed once a step
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
        if self.gan_on:
            g = generator_loss(self.adversary.net(recon))
            weight = gan_weight(rec["rec"], g, self.raw_model.last_layer(), rc)
            loss = generator_objective(rec["rec"], kl, rc, g, weight)
            self.add_terms(gan_g=g.detach(), gan_weight=weight)
        else:
            loss = generator_objective(rec["rec"], kl, rc)
        self.acc.backward(loss)
        self.micro_loss += loss.detach().float()
        finite = self.clip_and_check()
        if finite:
            self.trainees.optimizer.step()
        self.trainees.optimizer.zero_grad(set_to_none=True)
        if finite and self.disc_training:
            self.discriminator_step(x, recon.detach())
        self.add_terms(l1=rec["l1"].detach(), rec=rec["rec"].detach(), kl=kl.detach())
        return finite

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """The hinge loss on real crops and their reconstructions (Esser et al. 2021, Rombach et al. 2022), plus
        lecam_weight x LeCAM (Tseng et al. 2021, eq. 3) against the logits' running means, updated first."""
        rc = self.cfg.reconstruction
        self.adversary.optimizer.zero_grad(set_to_none=True)       # drop what the generator's term left there
        logits_real, logits_fake = self.adversary.net(real), self.adversary.net(fake)
        d_loss = hinge_discriminator_loss(logits_real, logits_fake)
        if rc.lecam_weight:
            self.raw_disc.update_logit_means(logits_real.detach(), logits_fake.detach(), rc.lecam_decay)
            lecam = lecam_penalty(logits_real, logits_fake, self.raw_disc.logit_means)
            d_loss = d_loss + rc.lecam_weight * lecam
            self.add_terms(lecam=lecam.detach())
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
            metrics = self.metrics_now()
            for name in ("psnr", "ssim"):
                self.writer.add_scalar(f"val/{name}", metrics[name], self.step)
            self.say(f"step {self.step}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                     f"L1 {metrics['l1']:.4f}")
            l1 = metrics["l1"]
        return float(self.acc.gather(torch.tensor([l1], device=self.acc.device))[0])

    def metrics_now(self) -> dict[str, float]:
        """PSNR, SSIM, L1 (and reconstruction FID when train.fid_every is due) of the EMA autoencoder on the val
        images at this step: validation and the FID share one reconstruction (a minute at 128 px on one thread)."""
        if self.measured is None or self.measured[0] != self.step:
            fid_due = bool(self.tc.fid_every) and self.due(self.tc.fid_every) and self.extractor is not None
            metrics = self.check(self.ema.model, self.tc.batch_size, self.extractor if fid_due else None)
            self.measured = (self.step, metrics)
        return self.measured[1]

    def measure_quality(self) -> None:
        """Reconstruction FID of the val images (main process, shared with the others); with train.best_metric
        fid it picks `best/` and drives early stopping."""
        rfid = 0.0
        if self.main and self.check.size >= 2:
            metrics = self.metrics_now()
            self.writer.add_scalar("val/rfid", metrics["rfid"], self.step)
            self.say(f"step {self.step}: reconstruction FID {metrics['rfid']:.2f}, PSNR {metrics['psnr']:.2f} dB "
                     f"({self.check.size} val images)")
            rfid = metrics["rfid"]
        if self.tc.best_metric == "fid" and self.check.size >= 2:
            shared = self.acc.gather(torch.tensor([rfid], device=self.acc.device))[0].item()
            self.track_best(f"reconstruction FID ({self.check.size} val images)", shared)

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
        export_codec(self.ema.model, self.data, self.cfg, folder, self.step, self.tc.batch_size, self.statistics)


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


def frozen_statistics(cfg: Config, initial: InitialWeights | None) -> Statistics | None:
    """With a frozen encoder, the latent statistics its source recorded: the latents do not change, so neither
    do they (measured again they could differ in the last bits, and the decoder would no longer drop into the
    latent model). None: measure them at each export."""
    return initial.statistics if cfg.reconstruction.freeze_encoder and initial is not None else None


def prepare_autoencoder_run(cfg: Config, accelerator, data: PreparedData, restore, *, writer, progress: bool,
                            until_step: int | None) -> AutoencoderRun:
    """The autoencoder's trainees, restored by `restore(trainees, extras, loader) -> (step, stopper)` when
    resuming, prepared by Accelerate, and wrapped in an AutoencoderRun."""
    check_autoencoder_config(cfg)
    tc, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    loader = BatchLoader(data, "train", tc.batch_size, seed=tc.seed, hflip=cfg.data.hflip,
                         random_crop=cfg.data.random_crop, rank=rank, world_size=world)
    initial = read_initial_weights(cfg) if cfg.reconstruction.init_from else None
    trainees, adversary = build_autoencoder_trainees(cfg, rank, initial)
    step, stopper = restore(trainees, {"discriminator": (adversary.net, adversary.optimizer)}, loader)
    trainees.model, trainees.optimizer, adversary.net, adversary.optimizer = accelerator.prepare(
        trainees.model, trainees.optimizer, adversary.net, adversary.optimizer)
    trainees.ema.model.to(accelerator.device)
    extractor = InceptionFeatures(accelerator.device) if (tc.fid_every and accelerator.is_main_process) else None
    return AutoencoderRun(cfg, accelerator, trainees, adversary, data=data, check=ReconstructionCheck(data, cfg),
                          extractor=extractor, statistics=frozen_statistics(cfg, initial), loader=loader,
                          writer=writer, step=step, stopper=stopper,
                          until_step=until_step, progress=progress)
