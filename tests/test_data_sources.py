"""Sources (FairFace folder, parquet, image folder) and the prepared uint8 cache."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm_faces.data import PreparedData, prepare_dataset, resolve_source
from ddpm_faces.data import prepare as prepare_module
from ddpm_faces.data.sources import FAIRFACE_CLASSES, hash_split
from ddpm_faces.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

RED, GREEN, BLUE, YELLOW = (220, 20, 20), (20, 200, 40), (30, 40, 210), (230, 220, 30)


# --------------------------------------------------------------------------- helpers


def solid(color: tuple[int, int, int], size: tuple[int, int] = (12, 12)) -> Image.Image:
    return Image.new("RGB", size, color)


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ddpm_faces.data" and r.levelno == logging.WARNING]


def assert_close(pixels: np.ndarray, color: tuple[int, int, int], tolerance: int = 6) -> None:
    difference = np.abs(pixels.astype(int) - np.array(color)).max()
    assert difference <= tolerance, f"pixels differ from {color} by {difference}"


@pytest.fixture
def fairface_folder(tmp_path: Path) -> Path:
    """FairFace layout: the CSVs list 8 files, 3 of them are on disk."""
    root = tmp_path / "fairface"
    save(solid(RED), root / "train" / "1.jpg")
    save(solid(GREEN), root / "train" / "3.jpg")
    save(solid(BLUE), root / "val" / "2.jpg")
    header = ["file", "age", "gender", "race", "service_test"]
    write_csv(
        root / "fairface_label_train.csv",
        header,
        [
            ["train/1.jpg", "20-29", "Female", "East Asian", "True"],
            ["train/2.jpg", "3-9", "Male", "White", "False"],
            ["train/3.jpg", "more than 70", "Male", "Southeast Asian", "False"],
            ["train/4.jpg", "0-2", "Male", "Black", "True"],
            ["train/5.jpg", "0-2", "Female", "Black", "True"],
        ],
    )
    write_csv(
        root / "fairface_label_val.csv",
        header,
        [
            ["val/1.jpg", "10-19", "Female", "Indian", "False"],
            ["val/2.jpg", "50-59", "Female", "Latino_Hispanic", "False"],
            ["val/3.jpg", "30-39", "Male", "White", "False"],
        ],
    )
    return root


@pytest.fixture
def labelled_folder(tmp_path: Path) -> Path:
    """A folder of PNGs with labels.csv holding a split column and extra columns."""
    root = tmp_path / "faces"
    save(solid(RED), root / "a.png")
    save(solid(GREEN), root / "sub" / "b.png")
    save(solid(BLUE), root / "c.png")
    save(solid(YELLOW), root / "d.png")
    write_csv(
        root / "labels.csv",
        ["file", "source", "split", "age", "gender", "race", "age_years"],
        [
            ["a.png", "x", "train", "more than 70", "Male", "White", "80"],
            ["sub/b.png", "x", "validation", "3-9", "Female", "", "5"],
            ["c.png", "y", "val", "20-29", "", "Asian", "25"],
            ["d.png", "y", "train", "", "Female", "Black", ""],
            ["gone.png", "y", "train", "20-29", "Male", "Black", "22"],
        ],
    )
    return root


# --------------------------------------------------------------------------- FairFace folder


def test_fairface_layout_counts_missing_and_keeps_labels(fairface_folder: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="ddpm_faces.data")
    source = resolve_source(str(fairface_folder))

    assert source.kind == "fairface"
    records = {record.name: record for record in source}
    assert sorted(records) == ["train/1.jpg", "train/3.jpg", "val/2.jpg"]
    assert source.missing_listed == 5
    assert records["train/1.jpg"].labels == {"age": "20-29", "gender": "Female", "race": "East Asian"}
    assert records["train/3.jpg"].split == "train"
    assert records["val/2.jpg"].split == "val"
    assert records["val/2.jpg"].labels["race"] == "Latino_Hispanic"
    assert source.vocab == FAIRFACE_CLASSES

    messages = warnings_from(caplog)
    assert len(messages) == 1
    assert "5 of 8 listed images are missing" in messages[0]


def test_fairface_prepare_encodes_labels_and_splits(fairface_folder: Path, tmp_path: Path) -> None:
    data = prepare_dataset(str(fairface_folder), 8, cache_dir=tmp_path / "cache", progress=False)

    assert data.images.shape == (3, 8, 8, 3)
    assert data.attributes == ["age", "gender", "race"]
    assert data.split.tolist() == [0, 0, 1]
    # CSV order: train/1 (20-29, Female, East Asian), train/3, then val/2.
    assert data.labels[0].tolist() == [3, 1, 0]
    assert data.labels[1].tolist() == [8, 0, 6]
    assert data.labels[2].tolist() == [6, 1, 5]
    assert_close(data.images[0], RED)
    assert_close(data.images[2], BLUE)
    assert data.meta["counts"]["missing_listed"] == 5
    assert data.indices("train").tolist() == [0, 1]
    assert data.indices("val").tolist() == [2]


def test_fairface_csv_without_needed_columns(tmp_path: Path) -> None:
    root = tmp_path / "ff"
    save(solid(RED), root / "train" / "1.jpg")
    write_csv(root / "fairface_label_train.csv", ["file", "age", "gender"], [["train/1.jpg", "3-9", "Male"]])
    with pytest.raises(UserError) as error:
        resolve_source(str(root))
    message = str(error.value)
    assert "fairface_label_train.csv" in message and "race" in message


# --------------------------------------------------------------------------- parquet


def write_hub_parquet(path: Path, images: list[bytes], ages: list[int], genders: list[int], races: list[int]) -> Path:
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": data, "path": f"{index}.jpg"} for index, data in enumerate(images)], type=image_type
            ),
            "age": pa.array(ages, type=pa.int64()),
            "gender": pa.array(genders, type=pa.int64()),
            "race": pa.array(races, type=pa.int64()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    parquet.write_table(table, path)
    return path


def test_parquet_folder_maps_class_ids_and_decodes_pixels(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    write_hub_parquet(
        root / "0.25" / "train-00000-of-00001.parquet",
        [encode(solid(RED), "PNG"), encode(solid(GREEN), "JPEG")],
        ages=[0, 8],
        genders=[1, 0],
        races=[6, 2],
    )
    write_hub_parquet(
        root / "0.25" / "validation-00000-of-00001.parquet",
        [encode(solid(BLUE), "PNG")],
        ages=[4],
        genders=[0],
        races=[3],
    )
    # Another configuration beside it must not be mixed in.
    write_hub_parquet(root / "1.25" / "train-00000-of-00001.parquet", [encode(solid(YELLOW), "PNG")], [1], [1], [1])

    source = resolve_source(str(root), hf_config="0.25")
    records = list(source)
    assert source.kind == "parquet"
    assert [record.split for record in records] == ["train", "train", "val"]
    assert records[0].labels == {"age": "0-2", "gender": "Female", "race": "Southeast Asian"}
    assert records[1].labels == {"age": "more than 70", "gender": "Male", "race": "Black"}
    assert records[2].labels == {"age": "30-39", "gender": "Male", "race": "White"}

    data = prepare_dataset(str(root), 12, cache_dir=tmp_path / "cache", progress=False)
    assert data.images.shape == (3, 12, 12, 3)
    assert np.array_equal(data.images[0], np.broadcast_to(np.array(RED, dtype=np.uint8), (12, 12, 3)))
    assert_close(data.images[1], GREEN)
    assert np.array_equal(data.images[2], np.broadcast_to(np.array(BLUE, dtype=np.uint8), (12, 12, 3)))
    assert data.labels.tolist() == [[0, 1, 6], [8, 0, 2], [4, 0, 3]]
    assert data.indices("val").tolist() == [2]


def test_single_parquet_file(tmp_path: Path) -> None:
    path = write_hub_parquet(tmp_path / "faces.parquet", [encode(solid(RED), "PNG")], [2], [0], [1])
    source = resolve_source(str(path))
    (record,) = list(source)
    assert record.split == "train"
    assert record.labels == {"age": "10-19", "gender": "Male", "race": "Indian"}


def hub_like_dataset(gender_names: list[str]):
    """A DatasetDict with the hub's features: an Image column and ClassLabel attributes."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "age": datasets.ClassLabel(names=FAIRFACE_CLASSES["age"]),
            "gender": datasets.ClassLabel(names=gender_names),
            "race": datasets.ClassLabel(names=FAIRFACE_CLASSES["race"]),
        }
    )

    def split(colors, ages, genders, races):
        images = [{"bytes": encode(solid(color), "PNG"), "path": None} for color in colors]
        columns = {"image": images, "age": ages, "gender": genders, "race": races}
        return datasets.Dataset.from_dict(columns, features=features)

    return datasets.DatasetDict(
        {
            "train": split([RED, GREEN], [1, 2], [0, 1], [0, 3]),
            "validation": split([BLUE], [7], [1], [4]),
        }
    )


def test_hub_source_reads_class_labels(monkeypatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    loaded = hub_like_dataset(FAIRFACE_CLASSES["gender"])
    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        return loaded

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = resolve_source("hf:HuggingFaceM4/FairFace", hf_config="1.25")
    records = list(source)

    assert calls == [("HuggingFaceM4/FairFace", "1.25")]
    assert len(source) == 3
    assert [record.split for record in records] == ["train", "train", "val"]
    assert records[2].labels == {"age": "60-69", "gender": "Female", "race": "Middle Eastern"}
    data = prepare_dataset("hf:HuggingFaceM4/FairFace", 4, hf_config="1.25", cache_dir=tmp_path, progress=False)
    assert data.root.name.startswith("FairFace-") and data.meta["source"] == "hf:HuggingFaceM4/FairFace"
    assert_close(data.images[1], GREEN, tolerance=0)


def test_parquet_written_by_datasets_keeps_its_class_names(tmp_path: Path) -> None:
    loaded = hub_like_dataset(["woman", "man"])
    loaded["train"].to_parquet(str(tmp_path / "train.parquet"))
    source = resolve_source(str(tmp_path / "train.parquet"))
    assert source.vocab["gender"] == ["woman", "man"]
    assert [record.labels["gender"] for record in source] == ["woman", "man"]


def test_hub_source_without_datasets_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError) as error:
        resolve_source("hf:HuggingFaceM4/FairFace")
    assert 'pip install "ddpm-faces[hf]"' in str(error.value)


# --------------------------------------------------------------------------- image folder


def test_folder_with_labels_csv(labelled_folder: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="ddpm_faces.data")
    source = resolve_source(str(labelled_folder))
    records = {record.name: record for record in source}

    assert source.kind == "folder"
    assert source.attributes == ["age", "gender", "race"]
    assert sorted(records) == ["a.png", "c.png", "d.png", "sub/b.png"]
    assert records["sub/b.png"].split == "val"
    assert records["c.png"].split == "val"
    assert records["a.png"].split == "train"
    assert records["c.png"].labels == {"age": "20-29", "gender": None, "race": "Asian"}
    assert source.vocab["age"] == ["3-9", "20-29", "more than 70"]
    assert source.vocab["gender"] == ["Female", "Male"]
    assert source.vocab["race"] == ["Asian", "Black", "White"]
    assert any("1 of 5 listed images are missing" in message for message in warnings_from(caplog))

    data = prepare_dataset(str(labelled_folder), 6, cache_dir=labelled_folder.parent / "cache", progress=False)
    names = ["a.png", "c.png", "d.png", "sub/b.png"]
    assert data.split.tolist() == [0, 1, 0, 1]
    assert data.labels[names.index("c.png")].tolist() == [1, -1, 0]
    assert data.labels[names.index("d.png")].tolist() == [-1, 0, 1]


def test_folder_without_labels_uses_a_stable_hash_split(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    for index in range(40):
        save(solid(RED, (4, 4)), root / f"face_{index:03d}.png")
    (root / "notes.txt").write_text("not an image")

    first = [(record.name, record.split) for record in resolve_source(str(root))]
    second = [(record.name, record.split) for record in resolve_source(str(root))]
    assert first == second
    assert len(first) == 40
    splits = [split for _, split in first]
    assert 1 <= splits.count("val") <= 8  # these 40 names give 3 val images
    assert all(split == hash_split(name) for name, split in first)
    assert resolve_source(str(root)).attributes == []

    names = [f"person/{index}.jpg" for index in range(2000)]
    val_fraction = sum(hash_split(name) == "val" for name in names) / len(names)
    assert 0.03 < val_fraction < 0.07


def test_folder_labels_csv_without_file_column(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    save(solid(RED), root / "a.png")
    write_csv(root / "labels.csv", ["path", "age"], [["a.png", "3-9"]])
    with pytest.raises(UserError) as error:
        resolve_source(str(root))
    message = str(error.value)
    assert str(root / "labels.csv") in message and "file" in message


def test_corrupt_files_are_skipped_and_counted_once(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="ddpm_faces.data")
    root = tmp_path / "mixed"
    save(solid(GREEN), root / "good.png")
    (root / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole_jpeg = encode(Image.fromarray(noise), "JPEG")
    (root / "truncated.jpg").write_bytes(whole_jpeg[: len(whole_jpeg) // 2])
    (root / "notes.txt").write_text("listed as an image but it is text")
    write_csv(
        root / "labels.csv",
        ["file", "gender"],
        [["good.png", "Male"], ["random.jpg", "Male"], ["truncated.jpg", "Female"], ["notes.txt", "Female"]],
    )

    data = prepare_dataset(str(root), 8, cache_dir=tmp_path / "cache", progress=False)

    assert data.images.shape == (1, 8, 8, 3)
    assert_close(data.images[0], GREEN)
    assert data.labels.tolist() == [[data.vocab["gender"].index("Male")]]
    assert data.meta["counts"]["skipped_corrupt"] == 3
    skipped = [message for message in warnings_from(caplog) if "skipped" in message]
    assert len(skipped) == 1
    assert "3 unreadable" in skipped[0] and "random.jpg" in skipped[0]


# --------------------------------------------------------------------------- errors


def test_missing_path_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="nowhere"):
        resolve_source(str(missing))
    with pytest.raises(UserError, match="nowhere"):
        prepare_dataset(str(missing), 8, cache_dir=tmp_path / "cache", progress=False)


def test_empty_folder_is_a_user_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no faces here")
    with pytest.raises(UserError) as error:
        resolve_source(str(empty))
    assert str(empty) in str(error.value) and "no images" in str(error.value)


def test_only_corrupt_images_is_a_user_error(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="no usable image"):
        prepare_dataset(str(root), 8, cache_dir=tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_bad_options_are_user_errors(labelled_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="center, none"):
        prepare_dataset(str(labelled_folder), 8, crop="square", cache_dir=tmp_path / "cache")
    data = prepare_dataset(str(labelled_folder), 4, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(UserError, match="train, val, all"):
        data.indices("test")


# --------------------------------------------------------------------------- prepare and cache


def banded_image() -> Image.Image:
    """30x10: a red band, a green centre square, a blue band."""
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :10] = RED
    pixels[:, 10:20] = GREEN
    pixels[:, 20:] = BLUE
    return Image.fromarray(pixels)


def test_center_crop_removes_the_side_bands(tmp_path: Path) -> None:
    root = tmp_path / "wide"
    save(banded_image(), root / "wide.png")
    save(banded_image().convert("L"), root / "gray.png")

    data = prepare_dataset(str(root), 10, crop="center", cache_dir=tmp_path / "cache", progress=False)
    assert data.images.dtype == np.uint8
    assert data.images.shape == (2, 10, 10, 3)
    gray, wide = data.images[0], data.images[1]
    assert np.array_equal(wide, np.broadcast_to(np.array(GREEN, dtype=np.uint8), (10, 10, 3)))
    assert np.all(gray[..., 0] == gray[..., 1]) and np.all(gray[..., 1] == gray[..., 2])

    squashed = prepare_dataset(str(root), 6, crop="none", cache_dir=tmp_path / "cache", progress=False)
    left, right = squashed.images[1][:, 0], squashed.images[1][:, -1]
    assert_close(left, RED, tolerance=40)
    assert_close(right, BLUE, tolerance=40)


def test_cache_is_reused_without_decoding(labelled_folder: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    first = prepare_dataset(str(labelled_folder), 8, cache_dir=cache, progress=False)
    stamp = (first.root / "images.npy").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again instead of reusing the cache")

    monkeypatch.setattr(prepare_module, "decode_image", refuse)
    second = prepare_dataset(str(labelled_folder), 8, cache_dir=cache, progress=False)

    assert second.root == first.root
    assert (second.root / "images.npy").stat().st_mtime_ns == stamp
    assert np.array_equal(np.asarray(second.images), np.asarray(first.images))
    assert [path.name for path in cache.iterdir()] == [first.root.name]

    reopened = PreparedData.load(first.root)
    assert reopened.vocab == first.vocab and reopened.resolution == 8
    assert isinstance(reopened.images, np.memmap)


def test_cache_key_depends_on_resolution_and_crop(labelled_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    roots = {
        prepare_dataset(str(labelled_folder), 8, cache_dir=cache, progress=False).root,
        prepare_dataset(str(labelled_folder), 6, cache_dir=cache, progress=False).root,
        prepare_dataset(str(labelled_folder), 8, crop="none", cache_dir=cache, progress=False).root,
    }
    assert len(roots) == 3
    assert sorted(path.name for path in cache.iterdir()) == sorted(root.name for root in roots)
    meta = json.loads((next(iter(roots)) / "meta.json").read_text())
    assert meta["counts"]["n_images"] == 4 and meta["counts"]["n_train"] + meta["counts"]["n_val"] == 4


def test_outdated_cache_is_rebuilt(labelled_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = prepare_dataset(str(labelled_folder), 8, cache_dir=cache, progress=False)
    meta_path = first.root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = -1
    meta_path.write_text(json.dumps(meta))

    rebuilt = prepare_dataset(str(labelled_folder), 8, cache_dir=cache, progress=False)
    assert rebuilt.root == first.root
    assert rebuilt.meta["format_version"] == prepare_module.FORMAT_VERSION
    assert [path.name for path in cache.iterdir()] == [first.root.name]


def test_default_cache_dir_comes_from_the_environment(labelled_folder: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DDPM_FACES_CACHE", str(tmp_path / "env-cache"))
    data = prepare_dataset(str(labelled_folder), 4, progress=False)
    assert data.root.parent == tmp_path / "env-cache"


# --------------------------------------------------------------------------- shared real data


def test_shared_fairface_sample(tmp_path: Path, caplog) -> None:
    sample = SHARED_DATA / "fairface-sample"
    if not (sample / "fairface_label_train.csv").is_file():
        pytest.skip(f"{sample} is not available")
    caplog.set_level(logging.WARNING, logger="ddpm_faces.data")

    source = resolve_source(str(sample))
    assert len(source) == 300
    assert source.missing_listed > 90_000
    assert any("listed images are missing on disk" in message for message in warnings_from(caplog))

    data = prepare_dataset(str(sample), 16, cache_dir=tmp_path / "cache", progress=False)
    assert data.images.shape == (300, 16, 16, 3)
    assert len(data.indices("train")) == 300
    assert len(data.indices("val")) == 0
    assert (data.labels >= 0).all()


def test_a_changed_folder_is_prepared_again(tmp_path):
    import os
    import time

    from ddpm_faces.data import prepare_dataset

    folder = tmp_path / "grow"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    first = prepare_dataset(str(folder), 8, cache_dir=tmp_path / "cache", progress=False)
    assert prepare_dataset(str(folder), 8, cache_dir=tmp_path / "cache", progress=False).root == first.root
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(folder / "new.png")
    later = time.time() + 5
    os.utime(folder, (later, later))                 # coarse file-system clocks: make the change visible
    grown = prepare_dataset(str(folder), 8, cache_dir=tmp_path / "cache", progress=False)
    assert grown.root != first.root and len(grown) == 4 and grown.root.name.startswith("grow-")
