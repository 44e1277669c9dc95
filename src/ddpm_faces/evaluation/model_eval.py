"""Score a model: generate N seeded samples with any sampler and compare them with real faces.

    pipe = load_pipeline("runs/faces64")
    metrics = evaluate_model(pipe, reference="../shared/data/faces", split="val", num=2000,
                             sampler="dpmpp-2m", steps=20)
"""
from __future__ import annotations

from pathlib import Path

from ..diffusion import network_evaluations
from ..pipeline import Pipeline, generate
from .features import InceptionFeatures
from .reference import evaluate_images, reference_stats

METRIC_NAMES = ("fid", "kid_mean", "kid_std", "precision", "recall", "face_rate")


def evaluate_model(pipe: Pipeline, *, reference: str, split: str = "val", num: int = 2000,
                   reference_num: int | None = None, sampler: str = "ddpm", steps: int = 50,
                   spacing: str | None = None, seed: int = 0, batch_size: int = 64,
                   cache_dir: str | Path | None = None, extractor=None, with_face_rate: bool = True,
                   progress: bool = True) -> dict:
    """Metrics of `num` samples (seeds seed..seed+num-1) against a split of a real face set."""
    extractor = extractor or InceptionFeatures(pipe.device, progress=progress)
    d = pipe.cfg.data                              # prepare the reference as the model's data were prepared
    real = reference_stats(reference, split, pipe.cfg.model.resolution, num=reference_num, cache_dir=cache_dir,
                           crop=d.crop, hf_config=d.hf_config, extractor=extractor, progress=progress)
    images = generate(pipe, num, seed=seed, sampler=sampler, steps=steps, spacing=spacing,
                      batch_size=batch_size, progress=progress)
    metrics = evaluate_images(images, real, extractor=extractor, with_face_rate=with_face_rate,
                              progress=progress)
    return {**metrics, "sampler": sampler, "steps": steps, "nfe": network_evaluations(sampler, steps),
            "seed": seed, "reference": reference, "split": split, "model": str(pipe.source)}


def format_table(rows: list[dict]) -> str:
    """A plain-text table of metric rows (one per model / sampler setting)."""
    cols = ["sampler", "steps", "nfe", "num_fake", *METRIC_NAMES]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
