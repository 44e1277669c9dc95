"""Latency of the web app: 4 faces with the default sampler and steps on the bundled model, timed three ways,
medians of several runs:

    sampler only    `generate()` itself, no app (the floor)
    handler         the app's generate handler, with its live previews, grid PNG and denoising strip
    gradio_client   a request to a live server (`ddpm-faces serve` in its own process, on a free localhost
                    port), answered with the faces; also the time until the first streamed preview arrives

    python benchmarks/app_latency.py                 # 5 runs each, the app's default threads
    python benchmarks/app_latency.py --runs 9 --threads 2
    python benchmarks/app_latency.py --precision bf16     # the network under bf16 autocast

Writes benchmarks/results/app-latency.json (app-latency-bf16.json with --precision bf16). Other jobs on the
machine (a training run, say) share its cores: the processes busy before and after and the load averages are
printed and saved with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddpm_faces.hardware import machine_info
from ddpm_faces.app import FaceApp
from ddpm_faces.pipeline import (DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLING_PRECISIONS, SamplingRequest,
                                 default_threads, generate)
from ddpm_faces.runs import BUNDLED_DIR, DEFAULT_MODEL

OUT = Path(__file__).resolve().parent / "results" / "app-latency.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, runs: int) -> list[float]:
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


def busy_processes() -> list[str]:
    """Other processes using a good part of a core right now (Linux, from two /proc samples)."""
    def sample():
        ticks = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)
                name = fields[0].split("(", 1)[1]
                parts = fields[1].split()
                ticks[(stat.parent.name, name)] = int(parts[11]) + int(parts[12])
            except (OSError, IndexError, ValueError):
                continue
        return ticks
    if not Path("/proc/self/stat").exists():
        return []
    first = sample()
    time.sleep(1.0)
    second = sample()
    hz = os.sysconf("SC_CLK_TCK")
    me = str(os.getpid())
    return [f"{name} (pid {pid}, {100 * (t - first[(pid, name)]) / hz:.0f}% of a core)"
            for (pid, name), t in second.items()
            if (pid, name) in first and pid != me and (t - first[(pid, name)]) / hz > 0.3]


class Server:
    """`ddpm-faces serve` in its own process (the bundled model; a working folder without runs/)."""

    def __init__(self, threads: int):
        self.folder = tempfile.TemporaryDirectory()
        self.url = f"http://127.0.0.1:{free_port()}/"
        port = self.url.rsplit(":", 1)[1].strip("/")
        self.log = open(Path(self.folder.name) / "serve.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", "ddpm_faces", "serve", "--port", port,
                                         "--threads", str(threads)], cwd=self.folder.name,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180.0) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {(Path(self.folder.name) / 'serve.log').read_text()}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise SystemExit(f"the server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        self.folder.cleanup()


def start_server(threads: int) -> Server:
    server = Server(threads)
    try:
        server.wait()
    except BaseException:
        server.stop()
        raise
    return server


def is_preview(output) -> bool:
    """A streamed output whose status line says the faces are still being denoised."""
    return isinstance(output, (list, tuple)) and isinstance(output[-1], str) and output[-1].startswith("Denoising")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch threads (default: the app's, all cores but one)")
    parser.add_argument("--precision", default="fp32", choices=SAMPLING_PRECISIONS,
                        help="fp32 (default) or bf16 (the network under bf16 autocast)")
    parser.add_argument("--out", help=f"JSON to write (default {OUT.name} in benchmarks/results/, "
                                      "app-latency-bf16.json for bf16)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    sampler, steps, num, precision = DEFAULT_SAMPLER, DEFAULT_STEPS, args.num, args.precision
    out = Path(args.out or (OUT if precision == "fp32" else OUT.with_name(f"app-latency-{precision}.json")))
    others = busy_processes()
    load_before = os.getloadavg()
    print(f"{num} faces, {sampler} {steps} steps, {precision}, bundled {DEFAULT_MODEL}; {args.threads} torch "
          f"thread(s) of {os.cpu_count()} cores; load average {load_before[0]:.2f}")
    if others:
        print("note: other jobs are using the CPU during this benchmark: " + "; ".join(others))
    else:
        print("note: another job may be using a core; none was busy when this started")

    app = FaceApp.from_paths([str(BUNDLED_DIR / DEFAULT_MODEL)], threads=args.threads)
    label = app.default
    pipe = app.pipeline(app.models[label])
    request = SamplingRequest(num=num, sampler=sampler, steps=steps, precision=precision)
    generate(pipe, request.replace(steps=2), progress=False)                                      # warm-up

    bare = timed(lambda i: generate(pipe, request.replace(seed=i), progress=False), args.runs)
    handler = timed(lambda i: list(app.generate(label, sampler, steps, num, i, 1.0, precision)), args.runs)
    app.close()

    server = start_server(args.threads)
    try:
        from gradio_client import Client

        client = Client(server.url, verbose=False)
        served = f"{DEFAULT_MODEL} (bundled)"                  # what the server's model picker calls it
        client.predict(served, sampler, 2, num, 0, 1.0, precision, api_name="/generate")      # warm-up
        first_preview: list[float] = []

        def request(i):
            start, preview = time.perf_counter(), None
            job = client.submit(served, sampler, steps, num, i, 1.0, precision, api_name="/generate")
            while preview is None and not job.done():          # poll only until the first preview
                if any(is_preview(out) for out in job.outputs()):
                    preview = time.perf_counter() - start
                time.sleep(0.01)
            if preview is not None:
                first_preview.append(preview)
            result = job.result()                               # then wait without polling
            assert len(result[1]) == num, result          # (preview, faces, grid, seeds, strip, status)
        over_http = timed(request, args.runs)
    finally:
        server.stop()
    others_after = busy_processes()
    load_after = os.getloadavg()

    def med(xs):
        return round(statistics.median(xs), 3) if xs else None

    result = {
        "what": f"{num} faces, {sampler} {steps} steps, {precision}, bundled {DEFAULT_MODEL} "
                f"({pipe.codec.image_size} px)",
        "threads": args.threads, "cores": os.cpu_count(), "runs": args.runs,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "sampler_only_s": [round(t, 3) for t in bare], "sampler_only_median_s": med(bare),
        "handler_s": [round(t, 3) for t in handler], "handler_median_s": med(handler),
        "gradio_client_s": [round(t, 3) for t in over_http], "gradio_client_median_s": med(over_http),
        "first_preview_median_s": med(first_preview),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "other_busy_processes": others, "other_busy_processes_after": others_after,
        "note": "other jobs on the machine share its cores; see other_busy_processes and the load averages",
    }
    print(f"sampler only   median {result['sampler_only_median_s']:.2f} s  ({', '.join(f'{t:.2f}' for t in bare)})")
    print(f"app handler    median {result['handler_median_s']:.2f} s  ({', '.join(f'{t:.2f}' for t in handler)})")
    print(f"gradio_client  median {result['gradio_client_median_s']:.2f} s  "
          f"({', '.join(f'{t:.2f}' for t in over_http)}); first preview after "
          f"{result['first_preview_median_s']:.2f} s")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          "(another job may be using a core: compare with sampler only)")
    result["machine"] = machine_info(precision=precision)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
