"""What the trainer measures besides the training loss: validation loss, sample quality, early stopping.

Validation loss runs at fixed timesteps with fixed noise, so evaluations are comparable over time. Sample
quality (a small-sample FID / KID / face rate with the EMA weights) is a trend, not a benchmark: its samples
are split across the ranks and scored on the main process.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..config import Config
from ..data import PreparedData, load_batch
from ..diffusion import diffusion_loss
from ..images import make_grid, save_image
from ..pipeline import Pipeline, generate

QUALITY_SEED = 1_000_000               # samples for FID use their own seeds, apart from the sample grids


class EarlyStopping:
    """Stop after `patience` evaluations without an improvement of more than `min_delta`."""

    def __init__(self, patience: int, min_delta: float, best: float | None = None, bad: int = 0):
        self.patience, self.min_delta, self.best, self.bad = patience, min_delta, best, bad

    def update(self, value: float) -> bool:
        """Record a validation value; True when it is a new best."""
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.bad = value, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


class Validation:
    """Validation loss at fixed timesteps and fixed noise, so evaluations are comparable over time."""

    def __init__(self, data: PreparedData, cfg: Config, rank: int, world: int):
        from ..evaluation.reference import spread

        rows = spread(data.indices("val"), cfg.train.val_images)        # evenly over the split, not a prefix
        self.data, self.rows, self.size = data, rows, len(rows)
        T = cfg.diffusion.timesteps
        g = torch.Generator().manual_seed(12345)
        res = cfg.data.resolution
        self.t = torch.linspace(0, T - 1, max(self.size, 1)).round().long()[: self.size]
        self.noise = torch.randn(self.size, 3, res, res, generator=g)
        self.mine = torch.arange(self.size)[rank::world]
        self.cfg = cfg

    @torch.no_grad()
    def __call__(self, net, schedule, device, batch_size: int) -> torch.Tensor:
        """Sum of per-image losses over this rank's share (reduce across ranks, divide by size)."""
        total = torch.zeros((), device=device)
        d = self.cfg.diffusion
        for chunk in self.mine.split(batch_size):
            x0 = load_batch(self.data, self.rows[chunk.numpy()])["images"].to(device)
            losses = diffusion_loss(net, schedule, x0, self.t[chunk].to(device), self.noise[chunk].to(device),
                                    prediction=d.prediction, min_snr_gamma=d.min_snr_gamma, reduce=False)
            total += losses.sum()
        return total


class SampleQuality:
    """FID, KID, precision/recall and face rate of `train.fid_images` samples against the val split."""

    def __init__(self, cfg: Config, data: PreparedData, rank: int, world: int, main: bool, device):
        """On the main process, loads the Inception network and the reference statistics (cached)."""
        self.cfg, self.rank, self.world, self.main = cfg, rank, world, main
        self.reference = self.extractor = None
        if main:
            from ..evaluation import InceptionFeatures, reference_stats

            d = cfg.data
            split = "val" if len(data.indices("val")) >= 2 else "train"
            self.extractor = InceptionFeatures(device)
            self.reference = reference_stats(d.source, split, d.resolution, num=cfg.train.fid_images,
                                             cache_dir=d.cache_dir, crop=d.crop, hf_config=d.hf_config,
                                             extractor=self.extractor, progress=True)

    @staticmethod
    def check_dependencies() -> None:
        """Raise UserError now if the Inception network or the face detector is missing."""
        from ..evaluation import inception_weights_path
        from ..evaluation.faces import _detector

        inception_weights_path()
        _detector()

    def __call__(self, ema_model, accelerator) -> dict | None:
        """Metrics on the main process (None on the others); every rank generates its share."""
        t = self.cfg.train
        per_rank = math.ceil(t.fid_images / self.world)
        start = self.rank * per_rank
        count = max(0, min(t.fid_images, start + per_rank) - start)
        res = self.cfg.data.resolution
        mine = np.zeros((per_rank, res, res, 3), dtype=np.uint8)
        if count:
            mine[:count] = generate(Pipeline(ema_model, self.cfg, self.cfg.run_dir), count, seed=QUALITY_SEED,
                                    first_index=start, sampler=t.fid_sampler, steps=t.fid_steps,
                                    batch_size=t.batch_size, progress=False)
        gathered = accelerator.gather(torch.from_numpy(mine).to(accelerator.device)).cpu().numpy()
        if not self.main:
            return None
        from ..evaluation import evaluate_images

        return evaluate_images(gathered[: t.fid_images], self.reference, extractor=self.extractor)


def sample_grid(ema_model, cfg: Config, step: int, writer) -> None:
    """The fixed-seed grid of train.sample_images faces: runs/<name>/samples/step-N.png and TensorBoard."""
    t = cfg.train
    images = generate(Pipeline(ema_model, cfg, cfg.run_dir), t.sample_images, seed=t.seed,
                      sampler=t.sample_sampler, steps=t.sample_steps, batch_size=t.sample_images, progress=False)
    grid = make_grid(images)
    save_image(grid, cfg.run_dir / "samples" / f"step-{step:07d}.png")
    writer.add_image("samples", grid, step, dataformats="HWC")
