"""FID, KID and face rate against the number of network evaluations (NFE), for every sampler.

    python benchmarks/samplers.py --num 500 --out benchmarks/results/samplers.json --plot docs/samplers.png

Every sampler draws the same seeds (image i from seed + i). Rows already in the JSON file are kept, so an
interrupted run continues where it stopped. The reference is the val split of --reference at the model's
resolution; FID of a few hundred samples is biased upward, so compare rows of equal --num only.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm_faces.hardware import machine_info
from ddpm_faces.diffusion import SAMPLERS, network_evaluations
from ddpm_faces.evaluation import InceptionFeatures, evaluate_images, reference_stats
from ddpm_faces.evaluation.model_eval import format_table
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline

NFES = (5, 10, 20, 50, 100, 1000)


def steps_for(sampler: str, nfe: int) -> int:
    """The most steps whose network evaluations stay within the budget `nfe` (Heun: 2 x steps - 1)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def run(args) -> list[dict]:
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["sampler"], r["nfe_budget"], r["num_fake"]) for r in rows}
    pipe = load_pipeline(args.checkpoint)
    extractor = InceptionFeatures()
    real = reference_stats(args.reference, "val", pipe.codec.image_size, extractor=extractor,
                           cache_dir=args.cache_dir)
    for nfe in args.nfe:
        for sampler in args.samplers:
            if (sampler, nfe, args.num) in done or (nfe > args.max_nfe_except_ddpm and sampler != "ddpm"):
                continue
            start = time.perf_counter()
            request = SamplingRequest(num=args.num, seed=args.seed, sampler=sampler, steps=steps_for(sampler, nfe),
                                      batch_size=args.batch_size)
            images = generate(pipe, request, progress=True)
            seconds = time.perf_counter() - start
            metrics = evaluate_images(images, real, extractor=extractor)
            steps = steps_for(sampler, nfe)
            rows.append({"sampler": sampler, "steps": steps, "nfe_budget": nfe,
                         "nfe": network_evaluations(sampler, steps), **metrics,
                         "sample_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                         "machine": machine_info(precision=request.validate(pipe).precision)})
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=2))
            print(format_table(rows[-1:]), flush=True)
    return rows


def reference_fid(rows: list[dict]) -> float | None:
    """FID of 1000-step DDPM (the reference the fast samplers are held to), if measured."""
    return next((r["fid"] for r in rows if r["sampler"] == "ddpm" and r["nfe"] == 1000), None)


def goal_lines(rows: list[dict], nfe: int = 20, within: float = 0.10) -> list[str]:
    """For each sampler, its FID at about `nfe` network calls against 1000-step DDPM's (the goal: within 10%)."""
    ref = reference_fid(rows)
    if ref is None:
        return []
    lines = []
    for sampler in SAMPLERS:
        near = [r for r in rows if r["sampler"] == sampler and r["nfe_budget"] == nfe]
        for r in near:
            gap = r["fid"] / ref - 1
            verdict = "within" if gap <= within else "outside"
            lines.append(f"{sampler} at {r['nfe']} NFE: FID {r['fid']:.1f} vs DDPM-1000 {ref:.1f} "
                         f"({gap:+.1%}, {verdict} {within:.0%})")
    return lines


def markdown_table(rows: list[dict]) -> str:
    """NFE budgets down, samplers across; each cell "FID (face rate)", the best FID of a row in bold."""
    samplers = [s for s in SAMPLERS if any(r["sampler"] == s for r in rows)]
    lines = ["| NFE | " + " | ".join(samplers) + " |", "|---" * (len(samplers) + 1) + "|"]
    for nfe in sorted({r["nfe_budget"] for r in rows}):
        cells = {r["sampler"]: r for r in rows if r["nfe_budget"] == nfe}
        best = min(r["fid"] for r in cells.values())
        row = []
        for sampler in samplers:
            r = cells.get(sampler)
            if r is None:
                row.append("–")
                continue
            fid = f"**{r['fid']:.1f}**" if r["fid"] == best and len(cells) > 1 else f"{r['fid']:.1f}"
            calls = f" [{r['nfe']}]" if r["nfe"] != nfe else ""
            row.append(f"{fid} ({r['face_rate']:.2f}){calls}")
        lines.append(f"| {nfe} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    for sampler in SAMPLERS:
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
        if mine:
            for ax, key in zip(axes, ("fid", "face_rate")):
                ax.plot([r["nfe"] for r in mine], [r[key] for r in mine], marker="o", label=sampler)
    ref = reference_fid(rows)
    if ref is not None:
        axes[0].axhspan(ref, ref * 1.1, color="grey", alpha=0.2, label="DDPM-1000 FID + 10%")
    for ax, label in zip(axes, ("FID (lower is better)", "face rate (higher is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")  # Heun's few-step FIDs are several times the others'
    axes[0].set_yticks([40, 50, 60, 80, 100, 150, 200, 300])
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="default: the bundled model")
    p.add_argument("--reference", default="../shared/data/faces")
    p.add_argument("--cache-dir")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--max-nfe-except-ddpm", type=int, default=100,
                   help="only DDPM runs above this NFE (its 1000-step FID is the reference point)")
    p.add_argument("--out", default="benchmarks/results/samplers.json")
    p.add_argument("--plot", help="also draw FID and face rate against NFE into this PNG")
    p.add_argument("--markdown", action="store_true", help="also print the table in Markdown (for the README)")
    args = p.parse_args()
    rows = run(args)
    print(format_table(sorted(rows, key=lambda r: (r["nfe"], r["sampler"]))))
    for line in goal_lines(rows):
        print(line)
    if args.markdown:
        print(markdown_table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
