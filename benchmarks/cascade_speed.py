"""Seconds for 4 faces at 128 px: the cascade (both stages and the decoder) side by side with latent128 and the
32 px model, in one process, at the default sampling settings (`ddpm-faces sample --num 4`).

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cascade_speed.py --cascade runs/cascade128 \\
        --precision fp32 --out benchmarks/results/cascade-speed-avx2.json          # an AVX2-only CPU, fp32

CPU seconds of this process (one thread: the time an idle machine takes), median of --repeats after a
warm-up, for each model; for the cascade also its parts (stage 1, stage 2 with decoding).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ddpm_faces.images import to_model_range
from ddpm_faces.hardware import machine_info, resolve_precision
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline

CLOCK = time.process_time


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return round(statistics.median(times), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cascade", required=True)
    p.add_argument("--others", nargs="*", default=["latent128", "faces32"])
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    request = SamplingRequest(num=4, seed=0, precision=args.precision)
    result = {"request": request.cli_flags(), "machine": machine_info(threads=args.threads,
                                                                      precision=resolve_precision(args.precision)),
              "seconds_4_faces": {}}
    for name in [args.cascade, *args.others]:
        pipe = load_pipeline(name)
        result["seconds_4_faces"][name] = timed(lambda: generate(pipe, request, progress=False), args.repeats)
        if pipe.previous is not None:
            first = pipe.previous
            small = generate(first, request, progress=False)
            lowres = to_model_range(torch.from_numpy(small))
            alone = load_pipeline(name, stage1=False)
            result["cascade_parts"] = {
                "stage1": timed(lambda: generate(first, request, progress=False), args.repeats),
                "stage2_and_decoder": timed(lambda: generate(alone, request, lowres=lowres, progress=False),
                                            args.repeats)}
        print(name, result["seconds_4_faces"][name], flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
