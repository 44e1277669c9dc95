"""Latents of a prepared dataset, encoded once and cached: what latent diffusion's epochs read.

    latents = encode_latents(data, codec.encode, key=autoencoder_hash, cache_dir=...)
    loader = LatentLoader(latents, "train", batch_size=32, seed=0)       # {"x": (B, C, h, w), "labels", "rows"}
    loader = LatentLoader(latents, "train", 32, lowres=32)   # + "lowres": each image at 32 px, flipped with its latent

A build fills a work folder beside its final one (`<name>.tmp`, see io.atomic_folder) while it holds the
folder's lock (`<name>.lock`, an OS lock freed when its process dies): an exception or Ctrl-C removes the work
folder; one left by a killed builder (kill -9, a power cut) is removed by the next build in the same cache,
whatever its key.

Every image is encoded twice, as it is and flipped left to right, so horizontal-flip augmentation costs
nothing at training time. The array is float16, memory-mapped, (2, N, C, h, w); the folder is keyed by the
prepared data folder and the codec's key (a hash of the autoencoder's weights and latent statistics), so a
new autoencoder never reuses another one's latents.
"""
from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..images import resize_images, to_model_range
from ..io import atomic_folder, recover_folder, sibling
from .loader import BatchLoader
from .prepare import PreparedData, cache_root, check_space, raise_for_cache, reserved_memmap

LATENTS_FILE, META_FILE = "latents.npy", "meta.json"
FORMAT_VERSION = 1
log = logging.getLogger("ddpm_faces.data")


@dataclass
class LatentData:
    root: Path
    latents: np.ndarray                 # (2, N, C, h, w) float16: [0] as prepared, [1] flipped
    data: PreparedData                  # the images' splits and labels

    def indices(self, split: str) -> np.ndarray:
        return self.data.indices(split)


def latent_folder(data: PreparedData, key: str, cache_dir: str | Path | None) -> Path:
    return Path(cache_root(cache_dir)) / "latents" / f"{data.root.name}-{key[:16]}"


def encode_latents(data: PreparedData, encode: Callable[[torch.Tensor], torch.Tensor], key: str, *,
                   cache_dir: str | Path | None = None, batch_size: int = 64, progress: bool = True) -> LatentData:
    """The cached latents of every image of `data` (both flips) under `encode`, built when missing."""
    folder = latent_folder(data, key, cache_dir)
    found = open_latents(folder, data, key)
    if found is not None:
        return found
    with torch.inference_mode():
        shape = tuple(encode(to_model_range(torch.from_numpy(np.array(data.images[:1])))).shape[1:])
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with building(folder):                       # one builder at a time; the others wait, then read its work
            remove_stale_builds(folder.parent, held=folder)     # a killed build's work is big: before the space check
            found = open_latents(folder, data, key, quiet=True)
            if found is not None:
                return found
            check_space(folder.parent, 2 * len(data) * int(np.prod(shape)) * 2 + (1 << 20),
                        f"encoding the latents of {len(data):,} images")
            with atomic_folder(folder) as tmp:
                out = reserved_memmap(tmp / LATENTS_FILE, np.float16, (2, len(data), *shape))
                _encode_into(out, data, encode, batch_size, progress)
                out.flush()
                meta = {"format": FORMAT_VERSION, "key": key, "count": len(data), "shape": list(shape),
                        "data": data.root.name, "sum": digest(out)}
                del out
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            latents = np.load(folder / LATENTS_FILE, mmap_mode="r", allow_pickle=False)   # summed just above
    except OSError as error:
        raise_for_cache(folder.parent, error)
    return LatentData(folder, latents, data)


def lock_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


@contextmanager
def building(folder: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the build lock of a cache folder (an OS lock on a file beside it, released when its process
    dies): two trainers that need the same latents encode them once, and neither ever reads a half-built
    folder or shares the other's work folder. Without `wait`, yields False at once when another build holds it
    (this process's own included)."""
    with open(lock_file(folder), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_builds(root: Path, held: Path | None = None) -> list[Path]:
    """Remove the work folders (`<name>.tmp`, `<name>.old`) of latent builds under `root` whose builder is gone
    (a build holds its folder's lock while it runs, and a process's locks die with it), after finishing a
    replacement that was cut between its two renames. A folder whose lock is held is left alone, but for `held`,
    the one whose lock the caller holds (so no other build is at work there). Returns what was removed."""
    removed = []
    finals = {work.with_name(work.name[:-len(".tmp")]) for work in root.glob("*.tmp")} | \
             {work.with_name(work.name[:-len(".old")]) for work in root.glob("*.old")}
    for final in sorted(finals):
        works = [sibling(final, ".tmp"), sibling(final, ".old")]
        if not any(work.is_dir() for work in works) or not lock_file(final).is_file():
            continue                                 # not a latent build's (it would have made its lock first)
        with nullcontext(True) if final == held else building(final, wait=False) as free:
            if not free:
                continue                             # a live build
            recover_folder(final)
            for work in works:
                if work.is_dir():
                    shutil.rmtree(work, ignore_errors=True)
                    removed.append(work)
    if removed:
        log.info("removed the work folders of interrupted latent builds: %s", ", ".join(p.name for p in removed))
    return removed


def digest(latents: np.ndarray) -> float:
    """The float64 sum of every latent, read in slices (the record a damaged or overwritten array no longer
    matches); non-finite values fail here."""
    total = 0.0
    for i in range(0, latents.shape[1], 512):
        part = float(np.asarray(latents[:, i:i + 512], dtype=np.float64).sum())
        if not np.isfinite(part):
            raise ValueError(f"non-finite latents among images {i} to {i + 512}")
        total += part
    return total


def _encode_into(out: np.ndarray, data: PreparedData, encode, batch_size: int, progress: bool) -> None:
    bar = tqdm(total=len(data), desc="encoding latents", unit="img", disable=not progress)
    with bar, torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x = to_model_range(torch.from_numpy(np.array(data.images[start:start + batch_size])))
            for flip, images in enumerate((x, x.flip(-1))):
                z = encode(images).float().cpu().numpy().astype(np.float16)
                if not np.isfinite(z).all():
                    raise UserError(f"the autoencoder gives non-finite latents for images {start} to "
                                    f"{start + len(x)}: its weights are damaged or it diverged; train or export it "
                                    "again")
                out[flip, start:start + len(x)] = z
            bar.update(len(x))


def open_latents(folder: Path, data: PreparedData, key: str, quiet: bool = False) -> LatentData | None:
    """The latents in `folder` when they are complete, belong to `data` and `key` and still sum to what was
    recorded when they were built (no value overwritten, none NaN); else None, to be rebuilt, with one warning
    naming the damaged file."""
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / META_FILE).read_text())
        latents = np.load(folder / LATENTS_FILE, mmap_mode="r", allow_pickle=False)
        expected = (2, len(data), *meta.get("shape", []))
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key or latents.shape != expected:
            raise ValueError(f"it holds {latents.shape}, not the {expected} of this data")
        total = digest(latents)
        if "sum" in meta and total != meta["sum"]:
            raise ValueError("its values changed since it was built")
    except (OSError, ValueError, EOFError, TypeError, AttributeError) as err:
        if not quiet:
            log.warning("the latent cache %s is damaged (%s): encoding it again", folder / LATENTS_FILE, err)
        return None
    return LatentData(folder, latents, data)


class LatentLoader(BatchLoader):
    """BatchLoader's order, sharding and resumable position over cached latents: {"x", "labels", "rows"}.
    A flip picks the flipped copy of an image's latent instead of flipping the latent itself. With `lowres`
    (a side in pixels) each batch also holds "lowres": the prepared images, flipped as their latents, taken
    down to that side in [-1, 1]: the training pairs of a super-resolution stage."""

    def __init__(self, latents: LatentData, split: str, batch_size: int, lowres: int | None = None, **kwargs):
        super().__init__(latents.data, split, batch_size, random_crop=False, **kwargs)
        self.latents, self.lowres = latents.latents, lowres

    def load(self, rows: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        flips = (rng.random(len(rows)) < 0.5).astype(np.int64) if (rng is not None and self.hflip) else \
            np.zeros(len(rows), dtype=np.int64)
        x = torch.from_numpy(np.stack([self.latents[f, r] for f, r in zip(flips, rows)]).astype(np.float32))
        batch = {"x": x, "labels": torch.from_numpy(self.data.labels[rows].astype(np.int64))}
        if self.lowres:
            images = to_model_range(torch.from_numpy(np.stack(
                [self.data.images[r][:, ::-1] if f else self.data.images[r] for f, r in zip(flips, rows)])))
            batch["lowres"] = resize_images(images, self.lowres)
        return batch
