"""Enumerate face images and their labels from a source string.

A source is one of:

* a folder in FairFace's own release layout (``fairface_label_train.csv`` and/or
  ``fairface_label_val.csv`` next to ``train/`` and ``val/``);
* a Hugging Face dataset, either from the hub (``hf:HuggingFaceM4/FairFace``) or from local
  ``.parquet`` files (a single file or a folder of them) with the hub's columns (read by
  :mod:`ddpm_faces.data.hub`);
* any other folder of face images, optionally with a ``labels.csv``.

:func:`resolve_source` turns the string into a :class:`Source`, an iterable of :class:`Record`
objects that each know how to open their image, plus the label vocabulary of the source (both defined
in :mod:`ddpm_faces.data.records`).
Nothing is decoded here; :mod:`ddpm_faces.data.prepare` does that once and caches the result.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError
from .hub import huggingface_source, parquet_source
from .records import (
    ATTRIBUTES,
    FAIRFACE_CLASSES,
    FAIRFACE_CSVS,
    FOLDER_LABELS_CSV,
    HF_PREFIX,
    IMAGE_SUFFIXES,
    SPLIT_NAMES,
    VAL_FRACTION,
    Record,
    Source,
    clean_value,
    find_parquet_files,
)

__all__ = [
    "ATTRIBUTES",
    "FAIRFACE_CLASSES",
    "Record",
    "Source",
    "detect_source",
    "hash_split",
    "resolve_source",
    "source_identity",
]

logger = logging.getLogger("ddpm_faces.data")


# --------------------------------------------------------------------------- detection


def resolve_source(source: str, *, hf_config: str = "0.25") -> Source:
    """Pick the kind of source from the string and list its records.

    ``hf_config`` is the hub configuration (FairFace has "0.25" and "1.25"); for a local parquet
    folder that holds one subfolder per configuration, it picks that subfolder.
    """
    kind, location = detect_source(source)
    identity = _identity(kind, location, hf_config)
    if kind == "huggingface":
        return huggingface_source(location, hf_config, identity)
    if kind == "parquet":
        return parquet_source(Path(location), hf_config, identity)
    path = Path(location)
    if kind == "fairface":
        return _fairface_source(path, identity)
    return _folder_source(path, identity)


def detect_source(source: str) -> tuple[str, str]:
    """Return ``(kind, location)`` without reading any image.

    kind is "huggingface", "fairface", "parquet" or "folder"; location is the hub name or the
    absolute path.
    """
    if source.startswith(HF_PREFIX):
        name = source[len(HF_PREFIX) :].strip()
        if not name:
            raise UserError(f"{source!r}: no dataset name after 'hf:'; use e.g. hf:HuggingFaceM4/FairFace")
        return "huggingface", name
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"{path}: no such file or folder; pass a folder of face images, a FairFace folder, "
            "a .parquet file or hf:<dataset>"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "parquet", str(path)
        raise UserError(
            f"{path}: a file that is not .parquet; pass a folder of face images, a FairFace folder, "
            "a .parquet file or hf:<dataset>"
        )
    if any((path / name).is_file() for name in FAIRFACE_CSVS.values()):
        return "fairface", str(path)
    if not (path / FOLDER_LABELS_CSV).is_file() and find_parquet_files(path):
        return "parquet", str(path)
    return "folder", str(path)


def source_identity(source: str, hf_config: str = "0.25") -> str:
    """A string that names the source's data for cache keys: absolute path or hub name.

    The hub configuration is part of it for hub and parquet sources.
    """
    kind, location = detect_source(source)
    return _identity(kind, location, hf_config)


def _identity(kind: str, location: str, hf_config: str) -> str:
    if kind == "huggingface":
        return f"{HF_PREFIX}{location}@{hf_config}"
    if kind == "parquet":
        return f"{location}@{hf_config}#{_fingerprint(Path(location))}"
    return f"{location}#{_fingerprint(Path(location))}"


def _fingerprint(path: Path) -> str:
    """A cheap summary of a local source's state, so that a changed folder is prepared again: the
    modification times of the folder and its sub-folders (adding or removing a file changes them) and the
    size and time of its label and parquet files. Image edits in place are not noticed."""
    entries = [path, *(p for p in path.iterdir() if p.is_dir() or p.suffix.lower() in (".csv", ".parquet"))] \
        if path.is_dir() else [path]
    stats = sorted((str(p), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns) for p in entries)
    return hashlib.sha1(repr(stats).encode("utf-8")).hexdigest()[:10]


# --------------------------------------------------------------------------- shared helpers


def hash_split(relative_path: str, val_fraction: float = VAL_FRACTION) -> str:
    """Deterministic split from the SHA-1 of a relative path: about ``val_fraction`` is "val"."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()
    return "val" if int(digest[:8], 16) / 2**32 < val_fraction else "train"


def _normalise_relative(value: str) -> str:
    """A CSV ``file`` cell as a forward-slash relative path."""
    value = value.strip().replace("\\", "/")
    while value.startswith("./"):
        value = value[2:]
    return value


def _read_csv(path: Path, required: Iterable[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV into (columns, rows), raising UserError when required columns are missing."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path}: cannot read the CSV ({error}); fix or remove the file") from None
    missing = [name for name in required if name not in columns]
    if missing:
        found = ", ".join(columns) if columns else "none"
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {found}); "
            f"add a header line with {', '.join(required)}"
        )
    return columns, rows


def _listdir_files(folder: Path) -> set[str]:
    """Names of the plain files directly in a folder (empty when the folder is absent)."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _walk_files(root: Path) -> list[str]:
    """All files under root as sorted forward-slash relative paths.

    Hidden files and folders (names starting with ".", such as macOS "._x.jpg" companions) are left out.
    Paths whose bytes are not valid UTF-8 come back as Python does (undecodable bytes as surrogates);
    :func:`_split_odd_names` sets them apart.
    """
    found: list[str] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative_folder = Path(folder).relative_to(root)
        for name in files:
            if not name.startswith("."):
                found.append((relative_folder / name).as_posix())
    return sorted(found)


def _is_utf8(name: str) -> bool:
    """Whether a file name read from disk was valid UTF-8 (os gives undecodable bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split_odd_names(paths: list[str]) -> tuple[list[str], list[str]]:
    """(paths with valid UTF-8 names, image paths whose names are not valid UTF-8)."""
    good = [path for path in paths if _is_utf8(path)]
    odd = [path for path in paths if not _is_utf8(path) and _is_image_name(path)]
    return good, odd


def _warn_odd_names(root: Path, odd: list[str]) -> None:
    """One warning for the image files skipped because their names are not valid UTF-8."""
    if odd:
        shown = ", ".join(os.fsencode(name).decode("utf-8", "backslashreplace") for name in odd[:3])
        logger.warning(
            "%s: skipped %s image file(s) whose names are not valid UTF-8, e.g. %s; rename them to use them",
            root,
            f"{len(odd):,}",
            shown,
        )


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _folder_vocab(values: Iterable[str | None], attribute: str) -> list[str]:
    """Sorted distinct values; ages that are FairFace bins keep FairFace's order, first."""
    seen = {value for value in values if value is not None}
    if attribute == "age":
        bins = [value for value in FAIRFACE_CLASSES["age"] if value in seen]
        return bins + sorted(seen - set(bins))
    return sorted(seen)


def _warn_missing(label: str, missing: int, listed: int, present: int) -> None:
    if missing:
        logger.warning(
            "%s: %s of %s listed images are missing on disk (a partial download?); using the %s present",
            label,
            f"{missing:,}",
            f"{listed:,}",
            f"{present:,}",
        )


# --------------------------------------------------------------------------- FairFace folder


def _fairface_source(root: Path, identity: str) -> Source:
    """FairFace's release layout: the CSVs list the files; the CSV a row is in gives its split."""
    records: list[Record] = []
    listed = 0
    folder_listings: dict[str, set[str]] = {}
    seen_files: set[str] = set()
    for split, csv_name in FAIRFACE_CSVS.items():
        csv_path = root / csv_name
        if not csv_path.is_file():
            continue
        _, rows = _read_csv(csv_path, ("file", *ATTRIBUTES))
        for row in rows:
            relative = _normalise_relative(row["file"] or "")
            if not relative or relative in seen_files:
                continue
            seen_files.add(relative)
            listed += 1
            parent, _, name = relative.rpartition("/")
            if parent not in folder_listings:
                folder_listings[parent] = _listdir_files(root / parent)
            if name not in folder_listings[parent]:
                continue
            labels = {attribute: clean_value(row[attribute]) for attribute in ATTRIBUTES}
            records.append(Record(name=relative, split=split, labels=labels, path=root / relative))
    if not records:
        raise UserError(
            f"{root}: none of the {listed:,} images listed in the FairFace CSVs is on disk; "
            "put the images in train/ and val/ next to the CSVs"
        )
    missing = listed - len(records)
    _warn_missing("fairface", missing, listed, len(records))
    return Source(
        kind="fairface",
        identity=identity,
        description=f"FairFace folder {root}",
        attributes=list(ATTRIBUTES),
        vocab={attribute: list(FAIRFACE_CLASSES[attribute]) for attribute in ATTRIBUTES},
        num_records=len(records),
        make_records=lambda: iter(records),
        missing_listed=missing,
    )


# --------------------------------------------------------------------------- image folder


def _parse_split(value: str | None, csv_path: Path, relative: str) -> str | None:
    """A ``split`` cell as "train"/"val", None when empty; UserError for anything else."""
    value = clean_value(value)
    if value is None:
        return None
    split = SPLIT_NAMES.get(value.lower())
    if split is None:
        raise UserError(
            f"{csv_path}: split {value!r} for {relative}; use train or val (or validation), "
            "or leave it empty"
        )
    return split


def _folder_source(root: Path, identity: str) -> Source:
    """A folder of images; ``labels.csv`` (if any) adds labels and an optional split column.

    Images are the image files on disk plus any other file that labels.csv lists explicitly.
    Without a split for an image, a hash of its relative path decides it.
    """
    all_files, odd_names = _split_odd_names(_walk_files(root))
    _warn_odd_names(root, odd_names)
    on_disk = set(all_files)
    labels_by_file: dict[str, dict[str, str | None]] = {}
    split_by_file: dict[str, str | None] = {}
    attributes: list[str] = []
    missing = 0
    csv_path = root / FOLDER_LABELS_CSV
    if csv_path.is_file():
        columns, rows = _read_csv(csv_path, ("file",))
        attributes = [attribute for attribute in ATTRIBUTES if attribute in columns]
        has_split = "split" in columns
        for row in rows:
            relative = _normalise_relative(row["file"] or "")
            if not relative:
                continue
            if relative not in on_disk:
                missing += 1
                continue
            labels_by_file[relative] = {attribute: clean_value(row[attribute]) for attribute in attributes}
            split_by_file[relative] = _parse_split(row["split"], csv_path, relative) if has_split else None
        _warn_missing(str(csv_path), missing, missing + len(labels_by_file), len(labels_by_file))

    names = sorted({name for name in all_files if _is_image_name(name)} | set(labels_by_file))
    if not names:
        raise UserError(
            f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in all subfolders); "
            "point the data source at a folder of face images"
        )
    records = []
    for relative in names:
        labels = labels_by_file.get(relative, {attribute: None for attribute in attributes})
        split = split_by_file.get(relative) or hash_split(relative)
        records.append(Record(name=relative, split=split, labels=labels, path=root / relative))
    vocab = {
        attribute: _folder_vocab((record.labels[attribute] for record in records), attribute)
        for attribute in attributes
    }
    return Source(
        kind="folder",
        identity=identity,
        description=f"image folder {root}",
        attributes=attributes,
        vocab=vocab,
        num_records=len(records),
        make_records=lambda: iter(records),
        missing_listed=missing,
        skipped_names=len(odd_names),
    )
