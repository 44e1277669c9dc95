"""Seconds for one edit of one photo, from the photo file to the edited face: the 32 px model and a latent one.

    python benchmarks/edit_speed.py --threads 1 --out benchmarks/results/edit-speed-cpu-1thread.json \\
        [--latent runs/latent128]

One edit = open the photo, find the face and frame it (photos/framing.py: detection on a 320 px copy), encode
it, strength 0.6 of 20 DPM-Solver++ steps (12 run) with guidance 3 in bf16 asking for an age bin and a gender,
decode: what `ddpm-faces edit --strength 0.6 --steps 20 --precision bf16` does after loading the model (loading is
not timed). The photo is the first of ../shared/data/fairface-sample/train/ with one face (or --photo); without it a
face is drawn and framed by its centre square (detect=False), and the JSON says so. The median of --repeats runs
after one warm-up, each with and without --invert (which adds 12 unguided network calls), for the bundled model and
for --latent (a latent model's run, export or checkpoint) or --latent-untrained (a config such as latent128 with
untrained weights: the same work, so the same time, before any latent model is trained). Budgets from the issue:
1 s for the 32 px model, 2 s for the 128 px latent one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ddpm_faces.hardware import machine_info
from ddpm_faces.images import to_model_range
from ddpm_faces.errors import UserError
from ddpm_faces.photos.framing import frame_photo, open_photo
from ddpm_faces.pipeline import EditPlan, EditRequest, Pipeline, SamplingRequest, generate, load_pipeline

SAMPLE_PHOTOS = Path("../shared/data/fairface-sample/train")
BUDGETS = {"pixel": 1.0, "latent": 2.0}          # seconds per edit, from the issue
ASK = {"age": "60-69", "gender": "Male"}


def first_photo(folder: Path = SAMPLE_PHOTOS, look_at: int = 20) -> Path | None:
    """Of the first `look_at` photos of a FairFace-layout folder in numeric order (1.jpg, 5.jpg, ...), the first in
    which the detector finds exactly one face (else the first photo); None without photos."""
    if not folder.is_dir():
        return None
    photos = sorted(folder.glob("*.jpg"), key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0,
                                                         p.name))
    for path in photos[:look_at]:
        try:
            if frame_photo(open_photo(path), 32).faces == 1:
                return path
        except UserError:
            continue
    return photos[0] if photos else None


def drawn_face(size: int = 448) -> Image.Image:
    """A plain drawn face (skin oval, eyes, brows, nose, mouth) on a grey background, for machines without photos."""
    img = Image.new("RGB", (size, size), (120, 130, 140))
    d = ImageDraw.Draw(img)
    s = size / 100
    d.ellipse([30 * s, 18 * s, 70 * s, 86 * s], fill=(214, 170, 140))
    for x in (40, 60):
        d.ellipse([(x - 5) * s, 42 * s, (x + 5) * s, 48 * s], fill=(250, 250, 250))
        d.ellipse([(x - 2) * s, 43 * s, (x + 2) * s, 47 * s], fill=(60, 40, 30))
        d.line([(x - 6) * s, 38 * s, (x + 6) * s, 37 * s], fill=(70, 50, 40), width=max(1, round(1.5 * s)))
    d.line([50 * s, 48 * s, 48 * s, 60 * s, 52 * s, 61 * s], fill=(170, 120, 100), width=max(1, round(s)))
    d.arc([40 * s, 62 * s, 60 * s, 74 * s], 20, 160, fill=(150, 60, 60), width=max(1, round(1.5 * s)))
    return img


def one_edit(pipe: Pipeline, source: Path | None, request: SamplingRequest, strength: float, invert: bool) -> dict:
    """Seconds of the framing and of the edit (encode, sample, decode) of one photo."""
    start = time.perf_counter()
    photo = open_photo(source) if source is not None else drawn_face()
    framed = frame_photo(photo, pipe.codec.image_size, detect=source is not None)
    framed_at = time.perf_counter()
    x = to_model_range(torch.from_numpy(framed.image.copy())[None])
    plan = EditPlan(pipe, x, EditRequest(strength=strength, invert=invert), seed=request.seed)
    image = generate(pipe, request, plan=plan, progress=False)
    end = time.perf_counter()
    assert image.shape[0] == 1
    return {"frame_s": framed_at - start, "edit_s": end - framed_at, "total_s": end - start, "faces": framed.faces}


def time_model(pipe: Pipeline, kind: str, label: str, source: Path | None, args) -> list[dict]:
    request = SamplingRequest(num=1, seed=0, steps=args.steps, guidance=args.guidance, precision="auto",
                              attributes=ASK if pipe.conditional else {})
    rows = []
    for invert in (False, True):
        one_edit(pipe, source, request, args.strength, invert)                       # warm-up
        runs = [one_edit(pipe, source, request, args.strength, invert) for _ in range(args.repeats)]
        row = {"model": label, "kind": kind, "image_size": pipe.codec.image_size, "invert": invert,
               **{f"median_{k}": statistics.median(r[k] for r in runs) for k in ("frame_s", "edit_s", "total_s")},
               "min_total_s": min(r["total_s"] for r in runs), "max_total_s": max(r["total_s"] for r in runs),
               "faces_found": runs[-1]["faces"], "budget_s": BUDGETS[kind]}
        row["within_budget"] = row["median_total_s"] <= row["budget_s"]
        rows.append(row)
        print(f"{label:28s} {pipe.codec.image_size:4d} px {'--invert' if invert else 'sdedit  '}  "
              f"median {row['median_total_s']:.3f} s (framing {row['median_frame_s']:.3f} s, edit "
              f"{row['median_edit_s']:.3f} s; {row['min_total_s']:.3f}-{row['max_total_s']:.3f})  budget "
              f"{row['budget_s']:g} s: {'within' if row['within_budget'] else 'OVER'}", flush=True)
    return rows


def untrained_latent(config: str) -> Pipeline:
    """A latent Pipeline of `config` (e.g. latent128) with untrained UNet and autoencoder: timing only."""
    from ddpm_faces.config import load_config
    from ddpm_faces.models.autoencoder import Autoencoder
    from ddpm_faces.models.codec import LatentCodec
    from ddpm_faces.pipeline import build_model, read_config

    cfg = load_config(config)
    if not cfg.codec.autoencoder:
        raise SystemExit(f"--latent-untrained {config}: not a latent config (no codec.autoencoder)")
    if cfg.model.attributes and not cfg.model.vocab:          # training fills them in: take the bundled model's
        bundled = read_config(None).model.vocab
        cfg.model.vocab = {a: list(bundled[a]) for a in cfg.model.attributes}
    torch.manual_seed(0)
    codec = LatentCodec(Autoencoder(cfg.autoencoder)).eval()
    return Pipeline(build_model(cfg).eval(), cfg, Path(f"untrained {config}"), codec=codec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--checkpoint", help="the pixel model (default: the bundled 32 px one)")
    p.add_argument("--latent", help="a latent model's run, export or checkpoint, e.g. runs/latent128")
    p.add_argument("--latent-untrained", metavar="CONFIG",
                   help="also time this latent config (e.g. latent128) with untrained weights")
    p.add_argument("--photo", help=f"the photo (default: the first of {SAMPLE_PHOTOS}/)")
    p.add_argument("--out", help="write the numbers as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    source = Path(args.photo) if args.photo else first_photo()
    if source is None:
        print(f"no photo in {SAMPLE_PHOTOS}/: a drawn face, framed by its centre square (detect=False)")
    models = [(load_pipeline(args.checkpoint), "pixel", args.checkpoint or "bundled")]
    if args.latent:
        models.append((load_pipeline(args.latent), "latent", args.latent))
    if args.latent_untrained:
        models.append((untrained_latent(args.latent_untrained), "latent", f"{args.latent_untrained} (untrained)"))
    rows = []
    for pipe, kind, label in models:
        rows += time_model(pipe, kind, label, source, args)
    used = SamplingRequest().validate(models[0][0]).precision
    result = {"machine": machine_info(precision=used), "threads": torch.get_num_threads(), "steps": args.steps,
              "strength": args.strength, "guidance": args.guidance, "precision": used, "repeats": args.repeats,
              "photo": str(source) if source is not None else "drawn face, detect=False",
              "detection": source is not None, "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
