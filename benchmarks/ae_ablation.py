"""What each of the autoencoder's losses buys: L1 alone, + the amplitude-spectrum term, + the patch GAN.

    python benchmarks/ae_ablation.py --data ../shared/data/faces --steps 2000 \\
        --out benchmarks/results/ae-ablation.json --picture docs/ae-ablation.png --picture-model runs/latent128

Each variant is `configs/ae128.yaml` trained from scratch for --steps steps (the same seed, crops, schedule and
one thread) under its own run name, runs/ae128-abl-<variant>; a variant whose export exists is not trained
again, and an interrupted one resumes. Each is then measured on --num val faces spread over the split at 128 px
(PSNR, SSIM, reconstruction FID, as `ddpm-faces eval --checkpoint <autoencoder>`), with its discriminator's
mean logits on photos and on reconstructions over the last 200 steps (how well it told them apart).

The picture (--picture): --picture-faces faces drawn by --picture-model (a 128 px model; the photos of the
data set stay out of the repository), each followed by its reconstruction under every variant, and a 2x
enlargement of the eyes below, where the losses differ most.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_faces.hardware import machine_info
from ddpm_faces.config import load_config
from ddpm_faces.evaluation import InceptionFeatures
from ddpm_faces.evaluation.model_eval import evaluate_codec
from ddpm_faces.images import make_grid, save_image, to_uint8
from ddpm_faces.pipeline import SamplingRequest, generate, load_codec, load_pipeline
from ddpm_faces.runs import RunFolder
from ddpm_faces.training import train

# name -> (what it is, config overrides on top of configs/ae128.yaml)
VARIANTS = {
    "l1": ("L1", {"reconstruction.fft_weight": 0.0, "reconstruction.disc_weight": 0.0}),
    "l1-fft": ("L1 + spectrum", {"reconstruction.fft_weight": 0.1, "reconstruction.disc_weight": 0.0}),
    "l1-fft-gan": ("L1 + spectrum + patch GAN", {"reconstruction.fft_weight": 0.1, "reconstruction.disc_weight": 0.5}),
}


def variant_config(name: str, data: str, steps: int, runs_dir: str):
    """configs/ae128.yaml with the variant's losses, --steps steps and, for the GAN, its term switched on
    halfway with the discriminator trained alone from the start."""
    overrides = {"name": f"ae128-abl-{name}", "train.max_steps": steps, "train.out_dir": runs_dir,
                 "train.eval_every": steps // 2, "train.sample_every": steps, **VARIANTS[name][1]}
    if overrides["reconstruction.disc_weight"]:
        overrides |= {"reconstruction.disc_start": steps // 2, "reconstruction.disc_warmup": steps // 2}
    cfg = load_config("ae128", [f"{k}={v}" for k, v in overrides.items()])
    cfg.data.source = data
    return cfg


def train_variant(cfg) -> float:
    """Train (or finish) the variant's run; seconds spent now (0 when its export was already there)."""
    folder = RunFolder(cfg.run_dir)
    if _finished(folder, cfg.train.max_steps):
        return 0.0
    start = time.perf_counter()
    train(cfg, resume=folder.latest_checkpoint() is not None, progress=True)
    return time.perf_counter() - start


def _finished(folder: RunFolder, steps: int) -> bool:
    newest = folder.latest_checkpoint()
    return newest is not None and newest.name == f"step-{steps}" and folder.export.is_dir()


def discriminator_logits(run_dir: Path, last: int = 200) -> dict | None:
    """Mean logged logits on photos and on reconstructions over the run's last `last` steps, or None."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb")).Reload()
    if "train/logits_real" not in acc.Tags()["scalars"]:
        return None
    out = {}
    for side in ("real", "fake"):
        events = acc.Scalars(f"train/logits_{side}")
        end = events[-1].step
        out[side] = float(np.mean([e.value for e in events if e.step > end - last]))
    return out


def draw_faces(model: str, num: int, seed: int) -> torch.Tensor:
    """`num` faces by a 128 px model as (num, 3, H, W) in [-1, 1]."""
    pipe = load_pipeline(model)
    images = generate(pipe, SamplingRequest(num=num, seed=seed, guidance=3.0), progress=False)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def picture(faces: torch.Tensor, codecs: dict, path: Path) -> None:
    """Rows: the faces, then each codec's reconstructions; below, the eye region of each enlarged 2x."""
    rows = [to_uint8(faces)]
    with torch.no_grad():
        for codec in codecs.values():
            rows.append(to_uint8(codec.decode(codec.encode(faces))))
    size = faces.shape[-1]
    top, left = size * 5 // 16, size // 4                    # the eyes, in the training data's framing
    crops = [np.stack([np.asarray(Image.fromarray(im[top:top + size // 4, left:left + size // 2]).resize(
        (size, size // 2), Image.NEAREST)) for im in row]) for row in rows]
    full = make_grid(np.concatenate(rows), nrow=len(faces))
    zoom = make_grid(np.concatenate(crops), nrow=len(faces))
    save_image(np.concatenate([full, zoom]), path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/faces")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--num", type=int, default=400, help="val faces measured")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument("--picture", type=Path)
    p.add_argument("--picture-model", default="runs/latent128")
    p.add_argument("--picture-faces", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    results, extractor = {}, InceptionFeatures("cpu", progress=False)
    for name in args.variants:
        cfg = variant_config(name, args.data, args.steps, args.runs_dir)
        seconds = train_variant(cfg)
        metrics = evaluate_codec(load_codec(cfg.run_dir), reference=args.data, num=args.num, extractor=extractor,
                                 progress=False)
        results[name] = {"losses": VARIANTS[name][0], "steps": args.steps, "train_seconds": round(seconds, 1),
                         "psnr": round(metrics["psnr"], 2), "ssim": round(metrics["ssim"], 4),
                         "rfid": round(metrics["rfid"], 2), "num": metrics["num"],
                         "discriminator_logits": (discriminator_logits(Path(cfg.run_dir))
                                                  if cfg.reconstruction.disc_weight else None)}
        print(json.dumps({name: results[name]}), flush=True)
    print("| losses | PSNR (dB) | SSIM | reconstruction FID | discriminator logits, photos / reconstructions |")
    print("|---|---|---|---|---|")
    for r in results.values():
        d = r["discriminator_logits"]
        logits = f"{d['real']:+.2f} / {d['fake']:+.2f}" if d else "-"
        print(f"| {r['losses']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['rfid']:.2f} | {logits} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"data": args.data, "val_faces": args.num, "threads": args.threads,
                                        "machine": machine_info(threads=args.threads), "variants": results}, indent=2) + "\n")
    if args.picture:
        codecs = {name: load_codec(variant_config(name, args.data, args.steps, args.runs_dir).run_dir)
                  for name in args.variants}
        picture(draw_faces(args.picture_model, args.picture_faces, args.seed), codecs, args.picture)
        print(f"picture: {args.picture}")


if __name__ == "__main__":
    main()
