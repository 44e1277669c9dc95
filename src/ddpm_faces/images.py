"""Image helpers: model range <-> uint8, grids, saving (Pillow and numpy only)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import UserError
from .io import atomic_file


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]: what the models take (to_uint8 is the inverse)."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) images resized to size x size: antialiased bicubic (area-like when shrinking), values kept
    in the input's range by clamping to its [-1, 1] model range."""
    if x.shape[-2:] == (size, size):
        return x
    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False,
                                        antialias=True)
    return y.clamp(-1, 1)


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


def label_rows(grid: np.ndarray, labels: list[str], pad: int = 2, size: int = 12) -> np.ndarray:
    """`grid` (make_grid's, len(labels) equal rows) with a white column on its left naming each row, the text
    `size` px high and centred on its row."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(draw.textbbox((0, 0), label, font=font)[2] for label in labels) + size
    column = Image.new("RGB", (width, grid.shape[0]), (255, 255, 255))
    draw = ImageDraw.Draw(column)
    row_h = (grid.shape[0] - pad) / len(labels)
    for i, label in enumerate(labels):
        draw.text((size // 2, pad + (i + 0.5) * row_h - pad / 2), label, fill=(0, 0, 0), font=font, anchor="lm")
    return np.concatenate([np.asarray(column), grid], axis=1)


def save_image(array: np.ndarray, path: str | Path, upscale: int = 1, text: dict[str, str] | None = None) -> Path:
    """Write an image; a PNG gets `text` as its text chunks (what made it: see `provenance`)."""
    path = Path(path)
    img = Image.fromarray(array)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    info = None
    if text and path.suffix.lower() == ".png":
        info = PngInfo()
        for key, value in text.items():        # file names that are not UTF-8 keep their bytes as \x.. escapes
            info.add_itxt(key, str(value).encode("utf-8", "backslashreplace").decode("utf-8"))
    try:
        fmt = Image.registered_extensions().get(path.suffix.lower())
        with atomic_file(path) as tmp:          # a full disk or a kill leaves the earlier file, never half of one
            img.save(tmp, format=fmt, **({"pnginfo": info} if info is not None else {}))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot write the image {path}: {getattr(err, 'strerror', None) or err}") from None
    return path


SYNTHETIC = "synthetic: made by a diffusion model (ddpm-faces); not a photograph of a real person"
EDITED = "edited: a photograph changed by a diffusion model (ddpm-faces); the changed parts are synthetic"
UPSCALED = ("upscaled: a small photograph enlarged by a diffusion model (ddpm-faces); its fine detail is synthetic, "
            "drawn by the model, not recovered from the photograph")


def provenance(command: str, model: str, step: int | None, note: str = SYNTHETIC) -> dict[str, str]:
    """The PNG text chunks of a generated or edited image: the command that reproduces it, the model and its
    training step, and what it is."""
    return {"Description": note, "ddpm-faces command": command, "ddpm-faces model": model,
            "ddpm-faces step": "unknown" if step is None else str(step)}


class DenoisingStrip:
    """A sampler callback that keeps the predicted clean image x0 at `columns` evenly spaced steps;
    `picture()` lays them out with one row per image, noise on the left, the face on the right. For a cascade
    `steps` lists each stage's steps: the columns are shared between the stages, and the smaller stages'
    frames are enlarged (bicubic) to the last stage's size."""

    def __init__(self, steps: int | list[int], num: int, columns: int = 8):
        self.stages = [steps] if isinstance(steps, int) else list(steps)
        per_stage = columns if len(self.stages) == 1 else max(2, columns // len(self.stages))
        self.keep = [{round(i * (s - 1) / max(per_stage - 1, 1)) for i in range(per_stage)} for s in self.stages]
        self.rows: list[list[np.ndarray]] = []
        self.num, self.stage = num, -1

    def __call__(self, i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i == 0:                                       # a stage starts; at stage 1 a new batch of images
            self.stage = (self.stage + 1) % len(self.stages)
            if self.stage == 0:
                self.rows.append([])
        if i in self.keep[self.stage]:
            self.rows[-1].append(to_uint8(x0))

    def picture(self) -> np.ndarray:
        size = max(frame.shape[1] for cols in self.rows for frame in cols)
        per_batch = [np.stack([enlarge(frame, size) for frame in cols], axis=1) for cols in self.rows]
        frames = np.concatenate(per_batch)[: self.num]                   # (N, columns, H, W, 3)
        n, cols = frames.shape[:2]
        return make_grid(frames.reshape(n * cols, *frames.shape[2:]), nrow=cols)


def enlarge(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, 3) uint8 pictures resized to size x size (bicubic); unchanged when already that size."""
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)) for img in images])
