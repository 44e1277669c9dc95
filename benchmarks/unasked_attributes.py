"""What `ddpm-faces sample` draws when no attribute is asked for: unguided faces, or attribute combinations
drawn from the training data's frequencies and guided.

    python benchmarks/unasked_attributes.py --models cascade128 faces32 --num 500 \\
        --out benchmarks/results/unasked-attributes.json

For each model and each setting (--settings, "UNASKED:GUIDANCE"; default model:1 data:1 data:2 data:3), --num
faces with the default sampler and steps and no attribute options, enlarged to --resolution (bicubic) where
smaller, against the val split at --resolution: FID, KID, precision, recall (the project's Inception features)
and the face rate (the face detector); and the time for 4 faces on one thread (median of 3, after a warm-up).
The same seeds for every setting: with "model" every face starts from the same noise as with "data".
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ddpm_faces.evaluation import InceptionFeatures
from ddpm_faces.evaluation.reference import evaluate_images, reference_stats
from ddpm_faces.hardware import machine_info
from ddpm_faces.images import enlarge
from ddpm_faces.io import atomic_file
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline


def time_four(pipe, request: SamplingRequest) -> float:
    request = request.replace(num=4)
    generate(pipe, request, progress=False)                       # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        generate(pipe, request, progress=False)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["cascade128"])
    p.add_argument("--settings", nargs="+", default=["model:1", "data:1", "data:2", "data:3"])
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default="../shared/data/faces")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only at timesteps LO..HI (every guided setting)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    extractor = InceptionFeatures("cpu", progress=False)
    real = reference_stats(args.reference, "val", args.resolution, extractor=extractor, progress=True)
    results = []
    for source in args.models:
        pipe = load_pipeline(source)
        for setting in args.settings:
            unasked, guidance = setting.split(":")
            request = SamplingRequest(num=args.num, seed=args.seed, unasked=unasked, guidance=float(guidance),
                                      precision=args.precision,
                                      guidance_interval=tuple(args.guidance_interval) if args.guidance_interval
                                      else None)
            start = time.perf_counter()
            images = generate(pipe, request, progress=True)
            sampling = time.perf_counter() - start
            metrics = evaluate_images(enlarge(images, args.resolution), real, extractor=extractor,
                                      with_face_rate=True, progress=False)
            row = {"model": source, "unasked": unasked, "guidance": float(guidance),
                   "guidance_interval": request.guidance_interval,
                   "request": request.cli_flags(),
                   **{k: metrics[k] for k in ("fid", "kid_mean", "precision", "recall", "face_rate", "num_fake")},
                   "seconds_4_faces_1_thread": round(time_four(pipe, request), 3),
                   "seconds_per_face_sampling": round(sampling / args.num, 4)}
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.out:
        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps({"machine": machine_info(), "num": args.num, "seed": args.seed,
                                       "reference": f"{args.reference} val at {args.resolution} px",
                                       "results": results}, indent=1))


if __name__ == "__main__":
    main()
