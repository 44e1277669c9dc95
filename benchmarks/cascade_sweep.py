"""Choose a cascade's sampling settings by FID: the noise level its stage 2 augments stage 1's faces to, its
number of steps, and its guidance.

    python benchmarks/cascade_sweep.py --model runs/cascade128 --num 500 --out benchmarks/results/cascade-sweep.json

Stage 1 draws --num faces once (attribute combinations drawn from the val labels, guidance 3, DPM-Solver++ at
its default steps); every setting then runs stage 2 on those same faces with the same noise (what `sample`
would draw for those seeds), and is scored against the val split at 128 px: FID, KID, precision, recall.
First the levels at --steps, then the steps at the best level, then stage-2 guidance 1 and 3 at both bests.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ddpm_faces.data import prepare_dataset
from ddpm_faces.evaluation import InceptionFeatures
from ddpm_faces.evaluation.attributes import target_labels
from ddpm_faces.evaluation.reference import evaluate_images, reference_stats
from ddpm_faces.images import to_model_range
from ddpm_faces.hardware import machine_info, resolve_precision
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline
from side_by_side import model_labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--reference", default="../shared/data/faces")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=int, nargs="+", default=[0, 50, 100, 200, 300])
    p.add_argument("--steps", type=int, default=5, help="stage-2 steps while the levels are swept")
    p.add_argument("--step-counts", type=int, nargs="+", default=[3, 5, 8, 12])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cascade = load_pipeline(args.model)
    stage2 = load_pipeline(args.model, stage1=False)
    extractor = InceptionFeatures("cpu", progress=False)
    real = reference_stats(args.reference, "val", 128, extractor=extractor, progress=False)
    data = prepare_dataset(args.reference, 128, progress=False)
    asked = target_labels(data, ["age", "gender", "race"], args.num, args.seed)
    labels = torch.from_numpy(model_labels(cascade, data, asked))
    base = SamplingRequest(num=args.num, seed=args.seed, guidance=3.0)
    start = time.perf_counter()
    small = generate(cascade.previous, base, labels=labels, progress=True)
    lowres = to_model_range(torch.from_numpy(small))
    result = {"model": args.model, "num": args.num, "stage1_seconds": round(time.perf_counter() - start, 1),
              "machine": machine_info(threads=args.threads, precision=resolve_precision("auto")), "runs": []}

    def score(level: int, steps: int, guidance: float) -> float:
        for run in result["runs"]:
            if (run["level"], run["steps"], run["guidance"]) == (level, steps, guidance):
                return run["fid"]
        t0 = time.perf_counter()
        request = base.replace(sr_level=level, sr_steps=steps, sr_guidance=guidance)
        images = generate(stage2, request, labels=labels, lowres=lowres, progress=False)
        metrics = evaluate_images(images, real, extractor=extractor, progress=False)
        run = {"level": level, "steps": steps, "guidance": guidance, "seconds": round(time.perf_counter() - t0, 1),
               **{k: float(metrics[k]) for k in ("fid", "kid_mean", "precision", "recall")}}
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return run["fid"]

    best_level = min(args.levels, key=lambda lv: score(lv, args.steps, 1.0))
    best_steps = min(args.step_counts, key=lambda n: score(best_level, n, 1.0))
    best_guidance = min((1.0, 3.0), key=lambda g: score(best_level, best_steps, g))
    result["best"] = {"level": best_level, "steps": best_steps, "guidance": best_guidance}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("best", result["best"])


if __name__ == "__main__":
    main()
