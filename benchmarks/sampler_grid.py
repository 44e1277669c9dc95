"""One row of faces per (model, sampler), same seeds in every row, labelled: a picture for the README.

    python benchmarks/sampler_grid.py --out docs/eps-vs-v.png --num 12 --steps 50 \\
        --row runs/qs-eps:ddpm --row runs/qs-eps:ddim --row runs/qs-v:ddpm --row runs/qs-v:ddim
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from ddpm_faces.images import make_grid
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline

LABEL_WIDTH = 150


def labelled_row(images: np.ndarray, label: str, scale: int) -> Image.Image:
    strip = Image.fromarray(make_grid(images, nrow=len(images)))
    strip = strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST)
    row = Image.new("RGB", (LABEL_WIDTH + strip.width, strip.height), "white")
    row.paste(strip, (LABEL_WIDTH, 0))
    ImageDraw.Draw(row).text((6, strip.height // 2 - 6), label, fill="black")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", action="append", required=True, metavar="CHECKPOINT:SAMPLER")
    p.add_argument("--num", type=int, default=12)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    for spec in args.row:
        checkpoint, sampler = spec.rsplit(":", 1)
        pipe = load_pipeline(checkpoint)
        images = generate(pipe, SamplingRequest(num=args.num, seed=args.seed, sampler=sampler, steps=args.steps),
                          progress=False)
        label = f"{pipe.cfg.diffusion.prediction}-prediction\n{sampler}, {args.steps} steps"
        rows.append(labelled_row(images, label, args.scale))
    out = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        out.paste(row, (0, sum(r.height for r in rows[:i])))
    out.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
