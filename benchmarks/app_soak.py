"""Soak the web app: `ddpm-faces serve` in its own process takes many mixed requests (valid generations and
interpolations, model cards, bad input, malformed HTTP) from several gradio_client clients at once. Prints
how many were served, refused as bad input, refused because the queue was full, and lost (no answer), the
latency of the served generations, and the server's memory before and after.

    python benchmarks/app_soak.py                             # 2000 requests, 8 clients, a tiny model
    python benchmarks/app_soak.py --clients 48                # more clients than the queue holds (32)
    python benchmarks/app_soak.py --checkpoint runs/faces64 --steps 10 --requests 500

With no --checkpoint it serves a tiny untrained 16 px model (what is measured is the server, not the model).
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from ddpm_faces.config import load_config
from ddpm_faces.models import UNet
from ddpm_faces.runs import export_model

WARM_UP = 50                     # requests before the first memory reading
TIMEOUT = 300.0                  # seconds without an answer: the request is lost


def tiny_model(folder: Path) -> str:
    torch.manual_seed(0)
    cfg = load_config("quickstart", ["model.resolution=16", "data.resolution=16", "model.base_channels=8",
                                     "model.channel_mults=[1,2]", "model.blocks_per_level=1",
                                     "model.attn_resolutions=[8]", "model.head_channels=8", "model.groups=4",
                                     "diffusion.timesteps=100"])
    return str(export_model(UNet(cfg.model), cfg, folder / "export"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, folder: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "TMPDIR": str(folder)}
    process = subprocess.Popen([sys.executable, "-m", "ddpm_faces", "serve", "--checkpoint", model, "--port",
                                str(port), "--threads", str(threads)], env=env, cwd=folder,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not process.stdout.readline().startswith("serving on "):
        if process.poll() is not None:
            raise SystemExit("the server did not start")
    return process, f"http://127.0.0.1:{port}/"


def mixed_request(i: int, model: str, steps: int):
    """Request i of the mix: (what, api_name or HTTP path, arguments)."""
    valid = (model, "ddim", steps, 1 + i % 4, i, 1.0, "fp32")
    mix = [("generate", "/generate", valid), ("generate", "/generate", valid),
           ("interpolate", "/interpolate", (model, "ddim", steps, 3, i, i + 1, 1.0, "fp32")),
           ("model card", "/model_changed", (model,)),
           ("bad input", "/generate", (*valid[:4], 10**400, *valid[5:])),
           ("bad input", "/generate", ("m" * 100_000, *valid[1:])),
           ("bad input", "/generate", (model, "euler", *valid[2:])),
           ("malformed", "gradio_api/call/nope", {"data": []}),
           ("malformed", "gradio_api/queue/join", {"data": [], "fn_index": 999, "session_hash": "x"})]
    return mix[i % len(mix)]


def ask(client: Client, url: str, what: str, endpoint: str, args) -> tuple[str, str, float]:
    """One request: (what, outcome, seconds); outcome is served, bad input, queue full, client error, lost."""
    start = time.perf_counter()
    if what == "malformed":
        reply = httpx.post(url + endpoint, json=args, timeout=TIMEOUT)
        outcome = "client error" if 400 <= reply.status_code < 500 else f"HTTP {reply.status_code}"
        return what, outcome, time.perf_counter() - start
    try:
        client.submit(*args, api_name=endpoint).result(timeout=TIMEOUT)
        outcome = "served"
    except AppError:
        outcome = "bad input"
    except TimeoutError:
        outcome = "lost"
    except Exception as err:          # gradio_client's QueueError, or a stream that ended without an answer
        outcome = "queue full" if "queue is full" in str(err).lower() else f"failed ({type(err).__name__})"
    return what, outcome, time.perf_counter() - start


def run(url: str, model: str, steps: int, first: int, count: int, clients: int) -> list[tuple[str, str, float]]:
    """Requests first .. first+count-1 from `clients` clients at once, each over its own Client."""
    def client_run(k):
        client = Client(url, verbose=False)
        return [ask(client, url, *mixed_request(i, model, steps)) for i in range(first + k, first + count, clients)]
    with ThreadPoolExecutor(clients) as pool:
        return [result for share in pool.map(client_run, range(clients)) for result in share]


def report(results, seconds: float, rss: list[float], still_answers: bool) -> None:
    outcomes = collections.Counter(outcome for _, outcome, _ in results)
    served = sorted(t for what, outcome, t in results if what == "generate" and outcome == "served")
    print(f"requests {len(results)} in {seconds:.1f} s ({len(results) / seconds:.1f}/s): "
          + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    if served:
        p95 = served[min(len(served) - 1, round(0.95 * (len(served) - 1)))]
        print(f"generations served {len(served)}: latency p50 {statistics.median(served):.3f} s, p95 {p95:.3f} s")
    print(f"server RSS {rss[0]:.0f} MB after {WARM_UP} requests, then {', '.join(f'{r:.0f}' for r in rss[1:])} MB "
          f"after each quarter of the rest ({rss[-1] - rss[0]:+.0f} MB); answers afterwards: "
          f"{'yes' if still_answers else 'NO'}")


def soak(url: str, model: str, process, args) -> tuple[list, list[float]]:
    """The warm-up, then the rest of the requests in four parts; the server's RSS after each."""
    results = run(url, model, args.steps, 0, min(WARM_UP, args.requests), args.clients)
    rss = [rss_mb(process.pid)]
    rest = max(0, args.requests - WARM_UP)
    for part in range(4):
        first, last = WARM_UP + rest * part // 4, WARM_UP + rest * (part + 1) // 4
        results += run(url, model, args.steps, first, last - first, args.clients)
        rss.append(rss_mb(process.pid))
    return results, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="sampling steps of each generation (default 2)")
    parser.add_argument("--checkpoint", help="the model to serve (default: a tiny untrained one)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.checkpoint or tiny_model(Path(scratch))
        process, url = start_server(model, Path(scratch), args.threads)
        try:
            start = time.perf_counter()
            results, rss = soak(url, model, process, args)
            seconds = time.perf_counter() - start
            still = httpx.get(url, timeout=30).status_code == 200 and process.poll() is None
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    report(results, seconds, rss, still)


if __name__ == "__main__":
    main()
