"""Sample-quality metrics on feature arrays: FID, KID and k-NN precision/recall.

All functions take features (one row per image, e.g. the 2048-d Inception pool features of
``features.InceptionFeatures``) and know nothing about images.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..io import atomic_file

# =========================================================================== feature statistics


@dataclass
class FeatureStats:
    """Mean, covariance and (optionally) the rows of a set of features.

    FID needs only ``mu`` and ``sigma``; KID and precision/recall need the rows ``feats``.
    ``info`` is free-form JSON-able metadata (source, split, count, extractor…).
    """

    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Number of feature rows the statistics were computed from."""
        if self.feats is not None:
            return int(self.feats.shape[0])
        return int(self.info.get("count", 0))

    @classmethod
    def from_features(cls, feats: np.ndarray, info: dict[str, Any] | None = None) -> FeatureStats:
        """Statistics of (N, D) features: mean and unbiased covariance (N - 1 in the denominator)."""
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise UserError(
                f"need at least 2 feature rows of shape (N, D) for statistics, got {feats.shape}; "
                "evaluate more images"
            )
        info = {**(info or {}), "count": int(feats.shape[0])}
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False), feats, info)

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (no pickles; features stored as float32), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "mu": np.asarray(self.mu, dtype=np.float64),
            "sigma": np.asarray(self.sigma, dtype=np.float64),
            "info": np.array(json.dumps(self.info, sort_keys=True)),
        }
        if self.feats is not None:
            arrays["feats"] = np.asarray(self.feats, dtype=np.float32)
        with atomic_file(path) as partial:
            np.savez(partial, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read statistics written by :meth:`save` (``allow_pickle=False``), checking them.

        A file that is not such an .npz (truncated, overwritten, object arrays, shapes that do not
        fit together, non-finite values) is a :class:`UserError` naming the file.
        """

        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma = data["mu"].astype(np.float64), np.atleast_2d(data["sigma"].astype(np.float64))
                feats = data["feats"].astype(np.float64) if "feats" in data.files else None
                info = json.loads(str(data["info"])) if "info" in data.files else {}
            dim = mu.shape[0] if mu.ndim == 1 else -1
            if dim < 1 or sigma.shape != (dim, dim) or (feats is not None and feats.shape[1:] != (dim,)):
                raise ValueError(f"mismatched shapes mu {mu.shape}, sigma {sigma.shape}")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()) or not isinstance(info, dict):
                raise ValueError("non-finite statistics or info that is not a JSON object")
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise UserError(
                f"{path}: not a feature-statistics .npz ({error}); delete it and compute it again"
            ) from None
        return cls(mu, sigma, feats, info)


# =========================================================================== FID


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", the FID formula (the Fréchet / 2-Wasserstein distance of Gaussians, Dowson &
    Landau 1982)::

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    Tr((sigma1 sigma2)^(1/2)) comes from the symmetric eigendecomposition route of
    :func:`trace_sqrt_product`, the same whatever is installed. It agrees with the usual
    ``scipy.linalg.sqrtm`` route (pytorch-fid, clean-fid) to rounding (2e-7 relative on 300 vs 1,229
    real face features) and is about 8x faster on 2048-d features.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}"
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices, by two symmetric eigendecompositions.

    sigma1 sigma2 is similar to S sigma2 S with S = sigma1^(1/2) (symmetric), so both share their
    eigenvalues, which are real and >= 0; the trace of the square root is the sum of their square
    roots. With sigma1 = V diag(l) V^T, S sigma2 S has the nonzero eigenvalues of the small matrix
    diag(l)^(1/2) V^T sigma2 V diag(l)^(1/2) over the r eigenvectors with l > 0, so a covariance
    of N < D samples (rank N - 1) costs one D x D eigendecomposition and D x D x r products.
    Eigenvalues that rounding left at or below zero are dropped (their exact value is 0).
    """
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    keep = values > values.max(initial=0.0) * 1e-12
    scaled = vectors[:, keep] * np.sqrt(values[keep])  # D x r
    middle = scaled.T @ sigma2 @ scaled  # r x r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """FID between two :class:`FeatureStats`."""
    return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


# =========================================================================== KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3, the cubic kernel of Binkowski et al. 2018 (section 3)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of MMD^2 between the samples x (m, d) and y (n, d).

    Binkowski et al. 2018, "Demystifying MMD GANs", the unbiased estimator (Gretton et al. 2012's
    U-statistic) that defines KID::

        MMD^2 = sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1))
                - 2 sum_{i,j} k(x_i,y_j) / (m n)
    """
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kid(
    feats1: np.ndarray,
    feats2: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation of MMD^2 over random subsets.

    Binkowski et al. 2018: the unbiased MMD^2 with the cubic polynomial kernel, averaged over
    ``subsets`` pairs of subsets of ``subset_size`` rows each, drawn without replacement (the usual
    protocol: 100 subsets of 1000). ``subset_size`` is clipped to the smaller set. Unbiased, so
    values can be slightly negative when the two sets come from one distribution.
    """
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    size = min(int(subset_size), feats1.shape[0], feats2.shape[0])
    if size < 2:
        raise UserError(f"KID needs at least 2 features in each set, got {feats1.shape[0]} and "
                        f"{feats2.shape[0]}; evaluate more images")
    rng = np.random.default_rng(seed)
    values = np.empty(int(subsets), dtype=np.float64)
    for index in range(values.size):
        rows1 = rng.choice(feats1.shape[0], size, replace=False)
        rows2 = rng.choice(feats2.shape[0], size, replace=False)
        values[index] = mmd2_unbiased(feats1[rows1], feats2[rows2])
    return float(values.mean()), float(values.std())


# =========================================================================== precision / recall


def knn_radii(feats: torch.Tensor, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row: the radius of its ball in the k-NN
    manifold estimate of Kynkäänniemi et al. 2019.

    Computed a block of rows at a time, so N x N distances never sit in memory at once.
    """
    radii = torch.empty(feats.shape[0], dtype=feats.dtype)
    for start in range(0, feats.shape[0], batch_size):
        block = torch.cdist(feats[start : start + batch_size], feats)
        # The k+1-th smallest: the smallest is the row's distance to itself.
        radii[start : start + batch_size] = block.kthvalue(k + 1, dim=1).values
    return radii


def manifold_coverage(
    support: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, batch_size: int = 1024
) -> float:
    """Share of ``queries`` inside at least one ball (support_j, radii_j).

    Kynkäänniemi et al. 2019: f(q, S) = 1 if ||q - s|| <= ||s - NN_k(s, S)|| for some s in S; this
    returns the mean of f over the queries.
    """
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        block = torch.cdist(queries[start : start + batch_size], support)
        inside += int((block <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
    Metric for Assessing Generative Models", section 2)::

        precision = mean over fake samples g of f(g, real)
        recall    = mean over real samples r of f(r, fake)

    Each set's manifold is the union of balls around its samples, each ball reaching the sample's
    k-th nearest neighbour (k = 3 in the paper). Precision: the share of fake samples on the real
    manifold. Recall: the share of real samples on the fake manifold. Distances are computed with
    ``torch.cdist`` in float32 blocks of ``batch_size`` rows (5,000 x 5,000 runs in ~100 MB).
    """
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise UserError(
            f"precision/recall with k={k} needs more than {k} images per set, got {real.shape[0]} "
            f"real and {fake.shape[0]} generated; evaluate more images"
        )
    with torch.inference_mode():
        precision = manifold_coverage(real, knn_radii(real, k, batch_size), fake, batch_size)
        recall = manifold_coverage(fake, knn_radii(fake, k, batch_size), real, batch_size)
    return precision, recall
