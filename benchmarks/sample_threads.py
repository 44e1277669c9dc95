"""How many torch threads `ddpm-faces sample` should use by default, on an idle and on a busy machine.

Times `ddpm-faces sample --num 16` (the default sampler) for each thread count, first with the machine
idle, then while another process keeps one core busy (a one-thread torch matmul loop, like a training run
or a second sampler). Every case runs in a fresh process, alternating, so both conditions see the same
machine.

    python benchmarks/sample_threads.py --threads 1 2 --repeats 2 --out benchmarks/results/sample-threads.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddpm_faces.hardware import machine_info, resolve_precision

BUSY = "import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\nwhile True: a = (a @ a).tanh()"


def sample_seconds(threads: int, num: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "ddpm_faces", "sample", "--num", str(num), "--threads", str(threads),
           "--no-progress", "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(threads: list[int], num: int, repeats: int, busy: bool) -> dict[int, list[float]]:
    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        if hog is not None:
            time.sleep(2)                                     # let it settle on its core
        times: dict[int, list[float]] = {n: [] for n in threads}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(repeats):
                for n in threads:
                    times[n].append(sample_seconds(n, num, Path(tmp) / "faces.png"))
        return times
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    rows = []
    for busy in (False, True):
        for n, seconds in measure(args.threads, args.num, args.repeats, busy).items():
            rows.append({"threads": n, "other_core_busy": busy, "median_s": round(statistics.median(seconds), 2),
                         "runs_s": [round(s, 2) for s in seconds]})
            print(f"{'busy' if busy else 'idle'} machine, {n} thread(s): {rows[-1]['median_s']:.2f} s "
                  f"for {args.num} faces (runs: {rows[-1]['runs_s']})", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine_info(precision=resolve_precision("auto")),
                                             "cpu_count": os.cpu_count(), "num": args.num, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
