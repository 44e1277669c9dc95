"""What the handlers show: the names of each event's outputs, the enlarged pictures, the status lines and
the command that reproduces a grid (no Gradio here).

A handler returns (or yields) a dict keyed by these names; a name left out means "leave that output as it
is". The page turns the dicts into Gradio's positional tuples, in one place (page.py).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..images import make_grid, save_image
from ..pipeline import SamplingRequest
from .models import ModelEntry

GENERATE_OUTPUTS = ("preview", "gallery", "grid_file", "seeds", "strip", "status")
INTERPOLATE_OUTPUTS = ("row", "interpolate_status")
EDIT_OUTPUTS = ("edit_preview", "edit_gallery", "edit_files", "edit_command", "edit_status")
CANVAS_OUTPUTS = ("edit_canvas",)
STOPPED = "Stopped."
DISPLAY_PX = 128                 # faces are enlarged (nearest) to about this size for the page and the PNGs
KEEP_FOLDERS = 32                # grid PNG folders kept on disk (older ones are removed)


def model_outputs(attribute_names: list[str]) -> tuple[str, ...]:
    """The outputs of choosing a model: its card, the guidance slider, one dropdown per attribute, the steps."""
    return ("card", "guidance", *(f"attribute_{name}" for name in attribute_names), "steps", "interpolate_steps",
            "edit_steps")


def display_scale(image_size: int) -> int:
    """The nearest-neighbour enlargement that shows a face at about DISPLAY_PX pixels."""
    return max(1, DISPLAY_PX // image_size)


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    return image if scale == 1 else image.repeat(scale, axis=-3).repeat(scale, axis=-2)


def reproduce_command(entry: ModelEntry, request: SamplingRequest, scale: int) -> str:
    """The `ddpm-faces sample` line that writes the same grid."""
    checkpoint = f"--checkpoint {entry.cli_checkpoint} " if entry.cli_checkpoint else ""
    return f"ddpm-faces sample {checkpoint}{request.cli_flags()} --upscale {scale} --out faces.png"


def seeds_text(entry: ModelEntry, request: SamplingRequest, scale: int) -> str:
    """Markdown: which seed and index each face is, and how to get the grid or one face again."""
    seed, num = request.seed, request.num
    faces = "; ".join(f"face {i} = seed {seed} image {i}" for i in range(num))
    return (f"**Seeds.** Face *i* is image *i* of seed {seed}, whatever the number of faces asked for: {faces}.\n\n"
            f"This grid again: `{reproduce_command(entry, request, scale)}`  \n"
            f"Each face on its own: add `--save-individual faces/`, and face *i* is written to "
            f"`faces/seed{seed}-{num - 1:04d}.png` for *i* = {num - 1} (`--num i+1` is enough for face *i*).")


def generate_status(request: SamplingRequest, seconds: float, conditional: bool) -> str:
    r = request
    asked = ", ".join(f"{k} {v}" for k, v in r.attributes.items())
    return (f"{r.num} face{'s' if r.num > 1 else ''} in {seconds:.2f} s ({r.sampler}, {r.steps} steps"
            + (f", {asked}" if asked else "") + (f", guidance {r.guidance:g}" if conditional else "")
            + f", {r.precision})")


def interpolate_status(request: SamplingRequest, seed_b: int, seconds: float) -> str:
    return (f"{request.num} faces from seed {request.seed} to seed {seed_b} in {seconds:.2f} s ({request.sampler}, "
            f"{request.steps} steps; spherical interpolation of the starting noise of image 0 of each seed)")


def preview_status(step: int, steps: int, generating: bool = True) -> str:
    return f"Denoising: step {step} of {steps}" + (" (the current estimate of each face)" if generating else "")


def new_folder(out_dir: Path) -> Path:
    """A new folder under `out_dir` for one run's files, the oldest folders beyond KEEP_FOLDERS removed."""
    folder = Path(tempfile.mkdtemp(dir=out_dir))
    folders = sorted((p for p in out_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in folders[:-KEEP_FOLDERS]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def save_grid(images: np.ndarray, out_dir: Path, seed: int, scale: int) -> Path:
    """The grid PNG in a new folder under `out_dir`."""
    return save_image(make_grid(images), new_folder(out_dir) / f"faces-seed{seed}.png", upscale=scale)
