"""Batches straight from the prepared uint8 array: no per-sample Python work, no JPEG decoding.

The order is a function of (seed, epoch) only, and the position is (epoch, batch), so a resumed run
reads exactly the batches an uninterrupted one would. With several processes every rank takes its own
slice of each global batch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..images import to_model_range


def random_resized_crop(x: torch.Tensor, rng: np.random.Generator, scale: float = 1.1) -> torch.Tensor:
    """The original script's augmentation: resize to 1.1x, then crop a random window of the old size."""
    size = x.shape[-1]
    big = F.interpolate(x, size=round(size * scale), mode="bilinear", antialias=True, align_corners=False)
    offsets = rng.integers(0, big.shape[-1] - size + 1, size=(len(x), 2))
    return torch.stack([b[:, i:i + size, j:j + size] for b, (i, j) in zip(big, offsets)])


def load_batch(data, rows: np.ndarray, rng: np.random.Generator | None = None, *, hflip: bool = False,
               random_crop: bool = False) -> dict:
    """Rows of the prepared array as a batch; augmented only when an rng is given."""
    x = to_model_range(torch.from_numpy(np.ascontiguousarray(data.images[rows])))
    if rng is not None and random_crop:
        x = random_resized_crop(x, rng)
    if rng is not None and hflip:
        flip = torch.from_numpy(rng.random(len(x)) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return {"images": x, "labels": torch.from_numpy(data.labels[rows].astype(np.int64))}


class BatchLoader:
    """An endless iterator of {"images": (B, 3, H, W) in [-1, 1], "labels": (B, n_attrs) long, "rows": (B,)}."""

    def __init__(self, data, split: str, batch_size: int, *, seed: int = 0, hflip: bool = True,
                 random_crop: bool = False, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.data, self.indices = data, data.indices(split)
        self.batch_size, self.seed, self.hflip, self.random_crop = batch_size, seed, hflip, random_crop
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.batches_per_epoch = len(self.indices) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise UserError(f"the {split} split has {len(self.indices)} images, fewer than one batch of "
                            f"{batch_size * world_size}: lower train.batch_size or add images")
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        return self.indices[np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))]

    def _rank_slice(self, order: np.ndarray, batch: int) -> np.ndarray:
        start = (batch * self.world_size + self.rank) * self.batch_size
        return np.sort(order[start:start + self.batch_size])          # sorted reads from the memmap

    def load(self, rows: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        return load_batch(self.data, rows, rng, hflip=self.hflip, random_crop=self.random_crop)

    def __iter__(self):
        while True:
            order = self.order(self.epoch)
            while self.batch < self.batches_per_epoch:
                rows = self._rank_slice(order, self.batch)
                rng = np.random.default_rng([self.seed, self.epoch, self.batch, self.rank, 1])
                self.batch += 1
                yield {**self.load(rows, rng), "rows": torch.from_numpy(rows)}
            self.epoch, self.batch = self.epoch + 1, 0
