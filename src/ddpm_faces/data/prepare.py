"""Decode a source's images once into a cached uint8 array on disk.

A prepared dataset is a folder::

    <cache_dir>/<name>-<hash>-r<resolution>-<crop>/
        images.npy   (N, H, W, 3) uint8, opened memory-mapped
        split.npy    (N,) uint8, 0 = train, 1 = val
        labels.npy   (N, n_attributes) int16, class index into the vocabulary, -1 = unknown
        meta.json    source, resolution, crop, attributes, vocab, counts, format version

The folder is built under a hidden name beside it (``.<name>.building-<pid>-<host>-<token>``) and
renamed into place when complete, so a folder with the final name is always whole; half-built folders
whose builder has died are removed by the next preparation. A second call with the same source,
resolution and crop reuses the folder without decoding anything, after checking its files against
meta.json (a damaged folder is prepared again). The free disk space is checked, and the images' blocks
reserved, before anything is decoded, so a full disk is a one-line error rather than a crash.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import socket
import struct
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from ..errors import CACHE_ELSEWHERE, CacheError, UserError
from ..io import process_alive
from .records import Record, Source
from .sources import resolve_source, source_identity

logger = logging.getLogger("ddpm_faces.data")

FORMAT_VERSION = 1
CROPS = ("center", "none")
SPLIT_CODES = {"train": 0, "val": 1}
CACHE_ENV = "DDPM_FACES_CACHE"
CHUNK_SIZE = 256
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What Pillow raises for unreadable, corrupt, truncated or non-image files."""
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Pillow modes of 16-bit (and 32-bit integer) greyscale images, scaled to 8 bits by value / 257."""
SPACE_MARGIN = 1 << 20
"""Free bytes kept beyond the arrays' own size (meta.json, file-system overhead)."""
WORK_FOLDER = re.compile(
    r"^\.(?P<name>.+)\.(?:building|outdated)-(?P<pid>\d+)(?:-(?P<host>[A-Za-z0-9._]+))?-[0-9a-f]{8}$"
)
"""Hidden folders a preparation works in: ``.<name>.building-<pid>-<host>-<token>`` (and
``.outdated-`` for a replaced folder being deleted)."""
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class CacheDamage(Exception):
    """A prepared dataset folder whose files do not match its meta.json (the message says how)."""


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
        """Open a prepared dataset folder (images stay on disk, memory-mapped).

        Its files are checked against its meta.json first; a folder that does not match is a
        :class:`UserError` that says what is wrong.
        """
        root = Path(root)
        try:
            return open_prepared(root)
        except CacheDamage as damage:
            raise UserError(
                f"{root}: not a usable prepared dataset of format {FORMAT_VERSION} ({damage}); "
                "delete the folder and prepare the data again"
            ) from None

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
    data = _reuse(final, {"source_identity": identity, "resolution": resolution, "crop": crop})
    if data is not None:
        return data

    resolved = resolve_source(source, hf_config=hf_config)
    building = _start_building(final)
    try:
        _build(resolved, source, resolution, crop, building, progress)
        _move_into_place(building, final)
    except OSError as error:
        raise_for_cache(final.parent, error)
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
    # surrogateescape: a source path whose bytes are not UTF-8 still hashes to the same name
    digest = hashlib.sha1(identity.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{readable[:40]}-{digest}-r{resolution}-{crop}"


def read_meta(root: Path) -> dict[str, Any] | None:
    """The folder's meta.json when it is a whole prepared dataset of this format, else None."""
    try:
        return open_prepared(root).meta
    except CacheDamage:
        return None


def _check_options(resolution: int, crop: str) -> None:
    if crop not in CROPS:
        raise UserError(f"unknown crop {crop!r}; use one of {', '.join(CROPS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 1:
        raise UserError(f"resolution must be a positive whole number of pixels, not {resolution!r}")


def _reuse(final: Path, expected: dict[str, Any]) -> PreparedData | None:
    """The prepared folder when it is whole and matches ``expected``; None when it must be built.

    A folder that exists but cannot be used is reported in one log line (it is replaced later).
    """
    if not final.exists():
        return None
    try:
        data = open_prepared(final, expected)
    except CacheDamage as damage:
        logger.warning("prepared data %s cannot be used (%s); preparing it again", final, damage)
        return None
    logger.info("using prepared data %s (%s images)", final, f"{len(data):,}")
    return data


# --------------------------------------------------------------------------- checking a folder


def open_prepared(root: Path, expected: dict[str, Any] | None = None) -> PreparedData:
    """Open a prepared folder after checking its files; :class:`CacheDamage` when they do not match.

    meta.json must be of this format (with the ``expected`` values, when given); images.npy must
    have a valid header for uint8 (count, resolution, resolution, 3) and exactly the bytes that
    needs; split.npy and labels.npy must have the shapes, types and value ranges meta.json implies.
    Nothing is ever unpickled.
    """
    meta = _read_meta_file(root / "meta.json")
    _check_meta(meta, expected or {})
    count, size = meta["counts"]["n_images"], meta["resolution"]
    images = _open_images(root / "images.npy", (count, size, size, 3))
    split = _load_small(root / "split.npy", (count,), np.uint8)
    if not np.isin(split, list(SPLIT_CODES.values())).all():
        raise CacheDamage("split.npy holds codes other than 0 (train) and 1 (val)")
    labels = _load_small(root / "labels.npy", (count, len(meta["attributes"])), np.int16)
    _check_labels(labels, [len(meta["vocab"][name]) for name in meta["attributes"]])
    return PreparedData(
        root=root,
        images=images,
        split=split,
        labels=labels,
        attributes=list(meta["attributes"]),
        vocab={name: list(values) for name, values in meta["vocab"].items()},
        meta=meta,
        resolution=int(size),
    )


def _read_meta_file(path: Path) -> dict[str, Any]:
    """meta.json as a dict of this format version."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheDamage("meta.json is missing") from None
    except (OSError, ValueError) as error:
        raise CacheDamage(f"meta.json cannot be read: {error}") from None
    if not isinstance(meta, dict):
        raise CacheDamage("meta.json is not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheDamage(f"meta.json is of format {meta.get('format_version')!r}, not {FORMAT_VERSION}")
    return meta


def _check_meta(meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """meta.json holds a positive count and resolution, a vocabulary per attribute, and ``expected``."""
    count = size = None
    try:
        count, size = meta["counts"]["n_images"], meta["resolution"]
        vocab_ok = isinstance(meta["vocab"], dict) and isinstance(meta["attributes"], list) and all(
            isinstance(meta["vocab"][name], list) for name in meta["attributes"]
        )
    except (KeyError, TypeError):
        vocab_ok = False
    if not (vocab_ok and _positive_int(count) and _positive_int(size)):
        raise CacheDamage("meta.json lacks or garbles counts.n_images, resolution, attributes or vocab")
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CacheDamage(f"meta.json says {key} {meta.get(key)!r}, not {value!r}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _open_images(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """images.npy memory-mapped, after checking its header and its exact size on disk."""
    found_shape, dtype, offset = _npy_header(path)
    if found_shape != shape or dtype != np.uint8:
        raise CacheDamage(f"{path.name} holds {dtype} {found_shape}, not uint8 {shape}")
    expected = offset + math.prod(shape)
    actual = path.stat().st_size
    if actual != expected:
        raise CacheDamage(f"{path.name} is {actual:,} bytes, not {expected:,} (truncated or overwritten)")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header; Fortran order counts as damage."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in readers:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = readers[version](handle)
            offset = handle.tell()
    except FileNotFoundError:
        raise CacheDamage(f"{path.name} is missing") from None
    except (OSError, ValueError, EOFError, SyntaxError) as error:
        raise CacheDamage(f"{path.name} has no valid .npy header ({error})") from None
    if fortran:
        raise CacheDamage(f"{path.name} is in Fortran order")
    return tuple(shape), dtype, offset


def _load_small(path: Path, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A small .npy read whole (``allow_pickle=False``), checked for its shape and type."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CacheDamage(f"{path.name} is missing") from None
    except (OSError, ValueError, EOFError) as error:
        raise CacheDamage(f"{path.name} cannot be read ({error})") from None
    if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
        found = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise CacheDamage(f"{path.name} holds {found}, not {np.dtype(dtype)} {shape}")
    return array


def _check_labels(labels: np.ndarray, sizes: list[int]) -> None:
    """Every label is -1 (unknown) or an index into its attribute's vocabulary."""
    if labels.size and ((labels < -1) | (labels >= np.asarray(sizes, dtype=np.int64))).any():
        raise CacheDamage("labels.npy holds class indices outside the vocabulary")


# --------------------------------------------------------------------------- decoding


def decode_image(record: Record, resolution: int, crop: str) -> np.ndarray | None:
    """One record as a (resolution, resolution, 3) uint8 array; None when it cannot be decoded."""
    try:
        with record.open() as image:
            # Let JPEG decode directly at a reduced scale, keeping at least twice the target size.
            image.draft(None, (2 * resolution, 2 * resolution))
            ImageOps.exif_transpose(image, in_place=True)
            rgb = to_rgb(image)
        box = _crop_box(rgb.size) if crop == "center" else None
        resized = rgb.resize(
            (resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0
        )
        return np.asarray(resized, dtype=np.uint8)
    except DECODE_ERRORS:
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of any Pillow image.

    16-bit greyscale (and 32-bit integer) images are scaled to 8 bits as value / 257, rounded;
    Pillow's own conversion would clip them at 255 and turn most of the picture white.
    """
    if image.mode not in WIDE_GREY_MODES:
        return image.convert("RGB")
    values = np.asarray(image).astype(np.float64)
    grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


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
    path = folder / "images.npy"
    images = _create_images(path, len(resolved), resolution, len(resolved.attributes))
    splits, labels, skipped = _fill_images(images, resolved, resolution, crop, progress)
    images.flush()
    del images

    count = len(splits)
    _report_skipped(resolved, skipped, count)
    if count < len(resolved):
        _shrink_images(path, count)
    split_array = np.asarray(splits, dtype=np.uint8)
    np.save(folder / "split.npy", split_array, allow_pickle=False)
    label_array = np.asarray(labels, dtype=np.int16).reshape(count, len(resolved.attributes))
    np.save(folder / "labels.npy", label_array, allow_pickle=False)
    _write_meta(folder / "meta.json", resolved, source, resolution, crop, split_array, len(skipped))


def _fill_images(
    images: np.ndarray, resolved: Source, resolution: int, crop: str, progress: bool
) -> tuple[list[int], list[list[int]], list[str]]:
    """Decode the records into consecutive rows of ``images``: (split codes, labels, skipped names)."""
    lookup = {
        name: {value: index for index, value in enumerate(resolved.vocab[name])}
        for name in resolved.attributes
    }
    splits: list[int] = []
    labels: list[list[int]] = []
    skipped: list[str] = []
    bar = tqdm(
        total=len(resolved),
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
    return splits, labels, skipped


def _report_skipped(resolved: Source, skipped: list[str], count: int) -> None:
    """One warning for the images that could not be decoded; UserError when none could."""
    if skipped:
        logger.warning(
            "skipped %s unreadable or corrupt image(s) of %s, e.g. %s",
            f"{len(skipped):,}",
            resolved.description,
            ", ".join(skipped[:3]),
        )
    if count == 0:
        raise UserError(
            f"{resolved.description}: no usable image ({len(skipped):,} could not be decoded); "
            "check that the files are JPEG, PNG, WebP or BMP images"
        )


def _write_meta(
    path: Path, resolved: Source, source: str, resolution: int, crop: str, split: np.ndarray, skipped: int
) -> None:
    """meta.json: what was prepared, from what, and the counts the ``data`` command prints."""
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
            "n_images": int(split.size),
            "n_train": int((split == SPLIT_CODES["train"]).sum()),
            "n_val": int((split == SPLIT_CODES["val"]).sum()),
            "skipped_corrupt": skipped,
            "skipped_non_utf8_names": resolved.skipped_names,
            "missing_listed": resolved.missing_listed,
        },
    }
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- disk space and images.npy


def _create_images(path: Path, capacity: int, resolution: int, n_attributes: int) -> np.ndarray:
    """A writable memory-mapped (capacity, resolution, resolution, 3) uint8 images.npy.

    The free space is checked first and the file's blocks are reserved before the map is written:
    writing a map past the end of a full disk kills the process with a bus error instead of
    raising an error.
    """
    image_bytes = capacity * resolution * resolution * 3
    needed = image_bytes + capacity * (1 + 2 * n_attributes) + max(SPACE_MARGIN, image_bytes // 100)
    check_space(path.parent, needed, f"preparing {capacity:,} images at {resolution}px")
    return reserved_memmap(path, np.uint8, (capacity, resolution, resolution, 3))


def check_space(folder: Path, needed: int, what: str) -> None:
    """A one-line UserError when the disk under the cache folder `folder` has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise CacheError(
            f"not enough disk space for the data cache in {folder.parent}: {what} "
            f"needs about {_size(needed)}, {_size(free)} is free; "
            f"free some space or point {CACHE_ENV} (or data.cache_dir) at a larger disk", fix=CACHE_ELSEWHERE
        )


def reserved_memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A writable memory-mapped .npy file whose disk blocks are reserved before it is written (a full disk
    is then an OSError here, not a bus error while writing the map)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape, version=(1, 0))
    _reserve(path, path.stat().st_size)
    return array


def _reserve(path: Path, size: int) -> None:
    """Allocate the disk blocks of a sparse file now (ENOSPC here rather than a bus error later).

    File systems that cannot reserve blocks (and systems without posix_fallocate) are left as they are.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    handle = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(handle, 0, size)
    except OSError as error:
        if error.errno in FULL_DISK:
            raise
    finally:
        os.close(handle)


def _size(count: int) -> str:
    """A byte count for people: 1.5 MiB, 12.0 GiB."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{count:,} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _shrink_images(path: Path, count: int) -> None:
    """Keep only the first ``count`` rows of an images.npy, in place.

    The rows are contiguous, so the file is cut after row ``count`` and the header's shape is
    rewritten with the same length (spaces pad it): no copy, so no second copy's disk space.
    """
    with open(path, "r+b") as handle:
        if np.lib.format.read_magic(handle) != (1, 0):
            raise ValueError(f"{path}: expected a version 1.0 .npy header")
        shape, _, _ = np.lib.format.read_array_header_1_0(handle)
        offset = handle.tell()
        header = repr({"descr": "|u1", "fortran_order": False, "shape": (count, *shape[1:])})
        room = offset - 10  # magic (6), version (2) and header length (2) come first
        handle.seek(8)
        handle.write(struct.pack("<H", room) + (header.ljust(room - 1) + "\n").encode("latin1"))
        handle.truncate(offset + count * math.prod(shape[1:]))


# --------------------------------------------------------------------------- the hidden work folders


def _start_building(final: Path) -> Path:
    """Create the hidden folder to build ``final`` in, after removing those dead builders left."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_folders(final.parent)
        building = final.with_name(_work_name(final.name, "building"))
        building.mkdir()
    except OSError as error:
        raise CacheError(
            f"cannot write the data cache in {final.parent} ({error.strerror or error}); "
            f"point {CACHE_ENV} (or data.cache_dir) at a writable folder", fix=CACHE_ELSEWHERE
        ) from None
    return building


def _work_name(name: str, kind: str) -> str:
    """``.<name>.<kind>-<pid>-<host>-<token>``: whose process, on which machine, works in it."""
    return f".{name}.{kind}-{os.getpid()}-{_host()}-{uuid.uuid4().hex[:8]}"


def _host() -> str:
    """This machine's name as it appears in work folder names (no dashes)."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname())[:40].strip(".") or "host"


def remove_stale_folders(folder: Path) -> None:
    """Delete the hidden work folders under ``folder`` whose process, on this machine, has died.

    A preparation that was killed (out of memory, kill -9, a power cut) leaves its half-built
    folder behind, which can hold most of a disk. Folders of live processes, and of other
    machines sharing the cache, are left alone.
    """
    try:
        entries = [entry for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        pid = _dead_owner(entry.name)
        if pid is None:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.exists(entry.path):
            logger.info("removed %s, left by an interrupted preparation (process %d)", entry.path, pid)


def _dead_owner(name: str) -> int | None:
    """The pid in a work folder's name when that process of this machine is gone, else None."""
    match = WORK_FOLDER.match(name)
    if match is None or match["host"] not in (None, _host()):
        return None
    pid = int(match["pid"])
    return None if process_alive(pid) else pid


def raise_for_cache(folder: Path, error: OSError) -> NoReturn:
    """Re-raise a failed cache write as a one-line UserError: full disk, read-only or unwritable.

    Other errors (and permission errors outside the cache, e.g. reading the source) go on as they are.
    """
    inside = error.filename is not None and Path(os.fsdecode(error.filename)).is_relative_to(folder)
    if error.errno in FULL_DISK:
        raise CacheError(
            f"the disk of the data cache in {folder} is full ({_size(shutil.disk_usage(folder).free)} "
            f"free); free some space or point {CACHE_ENV} (or data.cache_dir) at a larger disk", fix=CACHE_ELSEWHERE
        ) from None
    if error.errno == errno.EROFS or (error.errno in READ_ONLY and inside):
        raise CacheError(
            f"cannot write the data cache in {folder} ({error.strerror}); "
            f"point {CACHE_ENV} (or data.cache_dir) at a writable folder", fix=CACHE_ELSEWHERE
        ) from None
    raise error


def _move_into_place(building: Path, final: Path) -> None:
    """Rename the finished folder to its final name, replacing an outdated one.

    When another process finished the same folder first, its copy is kept.
    """
    if final.exists() and read_meta(final) is None:
        outdated = final.with_name(_work_name(final.name, "outdated"))
        os.replace(final, outdated)
        shutil.rmtree(outdated, ignore_errors=True)
    try:
        os.rename(building, final)
    except OSError:
        if read_meta(final) is None:
            raise
