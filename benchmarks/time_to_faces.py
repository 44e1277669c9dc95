"""Time to faces on the CPU at hand: training images/s, sampling and editing latency, latent encoding rate.

    python benchmarks/time_to_faces.py --threads 1
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/time_to_faces.py --threads 1   # an AVX2-only CPU

For the bundled models faces32 and latent128, on --threads threads:
- training images/s of their UNets (batch 32, AdamW, the latent one on 32x32x4 latents) in fp32 and, where the
  CPU computes it natively, under bf16 autocast;
- seconds for 4 faces at the default settings (`ddpm-faces sample --num 4`: precision auto, the default sampler
  and steps, unguided), decoding included, and the same with `--runtime onnx` (fp32; its export and session
  start, paid once per process, apart);
- seconds for one edit at the default settings (framing of a drawn face without detection, encode, strength
  0.6 of the edit's 20 steps, guidance 3 asking an age bin, decode);
- images/s of the latent-cache encoder (`LatentCodec.fast_encoder`, precision auto).
Each figure is the median of --repeats runs after a warm-up, timed in CPU seconds of this process (with one
thread that is the time an idle machine would take, and it does not count time lost to other jobs on a busy
one; --wall for wall-clock time). The JSON names the CPU, its flags, the ISA limits
of the environment, the threads and the precision each row used (benchmarks/results/time-to-faces-<kind>.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ddpm_faces.images import to_model_range
from ddpm_faces.photos.framing import frame_photo
from ddpm_faces.hardware import bf16_native, cpu_label, machine_info, resolve_precision
from ddpm_faces.pipeline import DEFAULT_EDIT_STEPS, EditPlan, EditRequest, SamplingRequest, fast_net, generate, load_pipeline

from edit_speed import ASK, drawn_face

RESULTS = Path(__file__).parent / "results"


CLOCK = time.process_time


def median_seconds(fn, repeats: int) -> float:
    fn()                                                     # warm-up
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return statistics.median(times)


def train_images_per_s(pipe, precision: str, repeats: int, batch: int = 32) -> float:
    net = pipe.net.__class__(pipe.net.cfg).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)
    x, t = torch.randn(batch, *pipe.codec.shape), torch.randint(0, 1000, (batch,))
    labels = pipe.labels({}, batch)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(x, t) if labels is None else net(x, t, labels)
            loss = (out.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch / median_seconds(step, repeats)


def sample_seconds(pipe, repeats: int, **options) -> float:
    return median_seconds(lambda: generate(pipe, SamplingRequest(num=4, seed=0, **options), progress=False), repeats)


def onnx_start_seconds(pipe) -> float | None:
    """Wall seconds of the first --runtime onnx call's export and session start (paid once per process)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    start = time.perf_counter()
    fast_net(pipe.net, (4, *pipe.codec.shape), "onnx")
    return time.perf_counter() - start


def edit_seconds(pipe, repeats: int) -> float:
    request = SamplingRequest(num=1, seed=0, steps=DEFAULT_EDIT_STEPS, guidance=3.0,
                              attributes=ASK if pipe.conditional else {})

    def edit():
        framed = frame_photo(drawn_face(), pipe.codec.image_size, detect=False)
        x = to_model_range(torch.from_numpy(framed.image.copy())[None])
        generate(pipe, request, plan=EditPlan(pipe, x, EditRequest(strength=0.6), seed=0), progress=False)
    return median_seconds(edit, repeats)


def encode_images_per_s(pipe, repeats: int) -> float:
    encode = pipe.codec.fast_encoder()
    images = torch.rand(64, 3, pipe.codec.image_size, pipe.codec.image_size) * 2 - 1

    def run():
        with torch.inference_mode():
            encode(images)
    return 64 / median_seconds(run, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--wall", action="store_true", help="time wall-clock seconds instead of CPU seconds")
    p.add_argument("--out", help="JSON to write (default: results/time-to-faces-<avx2|bf16>.json)")
    args = p.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.wall or args.threads > 1 else time.process_time
    torch.set_num_threads(args.threads)
    native = bf16_native("cpu")
    auto = resolve_precision("auto")
    rows = []
    for name in ("faces32", "latent128"):
        pipe = load_pipeline(name)
        row = {"model": name, "image_size": pipe.codec.image_size, "sample_precision": auto,
               "request": SamplingRequest(num=4).validate(pipe).cli_flags(attributes=False)}
        for precision in ("fp32", "bf16") if native else ("fp32",):
            row[f"train_img_s_{precision}"] = round(train_images_per_s(pipe, precision, args.repeats), 2)
        row["sample_4_faces_s"] = round(sample_seconds(pipe, args.repeats), 3)
        start = onnx_start_seconds(pipe)
        if start is not None:
            row["onnx_start_s"] = round(start, 2)
            row["sample_4_faces_onnx_s"] = round(sample_seconds(pipe, args.repeats, runtime="onnx"), 3)
        row["edit_s"] = round(edit_seconds(pipe, args.repeats), 3)
        if hasattr(pipe.codec, "fast_encoder"):
            row["encode_img_s"] = round(encode_images_per_s(pipe, args.repeats), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = machine_info(threads=args.threads, precision=auto)
    result = {"machine": info, "cpu_label": cpu_label(info), "repeats": args.repeats,
              "clock": "wall" if CLOCK is time.perf_counter else "process CPU time", "rows": rows}
    out = Path(args.out or RESULTS / f"time-to-faces-{'bf16' if native else 'avx2'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"{cpu_label(info)}: wrote {out}")


if __name__ == "__main__":
    main()
