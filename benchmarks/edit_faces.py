"""Do edited faces stay faces? Face rate, detector score, foreign colours and the person kept, across guidance,
the guidance interval and strength, with and without --invert; and inpainting seams against --resample.

    python benchmarks/edit_faces.py --threads 1 --markdown --out benchmarks/results/edit-faces.json

Part 1 (guidance). For --num val faces of --data (spread evenly over those with age and gender labelled), each
face is edited as `ddpm-faces edit --age BIN` does by default: the asked age bin is a far one (at least 3 bins
from the photo's own label, benchmarks/edit_strength.py's edit_targets), and every attribute not asked for is the
photo's own as the bundled classifier reads it (`--unasked photo`). For each strength x guidance x interval x
invert it reports:

- faces: the share the project's face detector finds (score >= 70), its mean score and its 10th percentile (a
  broken face lowers the score before it drops below the threshold);
- foreign colours: the share of the edit's pixels farther than --colour-gap grey levels (RGB L2) from every
  pixel of the photo; red and pink blotches and smears are colours the photo never had (asked changes such as
  grey hair add some too: compare across guidance, not against 0);
- the person kept: PSNR between photo and edit at 16 px (benchmarks/edit_strength.py's psnr_small);
- the asked age read by the attribute classifier.

Intervals: "band" is the default guidance band (GUIDANCE_BAND of T: an edit that starts below it is not guided
at all), "all" guides every step (--guidance-interval 0 T-1).

Part 2 (seams). Each face inpainted with the lower-face mask (benchmarks/edit_strength.py's inpaint_mask; its own
attributes) at --mask-strengths, for each --resample: the seam is the mean absolute grey-level step between
4-neighbour pixels that straddle the mask's edge, divided by the same mean over neighbour pairs on either side of
it (both redrawn, or both kept, within 2 px of the edge); 1 is seamless, and the photos themselves give the
floor. With the time per edit.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_faces.data import prepare_dataset
from ddpm_faces.diffusion import DEFAULT_EDIT_STEPS, DEFAULT_SAMPLER
from ddpm_faces.evaluation.attributes import keep_photo_attributes, load_classifier
from ddpm_faces.photos.faces import MIN_SCORE, face_scores
from ddpm_faces.hardware import machine_info, resolve_precision
from ddpm_faces.pipeline import SAMPLING_PRECISIONS, SamplingRequest, load_pipeline


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


strength_bench = _sibling("edit_strength")
edit_one, edit_targets, psnr_small, val_faces, inpaint_mask = (
    strength_bench.edit_one, strength_bench.edit_targets, strength_bench.psnr_small, strength_bench.val_faces,
    strength_bench.inpaint_mask)
PSNR_CAP = strength_bench.PSNR_CAP
COLOUR_GAP = 40.0           # grey levels (RGB L2): farther than this from every photo pixel is a colour it never had
SEAM_BAND = 2               # px on either side of the mask's edge whose neighbour steps are the reference


# --------------------------------------------------------------------------- pure measures (tested)


def foreign_colours(photo: np.ndarray, edit: np.ndarray, gap: float = COLOUR_GAP) -> float:
    """Share of `edit`'s pixels (H, W, 3 uint8) farther than `gap` (RGB L2, grey levels) from every pixel of
    `photo`: the colours the edit brought that the photo never had."""
    p = torch.from_numpy(photo.reshape(-1, 3).astype(np.float32))
    e = torch.from_numpy(edit.reshape(-1, 3).astype(np.float32))
    nearest = torch.cdist(e, p).min(dim=1).values
    return float((nearest > gap).float().mean())


def seam_ratio(image: np.ndarray, mask: np.ndarray, band: int = SEAM_BAND) -> float:
    """Mean |grey-level step| between 4-neighbours straddling the edge of `mask` (H, W; 1 = redrawn) over the
    same mean for neighbours on one side of it, within `band` px of the edge: ~1 where the edge does not show,
    > 1 where the redrawn region meets the kept one with a step (a seam)."""
    grey = image.astype(np.float64).mean(-1)
    m = mask > 0.5
    near = np.zeros_like(m)
    for dy in range(-band, band + 1):              # pixels within `band` (Chebyshev) of a pixel across the edge
        for dx in range(-band, band + 1):
            shifted = np.roll(np.roll(m, dy, 0), dx, 1)
            near |= shifted != m
    across, within = [], []
    for axis in (0, 1):
        step = np.abs(np.diff(grey, axis=axis))
        a, b = (m[1:], m[:-1]) if axis == 0 else (m[:, 1:], m[:, :-1])
        n = (near[1:] & near[:-1]) if axis == 0 else (near[:, 1:] & near[:, :-1])
        across.append(step[a != b])
        within.append(step[(a == b) & n])
    across, within = np.concatenate(across), np.concatenate(within)
    if not across.size or not within.size:
        raise ValueError("the mask has no edge inside the image")
    return float(across.mean() / max(within.mean(), 1e-6))


# --------------------------------------------------------------------------- the measurement


def guidance_rows(pipe, clf, photos, own_age, own_gender, vocab, args, out, result) -> None:
    asked_age = [vocab["age"][edit_targets(a, g, i, len(vocab["age"]), len(vocab["gender"]))[0]]
                 for i, (a, g) in enumerate(zip(own_age, own_gender))]
    base = SamplingRequest(num=1, seed=args.seed, sampler=args.sampler, steps=args.steps, precision=args.precision,
                           unasked="photo")
    requests = [keep_photo_attributes(base.replace(attributes={"age": asked_age[i]}), pipe.cfg.model.vocab, photos[i], clf)[0]
                for i in range(len(photos))]
    top = pipe.schedule.T - 1
    for strength in args.strengths:
        for invert in args.inverts:
            for interval in args.intervals:
                for guidance in args.guidances:
                    if guidance == 1 and interval != args.intervals[0]:
                        continue                   # guidance 1 is unguided whatever the interval
                    edits = np.empty_like(photos)
                    start = time.perf_counter()
                    for i in tqdm(range(len(photos)), leave=False,
                                  desc=f"s {strength:g} w {guidance:g} {interval}{' inv' if invert else ''}"):
                        r = requests[i].replace(guidance=guidance,
                                                guidance_interval=(0, top) if interval == "all" else None)
                        edits[i] = edit_one(pipe, photos[i], r, strength=strength, invert=invert, index=i)[0]
                    seconds = (time.perf_counter() - start) / len(photos)
                    scores = face_scores(edits)
                    pred = clf.predict(edits)
                    row = {"strength": strength, "invert": invert, "interval": interval, "guidance": guidance,
                           "face_rate": float((scores >= MIN_SCORE).mean()),
                           "score_mean": float(scores.mean()), "score_p10": float(np.percentile(scores, 10)),
                           "foreign_colours": float(np.mean([foreign_colours(p, e) for p, e in zip(photos, edits)])),
                           "psnr16": float(np.minimum(psnr_small(photos, edits), PSNR_CAP).mean()),
                           "age_as_asked": float(np.mean([clf.vocab["age"][p] == a
                                                          for p, a in zip(pred["age"], asked_age)])),
                           "seconds_per_edit": round(seconds, 3)}
                    result["guidance_rows"].append(row)
                    out.write_text(json.dumps(result, indent=2))
                    print(format_guidance(row), flush=True)


def seam_rows(pipe, clf, photos, vocab, args, out, result) -> None:
    mask = inpaint_mask(photos.shape[1])
    result["seam_photos"] = float(np.mean([seam_ratio(p, mask) for p in photos]))
    base = SamplingRequest(num=1, seed=args.seed, sampler=args.sampler, steps=args.steps, precision=args.precision,
                           unasked="photo")
    requests = [keep_photo_attributes(base, pipe.cfg.model.vocab, photos[i], clf)[0] for i in range(len(photos))]
    for strength in args.mask_strengths:
        for resample in args.resamples:
            edits = np.empty_like(photos)
            start = time.perf_counter()
            for i in tqdm(range(len(photos)), leave=False, desc=f"mask s {strength:g} resample {resample}"):
                plan_args = dict(strength=strength, invert=False, index=i, mask=mask)
                edits[i] = edit_one_resampled(pipe, photos[i], requests[i], resample=resample, **plan_args)[0]
            seconds = (time.perf_counter() - start) / len(photos)
            scores = face_scores(edits)
            row = {"strength": strength, "resample": resample,
                   "seam": float(np.mean([seam_ratio(e, mask) for e in edits])),
                   "face_rate": float((scores >= MIN_SCORE).mean()), "score_mean": float(scores.mean()),
                   "seconds_per_edit": round(seconds, 3)}
            result["seam_rows"].append(row)
            out.write_text(json.dumps(result, indent=2))
            print(f"mask strength {strength:g} resample {resample}: seam {row['seam']:.2f} (photos "
                  f"{result['seam_photos']:.2f})  faces {row['face_rate']:.1%}  {seconds:.2f} s/edit", flush=True)


def edit_one_resampled(pipe, image, request, *, resample: int, strength: float, invert: bool, index: int, mask):
    from ddpm_faces.images import to_model_range
    from ddpm_faces.pipeline import EditPlan, EditRequest, generate

    photo = to_model_range(torch.from_numpy(np.array(image, dtype=np.uint8))[None])
    edit = EditRequest(strength=strength, mask=torch.from_numpy(mask)[None, None], invert=invert, resample=resample)
    plan = EditPlan(pipe, photo, edit, seed=request.seed)
    return generate(pipe, request, plan=plan, first_index=index, progress=False)


def format_guidance(r: dict) -> str:
    return (f"strength {r['strength']:.1f} {'invert' if r['invert'] else 'sdedit'} guidance {r['guidance']:g} "
            f"({r['interval']}): faces {r['face_rate']:.1%} score {r['score_mean']:.1f} (p10 {r['score_p10']:.1f})  "
            f"foreign colours {r['foreign_colours']:.2%}  PSNR16 {r['psnr16']:.2f}  age {r['age_as_asked']:.1%}  "
            f"{r['seconds_per_edit']:.2f} s/edit")


def markdown(result: dict) -> str:
    lines = ["| strength | start | guided | guidance | faces | detector score (mean / 10th pct) | foreign colours | "
             "PSNR at 16 px (dB) | age read as asked |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(result["guidance_rows"], key=lambda r: (r["invert"], r["strength"], r["interval"], r["guidance"])):
        guided = "–" if r["guidance"] == 1 else ("in the band" if r["interval"] == "band" else "every step")
        lines.append(f"| {r['strength']:.1f} | {'inverted' if r['invert'] else 'noised'} | {guided} | "
                     f"{r['guidance']:g} | {100 * r['face_rate']:.0f}% | {r['score_mean']:.1f} / {r['score_p10']:.1f} | "
                     f"{100 * r['foreign_colours']:.2f}% | {r['psnr16']:.1f} | {100 * r['age_as_asked']:.0f}% |")
    if result.get("seam_rows"):
        lines += ["", f"| mask strength | --resample | seam (photos: {result['seam_photos']:.2f}) | faces | s / edit |",
                  "|---:|---:|---:|---:|---:|"]
        for r in result["seam_rows"]:
            lines.append(f"| {r['strength']:g} | {r['resample']} | {r['seam']:.2f} | {100 * r['face_rate']:.0f}% | "
                         f"{r['seconds_per_edit']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="faces32", help="default: the bundled 32 px model (a cascade's stage 1)")
    p.add_argument("--data", default="../shared/data/faces")
    p.add_argument("--num", type=int, default=100, help="val faces (default 100)")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--guidances", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 5.0])
    p.add_argument("--intervals", nargs="+", default=["band", "all"], choices=["band", "all"])
    p.add_argument("--inverts", nargs="+", type=lambda v: v == "invert", default=[False, True],
                   help="noised and/or invert (default both)")
    p.add_argument("--mask-strengths", type=float, nargs="*", default=[0.8, 1.0])
    p.add_argument("--resamples", type=int, nargs="+", default=[1, 2, 5, 10])
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=DEFAULT_EDIT_STEPS, help=f"default {DEFAULT_EDIT_STEPS}, edit's")
    p.add_argument("--precision", default="auto", choices=SAMPLING_PRECISIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-guidance", action="store_true", help="only the seams")
    p.add_argument("--out", default="benchmarks/results/edit-faces.json")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.checkpoint)
    if not {"age", "gender"} <= set(pipe.cfg.model.attributes):
        raise SystemExit(f"{pipe.source} is not conditioned on age and gender")
    data = prepare_dataset(args.data, pipe.codec.image_size, progress=False)
    clf = load_classifier()
    rows, _ = val_faces(data, args.data, args.num)
    photos = np.asarray(data.images[rows])
    own_age, own_gender = (data.labels[rows, data.attributes.index(a)].astype(int) for a in ("age", "gender"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": str(pipe.source), "step": pipe.step, "num": len(rows), "sampler": args.sampler,
              "steps": args.steps, "precision": args.precision, "seed": args.seed, "threads": args.threads,
              "machine": machine_info(precision=resolve_precision(args.precision)), "colour_gap": COLOUR_GAP,
              "photos": {"score_mean": float(face_scores(photos).mean()),
                         "face_rate": float((face_scores(photos) >= MIN_SCORE).mean())},
              "guidance_rows": [], "seam_rows": []}
    if not args.skip_guidance:
        guidance_rows(pipe, clf, photos, own_age, own_gender, data.vocab, args, out, result)
    if args.mask_strengths:
        seam_rows(pipe, clf, photos, data.vocab, args, out, result)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if args.markdown:
        print(markdown(result))


if __name__ == "__main__":
    main()
