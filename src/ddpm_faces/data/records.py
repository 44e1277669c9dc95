"""What every data source is made of: records, the Source that lists them, and the constants and
helpers the readers share.

A :class:`Record` is one image of a source: its name, its split ("train" or "val"), its labels
(attribute -> class name, None when unknown) and where its bytes are (a path or the undecoded bytes
themselves); nothing is decoded until :meth:`Record.open`. The readers, the FairFace layout and the
image folder in :mod:`ddpm_faces.data.sources` and the hub/parquet reader in
:mod:`ddpm_faces.data.hub`, each build a :class:`Source` from such records. This module imports no
other data module, so both readers can depend on it without depending on each other.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

ATTRIBUTES = ("age", "gender", "race")
"""Label attributes a source may carry, in this order."""

FAIRFACE_CLASSES: dict[str, list[str]] = {
    "age": ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"],
    "gender": ["Male", "Female"],
    "race": [
        "East Asian",
        "Indian",
        "Black",
        "White",
        "Middle Eastern",
        "Latino_Hispanic",
        "Southeast Asian",
    ],
}
"""FairFace's class names, in the order of the hub dataset's class ids."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FAIRFACE_CSVS = {"train": "fairface_label_train.csv", "val": "fairface_label_val.csv"}
FOLDER_LABELS_CSV = "labels.csv"
HF_PREFIX = "hf:"
HF_INSTALL_HINT = 'pip install "ddpm-faces[hf]"'
VAL_FRACTION = 0.05
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val"}
HUB_SPLITS = {"train": "train", "validation": "val", "val": "val", "valid": "val"}


@dataclass(frozen=True)
class Record:
    """One image of a source: where its bytes are, which split it belongs to, and its labels."""

    name: str
    split: str
    labels: dict[str, str | None] = field(default_factory=dict)
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> Image.Image:
        """Open the image lazily with Pillow (raises OSError for unreadable files)."""
        if self.data is not None:
            return Image.open(io.BytesIO(self.data))
        if self.path is None:
            raise OSError(f"{self.name}: record has neither bytes nor a path")
        return Image.open(self.path)


@dataclass
class Source:
    """The records of one source, with the label attributes and their vocabularies."""

    kind: str
    identity: str
    description: str
    attributes: list[str]
    vocab: dict[str, list[str]]
    num_records: int
    make_records: Callable[[], Iterator[Record]]
    missing_listed: int = 0
    skipped_names: int = 0
    """Image files left out because their names are not valid UTF-8."""

    def __len__(self) -> int:
        return self.num_records

    def __iter__(self) -> Iterator[Record]:
        return self.make_records()


def clean_value(value: str | None) -> str | None:
    """Strip a CSV cell; empty means unknown (None)."""
    if value is None:
        return None
    value = value.strip()
    return value or None


def find_parquet_files(root: Path) -> list[Path]:
    """Every .parquet file under root, sorted."""
    return sorted(path for path in root.rglob("*.parquet") if path.is_file())
