"""How few steps each bundled model needs: FID / KID of dpmpp-2m and unipc at 5 to 20 steps, on one thread.

    python benchmarks/step_sweep.py --num 500 --out benchmarks/results/step-sweep.json

For each model (faces32 first, then latent128), sampler and step count, generates --num images with the
default SamplingRequest (no attributes; image i from seed + i, the same seeds in every row) and scores them
against the val split of --reference at the model's image size, as benchmarks/samplers.py does. Rows already
in the JSON file are kept, so an interrupted run continues where it stopped; the file is rewritten atomically
after every row. Prints a Markdown table and, per model, the fewest steps whose FID stays within --within
(2%) of dpmpp-2m at 20 steps. FID of a few hundred samples is biased upward: compare rows of equal --num only.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):   # numpy / scipy's BLAS (FID's sqrtm)
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402

from ddpm_faces.evaluation import InceptionFeatures, evaluate_images, reference_stats  # noqa: E402
from ddpm_faces.hardware import machine_info  # noqa: E402
from ddpm_faces.io import atomic_file  # noqa: E402
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline  # noqa: E402

MODELS = ("faces32", "latent128")
SAMPLERS = ("dpmpp-2m", "unipc")
STEPS = (5, 8, 10, 15, 20)
BASELINE = ("dpmpp-2m", 20)                       # the default sampler and steps the others are held to


def write_rows(path: Path, rows: list[dict]) -> None:
    """The whole JSON file, written to a temporary file beside it and moved into place (os.replace)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rows, indent=2) + "\n")


def key(row: dict) -> tuple:
    return row["model"], row["sampler"], row["steps"], row["num"], row["seed"], row.get("requested_precision", "auto")


def run(args) -> list[dict]:
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {key(r) for r in rows}
    extractor = InceptionFeatures()
    for model in args.models:
        todo = [(s, n) for s in args.samplers for n in args.steps
                if (model, s, n, args.num, args.seed, args.precision) not in done]
        if not todo:
            continue
        pipe = load_pipeline(model)
        start = time.perf_counter()
        real = reference_stats(args.reference, "val", pipe.codec.image_size, extractor=extractor,
                               cache_dir=args.cache_dir, progress=False)
        print(f"{model}: reference statistics of {real.count} val images at {pipe.codec.image_size} px "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        for sampler, steps in todo:
            request = SamplingRequest(num=args.num, seed=args.seed, sampler=sampler, steps=steps,
                                      batch_size=args.batch_size, precision=args.precision).validate(pipe)
            start = time.perf_counter()
            images = generate(pipe, request, progress=False)
            sample_seconds = time.perf_counter() - start
            start = time.perf_counter()
            metrics = evaluate_images(images, real, extractor=extractor)
            eval_seconds = time.perf_counter() - start
            rows.append({"model": model, "sampler": sampler, "steps": steps, "nfe": request.nfe,
                         "num": args.num, "seed": args.seed, "spacing": request.timestep_spacing,
                         "requested_precision": args.precision,
                         "fid": metrics["fid"], "kid": metrics["kid_mean"], "kid_std": metrics["kid_std"],
                         "precision_pr": metrics["precision"], "recall": metrics["recall"],
                         "face_rate": metrics["face_rate"], "num_real": metrics["num_real"],
                         "sample_seconds": round(sample_seconds, 1), "eval_seconds": round(eval_seconds, 1),
                         "machine": machine_info(threads=torch.get_num_threads(), precision=request.precision)})
            write_rows(out, rows)
            print(f"{model} {sampler} {steps} steps: FID {metrics['fid']:.2f}, KID {metrics['kid_mean']:.4f}, "
                  f"sampling {sample_seconds:.0f} s, scoring {eval_seconds:.0f} s", flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per (model, steps); for each sampler its FID and KID (x 1000); the lower FID of a line in bold."""
    head = " | ".join(f"{s} FID | {s} KID x1000" for s in SAMPLERS)
    lines = [f"| model | steps | {head} | sample seconds ({' / '.join(SAMPLERS)}) |",
             "|---" * (2 + 2 * len(SAMPLERS) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        for steps in sorted({r["steps"] for r in rows if r["model"] == model}):
            cells = {r["sampler"]: r for r in rows if r["model"] == model and r["steps"] == steps}
            best = min(r["fid"] for r in cells.values())
            parts, seconds = [], []
            for sampler in SAMPLERS:
                r = cells.get(sampler)
                if r is None:
                    parts += ["–", "–"]
                    seconds.append("–")
                    continue
                fid = f"{r['fid']:.2f}"
                parts += [f"**{fid}**" if r["fid"] == best and len(cells) > 1 else fid, f"{1000 * r['kid']:.2f}"]
                seconds.append(f"{r['sample_seconds']:.0f}")
            lines.append(f"| {model} | {steps} | " + " | ".join(parts) + f" | {' / '.join(seconds)} |")
    return "\n".join(lines)


def fewest_steps(rows: list[dict], within: float) -> list[str]:
    """Per model and sampler: the fewest steps from which on every measured FID stays within `within` of
    dpmpp-2m at 20 steps (lower is within too)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = next((r for r in mine if (r["sampler"], r["steps"]) == BASELINE), None)
        if base is None:
            continue
        limit = base["fid"] * (1 + within)
        best = []
        for sampler in SAMPLERS:
            ladder = sorted((r for r in mine if r["sampler"] == sampler), key=lambda r: r["steps"])
            if not ladder:
                continue
            ok = [r for i, r in enumerate(ladder) if all(q["fid"] <= limit for q in ladder[i:])]
            if ok:
                best.append(ok[0])
                lines.append(f"{model}: {sampler} needs {ok[0]['steps']} steps (FID {ok[0]['fid']:.2f} <= "
                             f"{limit:.2f} = dpmpp-2m at 20 steps {base['fid']:.2f} + {within:.0%})")
            else:
                lines.append(f"{model}: {sampler} never stays within {within:.0%} of {base['fid']:.2f}")
        if best:
            pick = min(best, key=lambda r: (r["nfe"], r["fid"]))
            lines.append(f"{model}: fewest steps within {within:.0%} of dpmpp-2m at 20 steps: "
                         f"{pick['sampler']} at {pick['steps']} steps")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="auto", help="the network's (SamplingRequest.precision); recorded per row")
    p.add_argument("--within", type=float, default=0.02)
    p.add_argument("--reference", default="../shared/data/faces")
    p.add_argument("--cache-dir")
    p.add_argument("--out", default="benchmarks/results/step-sweep.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    rows = [r for r in rows if key(r)[3:] == (args.num, args.seed, args.precision)]
    print(markdown_table(rows))
    for line in fewest_steps(rows, args.within):
        print(line)


if __name__ == "__main__":
    main()
