"""Hugging Face datasets as sources: the hub (``hf:HuggingFaceM4/FairFace``, through ``datasets``) and
local ``.parquet`` files with the hub's columns (``image`` and class-id ``age``/``gender``/``race``, read
with pyarrow batch by batch).

Both give a :class:`~ddpm_faces.data.records.Source` whose records hold the undecoded image bytes (or a
cached path); class names come from the ClassLabel features that ``datasets`` stores, with FairFace's
names as the fallback. :func:`ddpm_faces.data.sources.resolve_source` picks these for ``hf:`` strings
and parquet paths.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError
from .records import (
    ATTRIBUTES,
    FAIRFACE_CLASSES,
    HF_INSTALL_HINT,
    HF_PREFIX,
    HUB_SPLITS,
    Record,
    Source,
    clean_value,
    find_parquet_files,
)


def _split_from_name(relative_path: str) -> str:
    """"val" when a path's words include val/valid/validation, else "train"."""
    words = set(re.split(r"[^a-z0-9]+", relative_path.lower()))
    return "val" if words & {"val", "valid", "validation"} else "train"


def _select_config(files: list[Path], root: Path, hf_config: str) -> list[Path]:
    """Keep only the files under a folder named like the configuration, when there is one."""
    chosen = [path for path in files if hf_config in path.relative_to(root).parts[:-1]]
    return chosen or files


def _class_names_from_features(features: dict[str, Any], attribute: str) -> list[str] | None:
    """Class names of a ClassLabel feature written as JSON by ``datasets``, if any."""
    feature = features.get(attribute)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return [str(name) for name in feature["names"]]
    return None


def _parquet_class_names(schema_metadata: dict[bytes, bytes] | None) -> dict[str, list[str]]:
    """ClassLabel names stored by ``datasets`` in a parquet file's schema metadata."""
    if not schema_metadata or b"huggingface" not in schema_metadata:
        return {}
    try:
        info = json.loads(schema_metadata[b"huggingface"])
    except ValueError:
        return {}
    features = info.get("info", {}).get("features", {})
    if not isinstance(features, dict):
        return {}
    names = {}
    for attribute in ATTRIBUTES:
        found = _class_names_from_features(features, attribute)
        if found:
            names[attribute] = found
    return names


def _label_name(value: Any, names: list[str]) -> str | None:
    """A class id (or a string label) as a class name; None when unknown."""
    if value is None:
        return None
    if isinstance(value, str):
        return clean_value(value)
    index = int(value)
    return names[index] if 0 <= index < len(names) else None


def _image_payload(image: Any) -> tuple[bytes | None, str | None]:
    """The (bytes, path) of a datasets Image cell (a dict) or of raw bytes."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), None
    if isinstance(image, dict):
        return image.get("bytes"), image.get("path")
    return None, None


def _row_record(
    row: dict[str, Any],
    split: str,
    fallback_name: str,
    vocab: dict[str, list[str]],
    base: Path | None,
) -> Record:
    """A record from one dataset row with an ``image`` column and class-id label columns."""
    data, image_path = _image_payload(row.get("image"))
    labels = {attribute: _label_name(row.get(attribute), names) for attribute, names in vocab.items()}
    path = None
    if data is None and image_path:
        path = Path(image_path)
        if not path.is_absolute() and base is not None:
            path = base / path
    name = f"{fallback_name} ({image_path})" if image_path else fallback_name
    return Record(name=name, split=split, labels=labels, path=path, data=data)


def _import_pyarrow_parquet(location: Path) -> Any:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise UserError(f"{location}: reading parquet files needs pyarrow; {HF_INSTALL_HINT}") from None
    return parquet


def parquet_source(location: Path, hf_config: str, identity: str) -> Source:
    """Local parquet file(s) with the hub's columns, read with pyarrow batch by batch."""
    parquet = _import_pyarrow_parquet(location)
    if location.is_file():
        base = location.parent
        files = [location]
    else:
        base = location
        files = _select_config(find_parquet_files(location), location, hf_config)

    plan: list[tuple[Path, str, int]] = []
    columns_seen: set[str] = set()
    class_names: dict[str, list[str]] = {}
    for path in files:
        try:
            handle = parquet.ParquetFile(path)
            metadata = handle.schema_arrow
            rows = handle.metadata.num_rows
        except Exception as error:  # pyarrow raises several error types for damaged files
            raise UserError(f"{path}: not a readable parquet file ({error}); re-download it") from None
        if "image" not in metadata.names:
            raise UserError(
                f"{path}: missing column image (found: {', '.join(metadata.names)}); "
                "use parquet files with the Hugging Face FairFace columns image, age, gender, race"
            )
        columns_seen.update(metadata.names)
        for attribute, names in _parquet_class_names(metadata.metadata).items():
            class_names.setdefault(attribute, names)
        plan.append((path, _split_from_name(path.relative_to(base).as_posix()), rows))

    attributes = [attribute for attribute in ATTRIBUTES if attribute in columns_seen]
    vocab = {
        attribute: class_names.get(attribute, list(FAIRFACE_CLASSES[attribute])) for attribute in attributes
    }
    total = sum(rows for _, _, rows in plan)
    if total == 0:
        raise UserError(
            f"{location}: no rows in the parquet file(s); point at the files that hold the images"
        )

    def records() -> Iterator[Record]:
        for path, split, _ in plan:
            handle = parquet.ParquetFile(path)
            wanted = [name for name in ("image", *attributes) if name in handle.schema_arrow.names]
            row_number = 0
            for batch in handle.iter_batches(batch_size=256, columns=wanted):
                for row in batch.to_pylist():
                    name = f"{path.relative_to(base).as_posix()}#{row_number}"
                    yield _row_record(row, split, name, vocab, path.parent)
                    row_number += 1

    return Source(
        kind="parquet",
        identity=identity,
        description=f"parquet {location}",
        attributes=attributes,
        vocab=vocab,
        num_records=total,
        make_records=records,
    )


def _import_datasets(source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{source}: loading from the Hugging Face hub needs `datasets`; {HF_INSTALL_HINT}"
        ) from None
    return datasets


def huggingface_source(name: str, hf_config: str, identity: str) -> Source:
    """A hub dataset through ``datasets``, with images left undecoded (bytes or cached paths)."""
    source = f"{HF_PREFIX}{name}"
    datasets = _import_datasets(source)
    try:
        loaded = datasets.load_dataset(name, hf_config or None)
    except Exception as error:  # the hub client raises many error types (network, auth, name)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{source} (config {hf_config}): could not load from the hub ({message}); check the name and "
            "the network, or download the parquet files and pass their folder"
        ) from None

    splits = [(key, HUB_SPLITS[key]) for key in loaded if key in HUB_SPLITS]
    if not splits:
        raise UserError(
            f"{source}: no train or validation split (found: {', '.join(loaded)}); use another dataset"
        )
    first = loaded[splits[0][0]]
    if "image" not in first.column_names:
        found = ", ".join(first.column_names)
        raise UserError(f"{source}: missing column image (found: {found}); use another dataset")
    attributes = [attribute for attribute in ATTRIBUTES if attribute in first.column_names]
    vocab = {}
    for attribute in attributes:
        feature = first.features[attribute]
        names = getattr(feature, "names", None)
        vocab[attribute] = list(names) if names else list(FAIRFACE_CLASSES[attribute])
    undecoded = datasets.Image(decode=False)
    parts = [(loaded[key].cast_column("image", undecoded), split) for key, split in splits]
    total = sum(len(part) for part, _ in parts)

    def records() -> Iterator[Record]:
        for part, split in parts:
            for index, row in enumerate(part):
                yield _row_record(row, split, f"{split}#{index}", vocab, None)

    return Source(
        kind="huggingface",
        identity=identity,
        description=f"{source} ({hf_config})",
        attributes=attributes,
        vocab=vocab,
        num_records=total,
        make_records=records,
    )
