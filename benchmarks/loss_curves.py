"""Speed must not cost quality: the loss curves of our UNet and diffusers' UNet2DModel (equal parameters, the
32 px layout of benchmarks/speed.py) trained on the same batches, timesteps and noise, with the same
optimizer and learning-rate schedule. Writes JSON and a plot of validation loss against step and time.

    python benchmarks/loss_curves.py --steps 400 --threads 1
    python benchmarks/loss_curves.py --plot-only

Runs: ours in bf16 (the fast setting) and in fp32, diffusers in fp32 (its default). Validation loss is the
mean v-prediction loss of 256 val faces at fixed timesteps and noise, measured every `--eval-every` steps on
the online weights (no EMA, so the two networks are compared as trained).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ddpm_faces.hardware import machine_info
from ddpm_faces.data import BatchLoader, prepare_dataset
from ddpm_faces.data.loader import load_batch
from ddpm_faces.diffusion import diffusion_loss
from ddpm_faces.diffusion.schedules import NoiseSchedule, cosine_betas
from ddpm_faces.training.lr import make_scheduler

from speed import build

RUNS = [("ours", "bf16"), ("ours", "fp32"), ("diffusers", "fp32")]
RESULTS = Path(__file__).parent / "results" / "loss-curves.json"


def run(kind: str, precision: str, data, steps: int, eval_every: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = build(kind, 32)
    schedule = NoiseSchedule(cosine_betas(1000))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, foreach=True)
    sched = make_scheduler(opt, 100, steps, 0.1)
    loader = iter(BatchLoader(data, "train", batch, seed=0, hflip=True))
    val_rows = data.indices("val")[:256]
    g = torch.Generator().manual_seed(1)
    val_x = load_batch(data, val_rows)["images"]
    val_t = torch.randint(0, 1000, (len(val_rows),), generator=g)
    val_noise = torch.randn(val_x.shape, generator=g)
    noise_gen = torch.Generator().manual_seed(2)
    curve, elapsed, t0 = [], 0.0, time.perf_counter()

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(float(diffusion_loss(model, schedule, val_x[i:i + 64], val_t[i:i + 64],
                                             val_noise[i:i + 64], prediction="v")) * len(val_x[i:i + 64])
                        for i in range(0, len(val_x), 64))
        model.train()
        return total / len(val_x)

    model.train()
    for step in range(1, steps + 1):
        x0 = next(loader)["images"]
        t = torch.randint(0, 1000, (len(x0),), generator=noise_gen)
        noise = torch.randn(x0.shape, generator=noise_gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion_loss(model, schedule, x0, t, noise, prediction="v")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            elapsed += time.perf_counter() - t0
            curve.append({"step": step, "seconds": elapsed, "train_loss": float(loss), "val_loss": val_loss()})
            print(f"{kind:9s} {precision}  step {step:5d}  {elapsed:7.1f} s  val loss {curve[-1]['val_loss']:.4f}",
                  flush=True)
            t0 = time.perf_counter()
    return {"model": kind, "precision": precision, "curve": curve}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        steps = [c["step"] for c in r["curve"]]
        minutes = [c["seconds"] / 60 for c in r["curve"]]
        val = [c["val_loss"] for c in r["curve"]]
        label = f"{r['model']} ({r['precision']})"
        axes[0].plot(steps, val, marker=".", label=label)
        axes[1].plot(minutes, val, marker=".", label=label)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("minutes of training (excluding evaluation)")
    for ax in axes:
        ax.set_ylabel("validation loss (v)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Equal-parameter UNets (3.9 M, 32 px, batch 32) on the same batches")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--data", default="../shared/data/faces")
    p.add_argument("--plot", default="docs/loss-curves.png")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    if not args.plot_only:
        torch.set_num_threads(args.threads)
        data = prepare_dataset(args.data, 32, progress=False)
        results = [run(kind, prec, data, args.steps, args.eval_every, args.batch) for kind, prec in RUNS]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"machine": machine_info(threads=args.threads), "threads": args.threads,
                                       "steps": args.steps, "batch": args.batch,
                                       "runs": results}, indent=1))
        print(f"wrote {RESULTS}")
    results = json.loads(RESULTS.read_text())["runs"]
    for r in results:
        last = r["curve"][-1]
        print(f"{r['model']:9s} {r['precision']}: final val loss {last['val_loss']:.4f} after {last['step']} steps, "
              f"{last['seconds'] / 60:.1f} min")
    plot(results, Path(args.plot))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
