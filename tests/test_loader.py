"""BatchLoader over a prepared dataset: epoch coverage and order, value range, augmentation, exact resume,
sharding across ranks, and labels aligned with their images."""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from ddpm_faces.data.loader import BatchLoader
from ddpm_faces.data.prepare import prepare_dataset
from ddpm_faces.errors import UserError


@pytest.fixture(scope="module")
def data(face_folder, tmp_path_factory):
    return prepare_dataset(str(face_folder), 16, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def ref(data):
    """Every prepared image converted by hand: uint8 HWC -> float32 CHW, x / 127.5 - 1."""
    x = np.asarray(data.images).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def identify(images: torch.Tensor, ref: torch.Tensor) -> list[int]:
    """The row of the prepared data that each (un-augmented) image is, by exact pixel match."""
    rows = []
    for image in images:
        matches = torch.nonzero((ref == image).flatten(1).all(1)).flatten().tolist()
        assert len(matches) == 1, matches
        rows.append(matches[0])
    return rows


def epoch_batches(loader: BatchLoader, ref, n=None) -> list[tuple[int, ...]]:
    return [tuple(identify(b["images"], ref)) for b in islice(iter(loader), n or len(loader))]


def test_fixture_images_are_distinct_and_split(data, ref):
    assert len(data) == 64 and len(data.indices("train")) == 48 and len(data.indices("val")) == 16
    assert len({tuple(r.flatten().tolist()) for r in ref}) == 64     # identify() can tell them apart


def test_one_epoch_visits_every_train_image_once(data, ref):
    loader = BatchLoader(data, "train", 8, seed=3, hflip=False)
    assert len(loader) == 6
    batches = epoch_batches(loader, ref)
    assert sorted(r for b in batches for r in b) == data.indices("train").tolist()
    assert all(len(b) == 8 for b in batches)


def test_order_depends_on_seed_and_epoch_only(data, ref):
    def first_epochs(seed):
        loader = BatchLoader(data, "train", 8, seed=seed, hflip=False)
        return epoch_batches(loader, ref, 12)                           # epochs 0 and 1

    a = first_epochs(0)
    assert first_epochs(0) == a                                         # same (seed, epoch): same batches
    assert a[:6] != a[6:]                                               # epoch 0 vs epoch 1
    assert sorted(sum(a[6:], ())) == data.indices("train").tolist()     # epoch 1 covers the split again
    assert first_epochs(1)[:6] != a[:6]                                 # another seed


def test_unshuffled_unaugmented_batches_are_the_images_in_order(data, ref):
    loader = BatchLoader(data, "val", 4, hflip=False, shuffle=False)
    val = data.indices("val")
    for i, batch in enumerate(islice(iter(loader), 5)):                 # 4 batches per epoch, then again
        rows = val[(i % 4) * 4:(i % 4) * 4 + 4]
        x = batch["images"]
        assert x.dtype == torch.float32 and x.shape == (4, 3, 16, 16)
        assert torch.equal(x, ref[rows])
        assert x.min() >= -1 and x.max() <= 1


def test_hflip_mirrors_some_images_and_keeps_the_rest(data, ref):
    loader = BatchLoader(data, "train", 16, seed=0, hflip=True, shuffle=False)
    train = data.indices("train")
    flipped = kept = 0
    for i, batch in enumerate(islice(iter(loader), 3)):
        for image, row in zip(batch["images"], train[i * 16:(i + 1) * 16]):
            source = ref[row]
            if torch.equal(source, source.flip(-1)):                    # a symmetric blob: nothing to tell
                assert torch.equal(image, source)
            elif torch.equal(image, source.flip(-1)):
                flipped += 1
            else:
                assert torch.equal(image, source)
                kept += 1
    assert flipped + kept >= 30 and 0.25 < flipped / (flipped + kept) < 0.75


def test_random_crop_keeps_shape_and_range_but_changes_pixels(data, ref):
    loader = BatchLoader(data, "train", 8, seed=0, hflip=False, random_crop=True, shuffle=False)
    x = next(iter(loader))["images"]
    source = ref[data.indices("train")[:8]]
    assert x.shape == source.shape and x.dtype == torch.float32
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    changed = [(a - b).abs().max().item() > 0.05 for a, b in zip(x, source)]
    assert sum(changed) >= 6
    # still the same picture, slightly magnified: close on average
    assert (x - source).abs().mean() < 0.25 * (source - source.roll(1, 0)).abs().mean()


@pytest.mark.parametrize("k, state", [(0, (0, 0)), (4, (0, 4)), (6, (0, 6)), (8, (1, 2))])
def test_resumed_loader_continues_exactly(data, k, state):
    def make():
        return BatchLoader(data, "train", 8, seed=5, hflip=True, random_crop=True)

    running = make()
    it = iter(running)
    for _ in range(k):
        next(it)
    assert running.state_dict() == {"epoch": state[0], "batch": state[1]}
    resumed = make()
    resumed.load_state_dict(running.state_dict())
    for a, b in zip(islice(it, 5), islice(iter(resumed), 5)):          # crosses the epoch boundary at 6
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_resume_replays_what_an_uninterrupted_loader_reads(data):
    full = [b["images"] for b in islice(iter(BatchLoader(data, "train", 8, seed=2)), 9)]
    resumed = BatchLoader(data, "train", 8, seed=2)
    resumed.load_state_dict({"epoch": 1, "batch": 1})
    assert all(torch.equal(a, b["images"]) for a, b in zip(full[7:], islice(iter(resumed), 2)))
    assert not torch.equal(full[7], full[8])


def test_ranks_split_each_global_batch(data, ref):
    single = epoch_batches(BatchLoader(data, "train", 8, seed=7, hflip=False), ref, 9)
    ranks = [epoch_batches(BatchLoader(data, "train", 4, seed=7, hflip=False, rank=r, world_size=2), ref, 9)
             for r in (0, 1)]
    assert len(BatchLoader(data, "train", 4, rank=1, world_size=2)) == 6
    for whole, part0, part1 in zip(single, *ranks):
        assert len(part0) == len(part1) == 4
        assert not set(part0) & set(part1)
        assert set(part0) | set(part1) == set(whole)


@pytest.mark.parametrize("split, batch_size, world_size", [("train", 49, 1), ("val", 17, 1), ("train", 25, 2)])
def test_too_few_images_for_a_batch(data, split, batch_size, world_size):
    with pytest.raises(UserError) as err:
        BatchLoader(data, split, batch_size, world_size=world_size)
    assert f"the {split} split" in str(err.value) and str(batch_size * world_size) in str(err.value)
    assert "\n" not in str(err.value)
    assert len(BatchLoader(data, split, batch_size - 1, world_size=world_size)) == 1


def test_labels_are_int64_rows_of_the_label_table(data, ref):
    assert len(data.attributes) == 2 and (np.asarray(data.labels) >= 0).all()
    loader = BatchLoader(data, "train", 12, seed=1, hflip=False)
    for batch in islice(iter(loader), 4):
        labels = batch["labels"]
        assert labels.dtype == torch.int64 and labels.shape == (12, 2)
        rows = identify(batch["images"], ref)
        assert torch.equal(labels, torch.from_numpy(data.labels[rows].astype(np.int64)))
