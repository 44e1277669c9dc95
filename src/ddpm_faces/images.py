"""Image helpers: model range <-> uint8, grids, saving (Pillow and numpy only)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import UserError


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one picture, nrow images per row (default: a square)."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def save_image(array: np.ndarray, path: str | Path, upscale: int = 1, text: dict[str, str] | None = None) -> Path:
    """Write an image; a PNG gets `text` as its text chunks (what made it: see `provenance`)."""
    path = Path(path)
    img = Image.fromarray(array)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    info = None
    if text and path.suffix.lower() == ".png":
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, str(value))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, pnginfo=info) if info is not None else img.save(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot write the image {path}: {getattr(err, 'strerror', None) or err}") from None
    return path


SYNTHETIC = "synthetic: made by a diffusion model (ddpm-faces); not a photograph of a real person"
EDITED = "edited: a photograph changed by a diffusion model (ddpm-faces); the changed parts are synthetic"


def provenance(command: str, model: str, step: int | None, note: str = SYNTHETIC) -> dict[str, str]:
    """The PNG text chunks of a generated or edited image: the command that reproduces it, the model and its
    training step, and what it is."""
    return {"Description": note, "ddpm-faces command": command, "ddpm-faces model": model,
            "ddpm-faces step": "unknown" if step is None else str(step)}


class DenoisingStrip:
    """A sampler callback that keeps the predicted clean image x0 at `columns` evenly spaced steps;
    `picture()` lays them out with one row per image, noise on the left, the face on the right."""

    def __init__(self, steps: int, num: int, columns: int = 8):
        self.keep = {round(i * (steps - 1) / max(columns - 1, 1)) for i in range(columns)}
        self.rows: list[list[np.ndarray]] = []
        self.num = num

    def __call__(self, i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i == 0:
            self.rows.append([])                         # a new batch of images starts
        if i in self.keep:
            self.rows[-1].append(to_uint8(x0))

    def picture(self) -> np.ndarray:
        per_batch = [np.stack(cols, axis=1) for cols in self.rows]       # (B, columns, H, W, 3)
        frames = np.concatenate(per_batch)[: self.num]
        n, cols = frames.shape[:2]
        return make_grid(frames.reshape(n * cols, *frames.shape[2:]), nrow=cols)
