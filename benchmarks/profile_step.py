"""Where a training step's time goes: torch.profiler over a few steps of our UNet and diffusers' UNet2DModel
(the equal-parameter pairs of benchmarks/speed.py), grouped into kernel families.

    python benchmarks/profile_step.py --res 32 --threads 1

Prints the share of CPU time per family (convolutions forward/backward, autocast casts, normalisation,
activations, other element-wise work, attention, optimizer) for each model and precision.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import profile

from speed import SIZES, build, train_step_fn

FAMILIES = [
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("mkldnn_convolution", "_convolution", "conv2d")),
    ("casts (copy_, to)", ("copy_", "_to_copy")),
    ("group norm", ("group_norm",)),
    ("SiLU", ("silu",)),
    ("attention / matmul", ("bmm", "mm", "addmm", "scaled_dot_product", "_flash_attention", "baddbmm")),
    ("optimizer (AdamW)", ("_foreach", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("other element-wise", ("add", "mul", "sub", "div", "cat", "upsample", "sum", "mean", "pow")),
]


def family(name: str) -> str:
    op = name.replace("aten::", "")
    for label, keys in FAMILIES:
        if any(k in op for k in keys):               # first family wins: the order above matters
            return label
    return "rest"


def shares(kind: str, res: int, precision: str, steps: int = 4) -> dict[str, float]:
    torch.manual_seed(0)
    step = train_step_fn(build(kind, res), res, SIZES[res]["batch"], "cpu", precision)
    for _ in range(2):
        step()
    with profile() as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        totals[family(event.key)] = totals.get(family(event.key), 0.0) + event.self_cpu_time_total
    whole = sum(totals.values())
    return {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--res", type=int, default=32, choices=sorted(SIZES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile-step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {}
    for precision in ("fp32", "bf16"):
        for kind in ("ours", "diffusers"):
            result[f"{kind} {precision}"] = shares(kind, args.res, precision)
    labels = [label for label, _ in FAMILIES] + ["rest"]
    print(f"share of CPU time in one training step ({args.res} px, {args.threads} thread(s))")
    print(f"{'':22s}" + "".join(f"{k:>16s}" for k in result))
    for label in labels:
        print(f"{label:22s}" + "".join(f"{result[k].get(label, 0.0):16.1%}" for k in result))
    Path(args.out).write_text(json.dumps({"res": args.res, "threads": args.threads, "shares": result}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
