"""What the trainer measures besides the training loss: validation loss, sample quality, early stopping.

Validation loss runs at fixed timesteps with fixed noise, so evaluations are comparable over time. Sample
quality (a small-sample FID / KID / face rate with the EMA weights) is a trend, not a benchmark: its samples
are split across the ranks and scored on the main process.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..config import Config, TrainConfig
from ..data import PreparedData, load_batch
from ..evaluation import InceptionFeatures, evaluate_images, inception_weights_path, reference_stats
from ..photos.faces import load_detector
from ..evaluation.reference import spread
from ..images import make_grid, resize_images, save_image, to_uint8
from ..pipeline import Pipeline, SamplingRequest, generate
from .step import diffusion_step

QUALITY_SEED = 1_000_000               # samples for FID use their own seeds, apart from the sample grids
VALIDATION_SEED = 12345                # the fixed noise of the validation loss
RGB = 3                                # generate() returns (N, H, W, 3) uint8 pictures, whatever the codec's x


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
    """Validation loss at fixed timesteps and fixed noise, so evaluations are comparable over time.

    Image i of the `val_images` chosen is noised at t_i (evenly spaced over 0..T-1) with its own fixed
    noise of shape `shape` (the codec's x); each rank scores its share (rows rank, rank + world, ...)."""

    def __init__(self, data: PreparedData, cfg: Config, shape: tuple[int, ...], rank: int = 0, world: int = 1):
        rows = spread(data.indices("val"), cfg.train.val_images)        # evenly over the split, not a prefix
        self.data, self.rows, self.size = data, rows, len(rows)
        T = cfg.diffusion.timesteps
        g = torch.Generator().manual_seed(VALIDATION_SEED)
        self.t = torch.linspace(0, T - 1, max(self.size, 1)).round().long()[: self.size]
        self.noise = torch.randn(self.size, *shape, generator=g)
        self.mine = torch.arange(self.size)[rank::world]

    @torch.no_grad()
    def __call__(self, pipe: Pipeline, batch_size: int) -> torch.Tensor:
        """Sum of per-image losses over this rank's share (reduce across ranks, divide by size)."""
        total = torch.zeros((), device=pipe.device)
        for chunk in self.mine.split(batch_size):
            images = load_batch(self.data, self.rows[chunk.numpy()])["images"]
            level = torch.zeros(len(chunk), dtype=torch.long) if pipe.cfg.model.lowres_channels else None
            total += diffusion_step(pipe, images, t=self.t[chunk], noise=self.noise[chunk], reduce=False,
                                    lowres_t=level).sum()
        return total


class SampleQuality:
    """FID, KID, precision/recall and face rate of `train.fid_images` samples against the val split."""

    def __init__(self, cfg: Config, data: PreparedData, rank: int, world: int, main: bool, device):
        """On the main process, loads the Inception network and the reference statistics (cached)."""
        self.tc, self.rank, self.world, self.main = cfg.train, rank, world, main
        self.reference = self.extractor = None
        if main:
            d = cfg.data
            split = "val" if len(data.indices("val")) >= 2 else "train"
            self.extractor = InceptionFeatures(device)
            self.reference = reference_stats(d.source, split, d.resolution, num=cfg.train.fid_images,
                                             cache_dir=d.cache_dir, crop=d.crop, hf_config=d.hf_config,
                                             extractor=self.extractor, progress=True)

    @staticmethod
    def check_dependencies() -> None:
        """Raise UserError now if the Inception network or the face detector is missing."""
        inception_weights_path()
        load_detector()

    def share(self) -> tuple[int, int, int]:
        """(first index, count, padded count) of the samples this rank generates."""
        per_rank = math.ceil(self.tc.fid_images / self.world)
        start = self.rank * per_rank
        return start, max(0, min(self.tc.fid_images, start + per_rank) - start), per_rank

    def __call__(self, pipe: Pipeline, accelerator) -> dict | None:
        """Metrics on the main process (None on the others); every rank generates its share."""
        tc = self.tc
        start, count, per_rank = self.share()
        size = pipe.codec.image_size
        mine = np.zeros((per_rank, size, size, RGB), dtype=np.uint8)
        if count:
            request = SamplingRequest(num=count, seed=QUALITY_SEED, sampler=tc.fid_sampler, steps=tc.fid_steps,
                                      batch_size=tc.batch_size)
            mine[:count] = generate(pipe, request, first_index=start, progress=False)
        gathered = accelerator.gather(torch.from_numpy(mine).to(accelerator.device)).cpu().numpy()
        if not self.main:
            return None
        return evaluate_images(gathered[: tc.fid_images], self.reference, extractor=self.extractor)


def sample_grid(pipe: Pipeline, tc: TrainConfig, path: Path, writer, step: int,
                data: PreparedData | None = None) -> None:
    """The fixed-seed grid of train.sample_images faces, saved to `path` and shown in TensorBoard. A
    super-resolution stage upscales val photos instead (with `data`): rows of (the low-resolution image enlarged
    bicubically, its upscaling, the photo)."""
    request = SamplingRequest(num=tc.sample_images, seed=tc.seed, sampler=tc.sample_sampler, steps=tc.sample_steps,
                              batch_size=tc.sample_images)
    if pipe.superres and data is not None:
        grid = upscaled_grid(pipe, request, data)
    else:
        grid = make_grid(generate(pipe, request, progress=False))
    save_image(grid, path)
    writer.add_image("samples", grid, step, dataformats="HWC")


def upscaled_grid(pipe: Pipeline, request: SamplingRequest, data: PreparedData) -> np.ndarray:
    """Val photos through a super-resolution stage: bicubic | upscaled | photo for each, three per row pair."""
    rows = spread(data.indices("val") if len(data.indices("val")) else data.indices("train"), request.num)
    photos = load_batch(data, rows)["images"]
    lowres = resize_images(photos, pipe.cfg.lowres.resolution)
    upscaled = generate(pipe, request.replace(num=len(rows), sr_steps=request.steps), lowres=lowres, progress=False)
    size = photos.shape[-1]
    bicubic = to_uint8(torch.nn.functional.interpolate(lowres, size=(size, size), mode="bicubic",
                                                      align_corners=False))
    triples = np.stack([bicubic, upscaled, to_uint8(photos)], axis=1).reshape(-1, size, size, RGB)
    return make_grid(triples, nrow=6)
