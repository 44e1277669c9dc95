"""Score a model: generate N seeded samples with any sampler and compare them with real faces.

    pipe = load_pipeline("runs/faces64")
    metrics = evaluate_model(pipe, SamplingRequest(num=2000), reference="../shared/data/faces", split="val")
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import prepare_dataset
from ..errors import UserError
from ..pipeline import Pipeline, SamplingRequest, generate
from .attributes import agreement, classifier_accuracy, target_labels
from .features import InceptionFeatures
from .reconstruction import reconstruct, reconstruction_metrics
from .reference import evaluate_images, reference_stats, spread

METRIC_NAMES = ("fid", "kid_mean", "kid_std", "precision", "recall", "face_rate")


def evaluate_model(pipe: Pipeline, request: SamplingRequest, *, reference: str, split: str = "val",
                   reference_num: int | None = None, cache_dir: str | Path | None = None, extractor=None,
                   with_face_rate: bool = True, progress: bool = True) -> dict:
    """Metrics of `request.num` samples (images 0..num-1 of request.seed) against a split of a real face set."""
    request = request.validate(pipe)
    extractor = extractor or InceptionFeatures(pipe.device, progress=progress)
    d = pipe.cfg.data                              # prepare the reference as the model's data were prepared
    real = reference_stats(reference, split, pipe.codec.image_size, num=reference_num, cache_dir=cache_dir,
                           crop=d.crop, hf_config=d.hf_config, extractor=extractor, progress=progress)
    images = generate(pipe, request, progress=progress)
    metrics = evaluate_images(images, real, extractor=extractor, with_face_rate=with_face_rate,
                              progress=progress)
    return {**metrics, "sampler": request.sampler, "steps": request.steps, "nfe": request.nfe,
            "seed": request.seed, "reference": reference, "split": split, "model": str(pipe.source)}


def evaluate_codec(codec, *, reference: str, split: str = "val", num: int | None = None, crop: str = "center",
                   hf_config: str = "0.25", cache_dir: str | Path | None = None, extractor=None,
                   batch_size: int = 64, progress: bool = True) -> dict:
    """PSNR, SSIM and reconstruction FID of a codec on `num` images spread over a split (all by default)."""
    data = prepare_dataset(reference, codec.image_size, crop=crop, cache_dir=cache_dir, hf_config=hf_config,
                           progress=progress)
    rows = spread(data.indices(split), num or len(data))
    if len(rows) < 2:
        raise UserError(f"the {split} split of {reference} has {len(rows)} image(s): at least 2 are needed")
    device = next(codec.parameters()).device
    originals, recons = reconstruct(lambda images: codec.decode(codec.encode(images)), data, rows, batch_size, device)
    extractor = extractor or InceptionFeatures(device, progress=progress)
    metrics = reconstruction_metrics(originals, recons, extractor)
    return {**metrics, "reference": reference, "split": split, "resolution": codec.image_size}


def attribute_agreement(pipe: Pipeline, classifier, request: SamplingRequest, *, reference: str,
                        guidance_scales: list[float], split: str = "val", cache_dir: str | Path | None = None,
                        extractor=None, with_fid: bool = True, progress: bool = True) -> dict:
    """For each guidance scale: how often `classifier` reads the attributes asked for in `request.num`
    conditional samples (attribute combinations drawn from the reference's val labels), with FID at the same
    scale; plus the classifier's own accuracy on the real val faces, the ceiling to compare with."""
    requests = [request.replace(guidance=w).validate(pipe) for w in guidance_scales]
    num, seed = request.num, request.seed
    m = pipe.cfg.model
    if not m.attributes:
        raise UserError(f"attribute agreement needs a conditional model; {pipe.source} is unconditional")
    d = pipe.cfg.data
    data = prepare_dataset(reference, pipe.codec.image_size, crop=d.crop, cache_dir=cache_dir, hf_config=d.hf_config,
                           progress=progress)
    missing = [a for a in m.attributes if a not in data.attributes]
    if missing:
        raise UserError(f"the reference data has no {', '.join(missing)} labels: use the data the model was "
                        "trained on")
    asked_data = target_labels(data, m.attributes, num, seed)
    # data vocabulary indices -> the model's vocabulary indices (the same values, perhaps in another order)
    asked = np.stack([[m.vocab[a].index(data.vocab[a][j]) for j in asked_data[:, i]]
                      for i, a in enumerate(m.attributes)], 1)
    val = data.indices(split)
    clf_cols = [data.attributes.index(a) for a in classifier.attributes if a in data.attributes]
    real_acc = classifier_accuracy(classifier, np.asarray(data.images[val]),
                                   data.labels[val][:, clf_cols].astype(np.int64))
    real = None
    if with_fid:
        extractor = extractor or InceptionFeatures(pipe.device, progress=progress)
        real = reference_stats(reference, split, pipe.codec.image_size, cache_dir=cache_dir, crop=d.crop,
                               hf_config=d.hf_config, extractor=extractor, progress=progress)
    rows = []
    for scaled in requests:
        images = generate(pipe, scaled, labels=torch.from_numpy(asked), progress=progress)
        row = {"guidance": scaled.guidance, "agreement": agreement(classifier, images, asked, m.attributes, m.vocab)}
        if real is not None:
            row.update(evaluate_images(images, real, extractor=extractor, with_face_rate=False, progress=progress))
        rows.append(row)
    return {"classifier_accuracy_real": real_acc, "rows": rows, "num": num, "sampler": request.sampler,
            "steps": request.steps,
            "model": str(pipe.source), "reference": reference, "split": split}


def format_agreement(result: dict) -> str:
    names = list(result["classifier_accuracy_real"])
    head = ["guidance", *[f"{n} agree" for n in names], "fid"]
    lines = ["  ".join(f"{h:>12s}" for h in head)]
    lines.append("  ".join(f"{x:>12s}" for x in ["real faces", *[f"{result['classifier_accuracy_real'][n]:.3f}"
                                                                  for n in names], "-"]))
    for r in result["rows"]:
        cells = [f"{r['guidance']:g}", *[f"{r['agreement'].get(n, float('nan')):.3f}" for n in names],
                 f"{r['fid']:.2f}" if "fid" in r else "-"]
        lines.append("  ".join(f"{x:>12s}" for x in cells))
    return "\n".join(lines)


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
