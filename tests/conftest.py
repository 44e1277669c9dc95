"""Shared fixtures: small face-like data sets that the tests draw themselves, and tiny configs and models."""
from __future__ import annotations

import csv
import dataclasses
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def draw_face(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth blob on a background: enough structure for a model to learn something in a few steps."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy, r = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.35)
    inside = ((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2
    bg, fg = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    return np.where(inside[..., None], fg, bg).astype(np.uint8)


@pytest.fixture(scope="session")
def face_folder(tmp_path_factory) -> Path:
    """48 train + 16 val images (24 px) with labels.csv: file, split, gender, age."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(64):
        Image.fromarray(draw_face(rng, 24)).save(root / f"img{i:03d}.png")
        rows.append({"file": f"img{i:03d}.png", "split": "val" if i % 4 == 0 else "train",
                     "gender": ["Male", "Female"][i % 2], "age": ["20-29", "30-39", "0-2"][i % 3]})
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "split", "gender", "age"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def tiny_overrides(tmp_path: Path, data: Path, **extra) -> list[str]:
    """--set values for a 16 px model that trains a step in a few milliseconds."""
    values = {
        "name": "tiny", "data.source": str(data), "data.resolution": 16, "data.cache_dir": str(tmp_path / "cache"),
        "model.resolution": 16, "model.base_channels": 16, "model.channel_mults": "[1,2]",
        "model.blocks_per_level": 1, "model.attn_resolutions": "[8]", "model.head_channels": 16,
        "model.dropout": 0.1, "train.batch_size": 8, "train.max_steps": 12, "train.warmup_steps": 3,
        "train.log_every": 3, "train.eval_every": 6, "train.sample_every": 6, "train.sample_images": 4,
        "train.sample_steps": 4, "train.checkpoint_every": 6, "train.val_images": 8, "train.out_dir": str(tmp_path / "runs"),
        "train.ema_decay": 0.9, "diffusion.timesteps": 50, "diffusion.schedule": "cosine",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# The tiny network most tests sample from: 16 px, 8 base channels, two levels, attention at 8 px (49 k weights).
TINY_MODEL = {
    "model.resolution": 16, "data.resolution": 16, "model.base_channels": 8, "model.channel_mults": "[1,2]",
    "model.blocks_per_level": 1, "model.attn_resolutions": "[8]", "model.head_channels": 8, "model.groups": 4,
    "model.dropout": 0.0,
}


def tiny_config(*overrides: str, **model):
    """quickstart with the tiny network of TINY_MODEL; `overrides` are further --set values, `model` replaces
    UNetConfig fields that --set cannot spell (a vocabulary, say)."""
    from ddpm_faces.config import load_config

    cfg = load_config("quickstart", [f"{k}={v}" for k, v in TINY_MODEL.items()] + list(overrides))
    cfg.model = dataclasses.replace(cfg.model, **model)
    return cfg


def tiny_model(*overrides: str, seed: int = 0, **model):
    """(an untrained network of tiny_config(*overrides, **model), that config), its weights drawn from `seed`."""
    import torch

    from ddpm_faces.models import UNet

    cfg = tiny_config(*overrides, **model)
    torch.manual_seed(seed)
    return UNet(cfg.model), cfg


@pytest.fixture(scope="session")
def tiny_pipeline():
    """A Pipeline over the untrained tiny network, 50 timesteps: fast to sample from, images of noise."""
    from ddpm_faces.pipeline import Pipeline

    net, cfg = tiny_model("diffusion.timesteps=50")
    return Pipeline(net.eval(), cfg, Path("tiny"))


@pytest.fixture(scope="session")
def unconditional_model(tmp_path_factory) -> Path:
    """A tiny 16 px unconditional export (the bundled model is conditional)."""
    from ddpm_faces.runs import export_model

    return export_model(*tiny_model(), tmp_path_factory.mktemp("unconditional") / "export")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    """The web page of the test module's `app` fixture, served on a free port, and a gradio_client for it."""
    from gradio_client import Client

    from ddpm_faces.app import build_page, launch

    demo = build_page(app)
    launch(demo, port=free_port(), block=False, quiet=True)
    try:
        yield demo, Client(demo.local_url, verbose=False)
    finally:
        demo.close(verbose=False)


def stop_process(process) -> int:
    """SIGTERM, then the exit status (kill -9 if it does not stop within a minute)."""
    import signal
    import subprocess

    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
