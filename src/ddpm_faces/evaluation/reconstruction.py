"""How well a codec gives images back: PSNR, SSIM and reconstruction FID.

- PSNR = 10 log10(MAX^2 / MSE) on uint8 images (MAX = 255), averaged per image.
- SSIM (Wang et al. 2004, https://doi.org/10.1109/TIP.2003.819861, eq. 13): luminance, contrast and structure
  compared in an 11x11 Gaussian window (sigma 1.5) with C1 = (0.01 MAX)^2, C2 = (0.03 MAX)^2, on each RGB
  channel, averaged over the image.
- Reconstruction FID: the project's Inception features of the reconstructions against those of their originals
  (the same images), so it measures only what the codec loses.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import load_batch
from ..images import to_uint8
from .metrics import FeatureStats, fid_from_stats


@torch.no_grad()
def reconstruct(round_trip, data, rows: np.ndarray, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(originals, reconstructions) as uint8 pictures of the prepared images `rows`, with `round_trip` mapping
    (B, 3, H, W) images in [-1, 1] to their reconstructions."""
    originals, recons = [], []
    for start in range(0, len(rows), batch_size):
        images = load_batch(data, rows[start:start + batch_size])["images"].to(device)
        originals.append(to_uint8(images))
        recons.append(to_uint8(round_trip(images)))
    return np.concatenate(originals), np.concatenate(recons)


def psnr(original: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of (N, H, W, 3) uint8 images (inf where identical)."""
    mse = ((original.astype(np.float64) - recon.astype(np.float64)) ** 2).reshape(len(original), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The 1-D Gaussian; the 2-D window is its outer product, applied as two 1-D passes (5x fewer operations)."""
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(original: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Per-image SSIM of (N, H, W, 3) uint8 images (valid windows only, as Wang et al.'s reference code)."""
    x = torch.from_numpy(np.ascontiguousarray(original)).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(np.ascontiguousarray(recon)).permute(0, 3, 1, 2).double()
    c = x.shape[1]
    g = _gaussian_window()
    rows, cols = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, rows, groups=c), cols, groups=c)  # noqa: E731
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return ssim_map.flatten(1).mean(1).numpy()


def original_stats(original: np.ndarray, extractor) -> FeatureStats:
    """The feature statistics of the originals: measured once, they serve every later reconstruction of them."""
    return FeatureStats.from_features(extractor(original))


def reconstruction_fid(original: np.ndarray, recon: np.ndarray, extractor,
                       reference: FeatureStats | None = None) -> float:
    """FID of the reconstructions against their originals in the extractor's feature space (`reference`: the
    originals' statistics, when already measured)."""
    reference = reference if reference is not None else original_stats(original, extractor)
    return fid_from_stats(reference, FeatureStats.from_features(extractor(recon)))


def reconstruction_metrics(original: np.ndarray, recon: np.ndarray, extractor=None,
                           reference: FeatureStats | None = None) -> dict[str, float]:
    """Mean PSNR and SSIM, and reconstruction FID when an extractor (e.g. InceptionFeatures) is given."""
    out = {"psnr": float(np.mean(np.minimum(psnr(original, recon), 100.0))), "ssim": float(ssim(original, recon).mean()),
           "num": int(len(original))}
    if extractor is not None:
        out["rfid"] = reconstruction_fid(original, recon, extractor, reference)
    return out
