"""Loss curves of a run from its TensorBoard events, as a PNG for the README.

    python benchmarks/plot_training.py runs/bundled32 docs/bundled-loss.png
(needs matplotlib: pip install matplotlib)
"""
from __future__ import annotations

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return [], []
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def main(run_dir: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for tag, label in (("train/loss", "train loss (mean over 50 steps)"), ("val/loss", "val loss (EMA, fixed t and noise)")):
        steps, values = scalars(run, tag)
        ax.plot(steps, values, label=label, marker="o" if tag == "val/loss" else None, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE (eps)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(run.name)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
