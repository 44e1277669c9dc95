"""Load, bounded in time: a real `ddpm-faces serve` process (a tiny model, a few steps) takes a few hundred
mixed requests (valid and invalid, from several gradio_client clients at once, plus malformed HTTP); every
request gets an answer, the server's memory stays flat, and it still answers afterwards.

benchmarks/app_soak.py is the longer version that prints the numbers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from conftest import free_port, stop_process, tiny_model
from ddpm_faces.runs import export_model

CLIENTS = 4
REQUESTS = 240                   # in all; the first WARM_UP set the memory baseline
WARM_UP = 60
ANSWER_TIMEOUT = 60.0            # seconds: a request without an answer by then is lost
RSS_GROWTH_MB = 40.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`ddpm-faces serve` over a tiny 16 px model, in its own process: (url, process, model label)."""
    folder = tmp_path_factory.mktemp("soak")
    model = str(export_model(*tiny_model("diffusion.timesteps=100"), folder / "export"))
    port = free_port()
    env = {**os.environ, "TMPDIR": str(folder), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ddpm_faces", "serve", "--checkpoint", model, "--port",
                                str(port), "--threads", "1"], env=env, cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        while not process.stdout.readline().startswith("serving on "):
            assert process.poll() is None, "the server did not start"
        yield f"http://127.0.0.1:{port}/", process, model
    finally:
        stop_process(process)


def mixed_request(i: int, model: str):
    """Request i of the mix: (what it is, api_name or HTTP path, arguments, the answer expected)."""
    valid = (model, "ddim", 2, 1 + i % 2, i, 1.0, "fp32")
    mix = [
        ("generate", "/generate", valid, " in "),
        ("interpolate", "/interpolate", (model, "ddim", 2, 2, i, i + 1, 1.0, "fp32"), "faces from seed"),
        ("model card", "/model_changed", (model,), "16 × 16 px"),
        ("huge seed", "/generate", (*valid[:4], 10**400, *valid[5:]), "seed must be from 0 to"),
        ("bad sampler", "/generate", (model, "euler", *valid[2:]), "unknown sampler"),
        ("huge model name", "/generate", ("m" * 100_000, *valid[1:]), "unknown model"),
        ("too many steps", "/generate", (model, "ddim", 101, *valid[3:]), "steps must be from 1 to 100"),
        ("unknown endpoint", "gradio_api/call/nope", {"data": []}, 404),
        ("malformed JSON", "gradio_api/call/generate", "{", 400),
    ]
    return mix[i % len(mix)]


def ask(client: Client, url: str, what, endpoint, args, expected) -> tuple[str, str, float]:
    """One request: (what, "answered" or what went wrong, seconds)."""
    start = time.perf_counter()
    if isinstance(expected, int):
        content = args if isinstance(args, str) else None
        reply = httpx.post(url + endpoint, content=content, json=None if content else args, timeout=ANSWER_TIMEOUT,
                           headers={"content-type": "application/json"})
        ok = reply.status_code == expected
        return what, "answered" if ok else f"HTTP {reply.status_code}", time.perf_counter() - start
    try:
        result = client.submit(*args, api_name=endpoint).result(timeout=ANSWER_TIMEOUT)
        text = str(result[0] if endpoint == "/model_changed" else result[-1])
    except AppError as err:
        text = str(err)
    except TimeoutError:
        return what, "lost", time.perf_counter() - start
    except Exception as err:                    # the client gave up on the request: no answer came
        return what, f"failed: {type(err).__name__} {str(err)[:200]}", time.perf_counter() - start
    outcome = "answered" if expected in text and len(text) < 2000 else f"unexpected: {text[:200]}"
    return what, outcome, time.perf_counter() - start


def run_requests(url: str, model: str, first: int, count: int) -> list[tuple[str, str, float]]:
    """Requests first .. first+count-1 of the mix from CLIENTS clients at once, each with its own share of
    them, one after the other, over its own gradio_client Client."""
    def client_run(k):
        client = Client(url, verbose=False)
        return [ask(client, url, *mixed_request(i, model)) for i in range(first + k, first + count, CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        return [result for share in pool.map(client_run, range(CLIENTS)) for result in share]


@pytest.mark.slow
def test_a_few_hundred_mixed_requests_all_answered_with_flat_memory(server):
    url, process, model = server
    warm = run_requests(url, model, 0, WARM_UP)
    before = rss_mb(process.pid)
    rest = run_requests(url, model, WARM_UP, REQUESTS - WARM_UP)
    after = rss_mb(process.pid)
    results = warm + rest
    assert len(results) == REQUESTS
    wrong = [r for r in results if r[1] != "answered"]
    assert not wrong, wrong[:5]
    assert after - before < RSS_GROWTH_MB, f"RSS grew from {before:.0f} MB to {after:.0f} MB"
    assert httpx.get(url, timeout=30).status_code == 200                     # it still answers
    assert Client(url, verbose=False).predict(model, "ddim", 2, 1, 0, api_name="/generate")[-1].startswith("1 face")
    assert process.poll() is None
