"""Models side by side at 128 px: sample quality, attribute agreement, size and speed, one grid each.

    python benchmarks/side_by_side.py --models bundled32 runs/latent128 --num 500 \\
        --out benchmarks/results/side-by-side.json --grid-dir docs

For every model (a run, an export, or `bundled32` for the bundled 32 px model): --num conditional samples with
DPM-Solver++ (--steps, default 8; a cascade's stage 2 its own) at guidance 3, in --precision (auto), asking for attribute combinations drawn from the val labels (the
same for every model); samples smaller than --resolution are enlarged with bicubic interpolation. Against the
val split at --resolution: FID, KID, precision, recall (the project's Inception features), the face rate (the
face detector) and the share of samples in which the bundled attribute classifier reads the asked age, gender
and race. Also: parameters (the denoiser; with the decoder for latent models), the weight files' size, and
the time for 4 faces on one thread (median of 3, after a warm-up). A grid per model at the same seeds, labels
and size (grid-<name>.png).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpm_faces.hardware import machine_info, resolve_precision
from ddpm_faces.data import prepare_dataset
from ddpm_faces.evaluation import InceptionFeatures
from ddpm_faces.evaluation.attributes import agreement, load_classifier, target_labels
from ddpm_faces.evaluation.reference import evaluate_images, reference_stats
from ddpm_faces.images import make_grid, save_image
from ddpm_faces.pipeline import DEFAULT_STEPS, SamplingRequest, generate, load_pipeline
from ddpm_faces.runs import find_model


def enlarge(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, size, size, 3) uint8 by bicubic interpolation (unchanged at that size)."""
    if images.shape[1] == size:
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def model_labels(pipe, data, asked_data: np.ndarray) -> np.ndarray:
    """Data-vocabulary label indices -> the model's vocabulary indices."""
    m = pipe.cfg.model
    return np.stack([[m.vocab[a].index(data.vocab[a][j]) for j in asked_data[:, i]]
                     for i, a in enumerate(m.attributes)], 1)


def weight_bytes(pipe) -> int:
    """The safetensors files of every stage."""
    return sum(p.stat().st_size for stage in pipe.stages
               for p in Path(find_model(stage.source).weights).parent.glob("*.safetensors"))


def parameters(pipe) -> dict:
    """Parameters that draw a face: every stage's denoiser (stage 1 first) and the decoder."""
    out = {}
    for k, stage in enumerate(pipe.stages):
        out["denoiser" if k == 0 else f"denoiser_stage{k + 1}"] = sum(p.numel() for p in stage.net.parameters())
    autoencoder = getattr(pipe.codec, "autoencoder", None)
    if autoencoder is not None:
        out["decoder"] = sum(p.numel() for p in autoencoder.decoder.parameters())
    return out


def time_four(pipe, labels: torch.Tensor, request: SamplingRequest) -> float:
    request = request.replace(num=4, seed=0)
    generate(pipe, request, labels=labels[:4], progress=False)                          # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate(pipe, request, labels=labels[:4], progress=False)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="runs, exports, or bundled models' names")
    p.add_argument("--names", nargs="+", help="a short name per model (default: the folder names)")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--reference", default="../shared/data/faces")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="stage 1's steps (a cascade's stage 2 takes its own)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--sr-steps", type=int, help="a cascade's stage 2: steps (default: its config's)")
    p.add_argument("--sr-level", type=int, help="a cascade's stage 2: augmentation level (default: its config's)")
    p.add_argument("--grid-faces", type=int, default=16)
    p.add_argument("--out", type=Path)
    p.add_argument("--grid-dir", type=Path)
    p.add_argument("--merge", action="store_true", help="add these models to the ones already in --out (same "
                                                         "protocol: the same --num, --seed, --guidance, --steps)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.names or [Path(m).name for m in args.models]

    extractor = InceptionFeatures("cpu", progress=True)
    real = reference_stats(args.reference, "val", args.resolution, extractor=extractor, progress=True)
    data = prepare_dataset(args.reference, args.resolution, progress=False)
    attributes = ["age", "gender", "race"]
    asked_data = target_labels(data, attributes, args.num, args.seed)
    classifier = load_classifier()
    results = {}
    for name, source in zip(names, args.models):
        pipe = load_pipeline(source)
        assert pipe.cfg.model.attributes == attributes, f"{source}: a model conditional on {attributes} is needed"
        labels = torch.from_numpy(model_labels(pipe, data, asked_data))
        request = SamplingRequest(num=args.num, seed=args.seed, guidance=args.guidance, steps=args.steps,
                                  precision=args.precision)
        if pipe.superres:
            request = request.replace(sr_steps=args.sr_steps, sr_level=args.sr_level)
        start = time.perf_counter()
        images = generate(pipe, request, labels=labels, progress=True)
        sampling = time.perf_counter() - start
        agree = agreement(classifier, images, labels.numpy(), attributes, pipe.cfg.model.vocab)
        big = enlarge(images, args.resolution)
        metrics = evaluate_images(big, real, extractor=extractor, with_face_rate=True, progress=True)
        results[name] = {"model": source, "step": pipe.step, "native_resolution": int(images.shape[1]),
                         "request": request.cli_flags(attributes=False),
                         **{k: metrics[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall",
                                                    "face_rate", "num_fake", "num_real")},
                         "agreement": agree, "parameters": parameters(pipe),
                         "weight_bytes": weight_bytes(pipe),
                         "seconds_4_faces_1_thread": round(time_four(pipe, labels, request), 3),
                         "seconds_per_face_sampling": round(sampling / args.num, 4)}
        print(json.dumps({name: results[name]}), flush=True)
        if args.grid_dir:
            args.grid_dir.mkdir(parents=True, exist_ok=True)
            save_image(make_grid(big[:args.grid_faces], nrow=int(args.grid_faces ** 0.5)),
                       args.grid_dir / f"grid-{name}.png")
    if args.out and args.merge and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        same = all(earlier.get(k) == v for k, v in (("num", args.num), ("guidance", args.guidance),
                                                       ("steps", args.steps)))
        assert same, f"{args.out} was measured with another protocol: not merged"
        results = {**earlier["models"], **results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"reference": args.reference, "split": "val", "resolution": args.resolution,
                                        "num": args.num, "guidance": args.guidance, "sampler": "dpmpp-2m",
                                        "steps": args.steps, "threads": args.threads, "models": results,
                                        "machine": machine_info(threads=args.threads,
                                                                precision=resolve_precision(args.precision))},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
