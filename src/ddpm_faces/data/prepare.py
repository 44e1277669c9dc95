"""Decode a source's images once into a cached uint8 array on disk.

A prepared dataset is a folder::

    <cache_dir>/<name>-<hash>-r<resolution>-<crop>/
        images.npy   (N, H, W, 3) uint8, opened memory-mapped
        split.npy    (N,) uint8, 0 = train, 1 = val
        labels.npy   (N, n_attributes) int16, class index into the vocabulary, -1 = unknown
        meta.json    source, resolution, crop, attributes, vocab, counts, format version

The folder is built under a temporary name beside it and renamed into place when complete, so a
folder with the final name is always whole. A second call with the same source, resolution and
crop reuses it without decoding anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from ..errors import UserError
from .sources import Record, Source, resolve_source, source_identity

logger = logging.getLogger("ddpm_faces.data")

FORMAT_VERSION = 1
CROPS = ("center", "none")
SPLIT_CODES = {"train": 0, "val": 1}
CACHE_ENV = "DDPM_FACES_CACHE"
CHUNK_SIZE = 256
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What Pillow raises for unreadable, corrupt, truncated or non-image files."""


@dataclass
class PreparedData:
    """A prepared dataset folder: memory-mapped images, splits, labels and their vocabulary."""

    root: Path
    images: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    attributes: list[str]
    vocab: dict[str, list[str]]
    meta: dict[str, Any]
    resolution: int

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        """Open a prepared dataset folder (images stay on disk, memory-mapped)."""
        root = Path(root)
        meta = read_meta(root)
        if meta is None:
            raise UserError(
                f"{root}: not a prepared dataset of format {FORMAT_VERSION} (meta.json missing or "
                "different); delete the folder and prepare the data again"
            )
        return cls(
            root=root,
            images=np.load(root / "images.npy", mmap_mode="r"),
            split=np.load(root / "split.npy"),
            labels=np.load(root / "labels.npy"),
            attributes=list(meta["attributes"]),
            vocab={name: list(values) for name, values in meta["vocab"].items()},
            meta=meta,
            resolution=int(meta["resolution"]),
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def indices(self, split: str) -> np.ndarray:
        """Row indices of "train", "val" or "all" images (possibly empty)."""
        if split == "all":
            return np.arange(len(self), dtype=np.int64)
        if split not in SPLIT_CODES:
            raise UserError(f"unknown split {split!r}; use one of train, val, all")
        return np.flatnonzero(self.split == SPLIT_CODES[split]).astype(np.int64)


# --------------------------------------------------------------------------- public entry point


def prepare_dataset(
    source: str | Path,
    resolution: int,
    *,
    crop: str = "center",
    cache_dir: str | Path | None = None,
    hf_config: str = "0.25",
    progress: bool = True,
) -> PreparedData:
    """Decode ``source`` at ``resolution`` into the cache (once) and open it.

    ``crop="center"`` centre-crops each image to a square before resizing; ``crop="none"`` resizes
    the whole image to a square. ``cache_dir`` defaults to ``$DDPM_FACES_CACHE`` or
    ``~/.cache/ddpm-faces/data``.
    """
    _check_options(resolution, crop)
    resolution, source = int(resolution), str(source)
    identity = source_identity(source, hf_config)
    final = Path(cache_root(cache_dir)) / cache_name(identity, resolution, crop)
    if read_meta(final) is not None:
        data = PreparedData.load(final)
        logger.info("using prepared data %s (%s images)", final, f"{len(data):,}")
        return data

    resolved = resolve_source(source, hf_config=hf_config)
    final.parent.mkdir(parents=True, exist_ok=True)
    building = final.with_name(f".{final.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    building.mkdir()
    try:
        _build(resolved, source, resolution, crop, building, progress)
        _move_into_place(building, final)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return PreparedData.load(final)


def cache_root(cache_dir: str | Path | None) -> Path:
    """The folder that holds prepared datasets."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "ddpm-faces" / "data"


def cache_name(identity: str, resolution: int, crop: str) -> str:
    """``<readable name>-<short hash of the identity>-r<resolution>-<crop>``."""
    base = re.sub(r"[@#][^/]*$", "", identity).rstrip("/")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", base.rsplit("/", 1)[-1]).strip("._") or "data"
    digest = hashlib.sha1(identity.encode("utf-8")).hexdigest()[:10]
    return f"{readable[:40]}-{digest}-r{resolution}-{crop}"


def read_meta(root: Path) -> dict[str, Any] | None:
    """The folder's meta.json when it is a complete prepared dataset of this format, else None."""
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    if not all((root / name).is_file() for name in ("images.npy", "split.npy", "labels.npy")):
        return None
    return meta


def _check_options(resolution: int, crop: str) -> None:
    if crop not in CROPS:
        raise UserError(f"unknown crop {crop!r}; use one of {', '.join(CROPS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 1:
        raise UserError(f"resolution must be a positive whole number of pixels, not {resolution!r}")


# --------------------------------------------------------------------------- decoding


def decode_image(record: Record, resolution: int, crop: str) -> np.ndarray | None:
    """One record as a (resolution, resolution, 3) uint8 array; None when it cannot be decoded."""
    try:
        with record.open() as image:
            # Let JPEG decode directly at a reduced scale, keeping at least twice the target size.
            image.draft(None, (2 * resolution, 2 * resolution))
            ImageOps.exif_transpose(image, in_place=True)
            rgb = image.convert("RGB")
        box = _crop_box(rgb.size) if crop == "center" else None
        resized = rgb.resize(
            (resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0
        )
        return np.asarray(resized, dtype=np.uint8)
    except DECODE_ERRORS:
        return None


def _crop_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred square of an image of ``size`` (width, height)."""
    width, height = size
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return (left, top, left + side, top + side)


def _decode_in_order(
    records: Iterator[Record], resolution: int, crop: str
) -> Iterator[tuple[Record, np.ndarray | None]]:
    """Decode records on a thread pool (Pillow releases the GIL), yielding them in input order.

    One thread per core, at most 8: on two cores this halves the time for 448px FairFace JPEGs
    and costs nothing for small ones.
    """
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            chunk = list(islice(records, CHUNK_SIZE))
            if not chunk:
                return
            decoded = pool.map(lambda record: decode_image(record, resolution, crop), chunk)
            yield from zip(chunk, decoded)


# --------------------------------------------------------------------------- building the folder


def _encode_labels(
    record: Record, attributes: list[str], lookup: dict[str, dict[str, int]]
) -> list[int]:
    """Class indices of a record's labels; -1 for unknown or out-of-vocabulary values."""
    return [lookup[name].get(record.labels.get(name) or "", -1) for name in attributes]


def _build(
    resolved: Source, source: str, resolution: int, crop: str, folder: Path, progress: bool
) -> None:
    """Decode every record of ``resolved`` and write the four files into ``folder``."""
    capacity = len(resolved)
    images = np.lib.format.open_memmap(
        folder / "images.npy", mode="w+", dtype=np.uint8, shape=(capacity, resolution, resolution, 3)
    )
    lookup = {
        name: {value: index for index, value in enumerate(resolved.vocab[name])}
        for name in resolved.attributes
    }
    splits: list[int] = []
    labels: list[list[int]] = []
    skipped: list[str] = []
    bar = tqdm(
        total=capacity,
        desc=f"preparing {resolution}px images",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for record, pixels in _decode_in_order(iter(resolved), resolution, crop):
            bar.update(1)
            if pixels is None:
                skipped.append(record.name)
                continue
            images[len(splits)] = pixels
            splits.append(SPLIT_CODES[record.split])
            labels.append(_encode_labels(record, resolved.attributes, lookup))
    images.flush()
    del images

    count = len(splits)
    if skipped:
        examples = ", ".join(skipped[:3])
        logger.warning(
            "skipped %s unreadable or corrupt image(s) of %s, e.g. %s",
            f"{len(skipped):,}",
            resolved.description,
            examples,
        )
    if count == 0:
        raise UserError(
            f"{resolved.description}: no usable image ({len(skipped):,} could not be decoded); "
            "check that the files are JPEG, PNG, WebP or BMP images"
        )
    if count < capacity:
        _shrink_images(folder / "images.npy", count)

    split_array = np.asarray(splits, dtype=np.uint8)
    np.save(folder / "split.npy", split_array)
    label_array = np.asarray(labels, dtype=np.int16).reshape(count, len(resolved.attributes))
    np.save(folder / "labels.npy", label_array)
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "source_identity": resolved.identity,
        "source_kind": resolved.kind,
        "resolution": resolution,
        "crop": crop,
        "attributes": list(resolved.attributes),
        "vocab": {name: list(values) for name, values in resolved.vocab.items()},
        "counts": {
            "n_images": count,
            "n_train": int((split_array == SPLIT_CODES["train"]).sum()),
            "n_val": int((split_array == SPLIT_CODES["val"]).sum()),
            "skipped_corrupt": len(skipped),
            "missing_listed": resolved.missing_listed,
        },
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _shrink_images(path: Path, count: int) -> None:
    """Rewrite an images.npy keeping only its first ``count`` rows, copying in chunks."""
    full = np.load(path, mmap_mode="r")
    smaller_path = path.with_name("images.shrinking.npy")
    smaller = np.lib.format.open_memmap(
        smaller_path, mode="w+", dtype=np.uint8, shape=(count, *full.shape[1:])
    )
    for start in range(0, count, 4096):
        stop = min(start + 4096, count)
        smaller[start:stop] = full[start:stop]
    smaller.flush()
    del smaller, full
    os.replace(smaller_path, path)


def _move_into_place(building: Path, final: Path) -> None:
    """Rename the finished folder to its final name, replacing an outdated one.

    When another process finished the same folder first, its copy is kept.
    """
    if final.exists() and read_meta(final) is None:
        outdated = final.with_name(f".{final.name}.outdated-{os.getpid()}")
        os.replace(final, outdated)
        shutil.rmtree(outdated, ignore_errors=True)
    try:
        os.rename(building, final)
    except OSError:
        if read_meta(final) is None:
            raise
