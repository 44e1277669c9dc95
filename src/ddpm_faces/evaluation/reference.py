"""Reference statistics of real images, computed once and cached, and the one-call evaluation.

``reference_stats`` extracts features of a prepared dataset's split (see ``ddpm_faces.data``) and
keeps them as ``<cache root>/reference/<name>.npz``, keyed on the prepared dataset folder (which
names the source, resolution and crop), its image count, the split, the number of images and the
feature extractor's identity. ``evaluate_images`` scores generated images against such statistics.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..data import prepare_dataset
from ..data.prepare import cache_root
from ..errors import UserError
from ..photos.faces import face_rate
from .features import InceptionFeatures, check_images
from .metrics import FeatureStats, fid_from_stats, kid, precision_recall

logger = logging.getLogger("ddpm_faces.evaluation")

Extractor = Callable[[np.ndarray], np.ndarray]
ExtractorSpec = Union[Extractor, type]
"""A feature extractor instance (images -> (N, D) features), or a class built with no arguments
when features must be computed. Its ``identity`` attribute (class or instance) keys the cache."""


def extractor_identity(extractor: ExtractorSpec) -> str:
    """The cache key part that names the extractor: its ``identity``, else its qualified name."""
    identity = getattr(extractor, "identity", None)
    if isinstance(identity, str) and identity:
        return identity
    kind = extractor if inspect.isclass(extractor) else type(extractor)
    return f"{kind.__module__}.{kind.__qualname__}"


def _instantiate(extractor: ExtractorSpec) -> Extractor:
    return extractor() if inspect.isclass(extractor) else extractor


def spread(rows: np.ndarray, num: int) -> np.ndarray:
    """``num`` rows evenly spaced over ``rows`` (all of them when there are no more).

    Not simply the first ``num``: prepared datasets keep the source's file order, which can be
    sorted by source or by a label (the shared faces folder lists its 1,006 FairFace photos first
    and the UTKFace ones by age), so a prefix would not represent the split.
    """
    if num >= rows.size:
        return rows
    return rows[(np.arange(num) * rows.size) // num]


def _cache_file(root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    count = "all" if key["num"] is None else str(key["num"])
    return root / "reference" / f"{key['dataset']}-{key['split']}-n{count}-{digest}.npz"


def reference_stats(
    source: str,
    split: str,
    resolution: int,
    *,
    num: int | None = None,
    cache_dir: str | Path | None = None,
    extractor: ExtractorSpec = InceptionFeatures,
    crop: str = "center",
    hf_config: str = "0.25",
    progress: bool = True,
) -> FeatureStats:
    """Feature statistics (with the features) of a dataset split, cached after the first call.

    ``source``, ``resolution``, ``crop`` and ``cache_dir`` are those of
    ``ddpm_faces.data.prepare_dataset``; ``split`` is "train", "val" or "all"; ``num`` takes
    ``num`` images evenly spaced over the split in index order (default: all of them; see
    :func:`spread`). Compare generated and real sets of equal size: FID of small samples is
    biased upward.
    """
    if num is not None and (isinstance(num, bool) or int(num) < 2):
        raise UserError(f"the number of reference images must be at least 2, not {num!r}")
    data = prepare_dataset(source, resolution, crop=crop, cache_dir=cache_dir, hf_config=hf_config,
                           progress=progress)
    rows = data.indices(split)
    if rows.size < 2:
        raise UserError(
            f"split {split!r} of {source} has {rows.size} image(s); pick another split "
            "(train, val or all)"
        )
    if num is not None and num > rows.size:
        logger.warning("split %r has only %d images, not %d: using all of them", split, rows.size, num)
    chosen = rows if num is None else spread(rows, int(num))
    key = {
        "dataset": data.root.name,
        "dataset_images": len(data),
        "split": split,
        "resolution": int(resolution),
        "num": None if chosen.size == rows.size else int(chosen.size),
        "pick": "spread",
        "extractor": extractor_identity(extractor),
    }
    path = _cache_file(cache_root(cache_dir), key)
    cached = _load_cached(path, key)
    if cached is not None:
        return cached

    images = np.asarray(data.images[chosen])  # fancy indexing reads just these rows of the memmap
    features = _features(_instantiate(extractor), images, progress)
    stats = FeatureStats.from_features(features, info={**key, "source": source})
    _save_cached(stats, path)
    return stats


def _load_cached(path: Path, key: dict[str, Any]) -> FeatureStats | None:
    """The cached statistics at ``path`` when they are whole and were computed for ``key``.

    A damaged file, or one made for another key, is reported in one log line and computed again.
    """
    if not path.is_file():
        return None
    try:
        stats = FeatureStats.load(path)
    except UserError as error:
        reason = error.__context__ or error  # the error the file raised, without the advice to delete it
        logger.warning("cached reference statistics %s are damaged (%s); computing them again", path, reason)
        return None
    if stats.feats is None or any(stats.info.get(name) != value for name, value in key.items()):
        logger.warning("cached reference statistics %s do not match their name; computing them again", path)
        return None
    logger.info("using cached reference statistics %s", path)
    return stats


def _save_cached(stats: FeatureStats, path: Path) -> None:
    """Keep the statistics for next time; a cache that cannot be written only costs a warning."""
    try:
        stats.save(path)
    except OSError as error:
        logger.warning(
            "could not save reference statistics to %s (%s); they will be computed again next time",
            path,
            error.strerror or error,
        )
        return
    logger.info("saved reference statistics of %d images to %s", stats.count, path)


def _features(extractor: Extractor, images: np.ndarray, progress: bool) -> np.ndarray:
    """Call the extractor, passing ``progress`` when it accepts it."""
    try:
        accepts = "progress" in inspect.signature(extractor).parameters
    except (TypeError, ValueError):
        accepts = False
    return extractor(images, progress=progress) if accepts else extractor(images)


def evaluate_images(
    fake_uint8: np.ndarray | torch.Tensor,
    reference: FeatureStats,
    *,
    extractor: ExtractorSpec = InceptionFeatures,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    with_face_rate: bool = True,
    progress: bool = False,
) -> dict[str, float | int | None]:
    """All metrics of generated uint8 images, (N, H, W, 3) numpy or (N, 3, H, W) torch, against
    real ``reference`` statistics.

    Returns {"fid", "kid_mean", "kid_std", "precision", "recall", "face_rate", "num_fake",
    "num_real"}; "face_rate" is None when ``with_face_rate`` is False. ``reference`` must hold
    its features (as ``reference_stats`` returns them) for KID and precision/recall.
    """
    count = check_images(fake_uint8)
    if not isinstance(fake_uint8, np.ndarray):  # a (N, 3, H, W) uint8 tensor
        fake_uint8 = fake_uint8.permute(0, 2, 3, 1).cpu().numpy()
    if reference.feats is None:
        raise UserError(
            "the reference statistics hold no features, which KID and precision/recall need; "
            "compute them with reference_stats()"
        )
    if count < max(2, pr_k + 1):
        raise UserError(f"evaluate at least {max(2, pr_k + 1)} generated images, not {count}")
    # The face rate first: it is quick, and fails at once when the detector is not installed.
    rate = face_rate(fake_uint8) if with_face_rate else None
    fake = FeatureStats.from_features(_features(_instantiate(extractor), fake_uint8, progress))
    kid_mean, kid_std = kid(reference.feats, fake.feats, kid_subsets, kid_subset_size)
    precision, recall = precision_recall(reference.feats, fake.feats, k=pr_k)
    return {
        "fid": fid_from_stats(reference, fake),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "face_rate": rate,
        "num_fake": count,
        "num_real": reference.count,
    }
