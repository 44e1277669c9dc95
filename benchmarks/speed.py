"""Training and sampling throughput of our UNet against diffusers' UNet2DModel at equal parameter counts,
plus model FLOP utilisation (MFU), peak memory and data-loading throughput. Prints tables, writes JSON.

    python benchmarks/speed.py                          # 32 and 64 px, fp32 and bf16, this machine's threads
    python benchmarks/speed.py --res 32 --precision bf16 --threads 1 --repeats 3

Fairness: both networks get the same input, batch, precision (torch.autocast for bf16), thread count,
optimizer (AdamW, foreach) and loss; they are timed in the same process, alternating A B A B, and the
median of the repeats is reported. Sampling is `--sample-steps` DDIM steps under inference_mode through our
sampler, the only difference being the network. MFU = (FLOPs of one training step, counted by
torch.utils.flop_counter) / (step time) / (peak of a large matmul in the same precision, measured here).
Peak memory is the peak growth of the resident set of a fresh process over three training steps, from
the moment the model is built (so optimizer state, gradients and activations; CPU, Linux), or torch's
peak allocation (CUDA).
lucidrains' denoising_diffusion_pytorch is not in the table: it imports torchvision at import time, and
PyPI's torchvision does not import beside the CPU build of torch used here.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddpm_faces.hardware import machine_info
from ddpm_faces.diffusion import sample_ddim
from ddpm_faces.diffusion.process import Denoiser
from ddpm_faces.diffusion.schedules import NoiseSchedule, cosine_betas, sampling_timesteps
from ddpm_faces.models.unet import UNet, UNetConfig, count_parameters

# Same layout on both sides: levels, blocks per level, attention resolution, head width.
SIZES = {
    32: dict(base=48, mults=(1, 2, 2), attn=8, heads=48, batch=32),     # the bundled 32 px model (3.9 M)
    64: dict(base=64, mults=(1, 2, 2, 4), attn=16, heads=64, batch=16),  # the 17 M model of the issue
}


def build(kind: str, res: int):
    s = SIZES[res]
    if kind == "ours":
        return UNet(UNetConfig(resolution=res, base_channels=s["base"], channel_mults=list(s["mults"]),
                               attn_resolutions=[s["attn"]], head_channels=s["heads"], dropout=0.0))
    from diffusers import UNet2DModel
    widths, r, down, up = [s["base"] * m for m in s["mults"]], res, [], []
    for _ in widths:
        down.append("AttnDownBlock2D" if r == s["attn"] else "DownBlock2D")
        r //= 2
    up = [b.replace("Down", "Up") for b in reversed(down)]
    net = UNet2DModel(sample_size=res, block_out_channels=tuple(widths), layers_per_block=2,
                      down_block_types=tuple(down), up_block_types=tuple(up), attention_head_dim=s["heads"],
                      norm_num_groups=32 if s["base"] % 32 == 0 else 16, resnet_time_scale_shift="scale_shift")
    return _Diffusers(net)


class _Diffusers(torch.nn.Module):
    """diffusers returns an output object; this returns the tensor, as ours does."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t).sample


def autocast(device: str, precision: str):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step_fn(model, res: int, batch: int, device: str, precision: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def step():
        with autocast(device, precision):
            out = model(x, t)
        loss = (out.float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sample_fn(model, res: int, batch: int, device: str, precision: str, steps: int):
    schedule = NoiseSchedule(cosine_betas(1000))
    timesteps = sampling_timesteps(schedule, steps, "trailing")

    def net(x, t):
        with autocast(device, precision):
            return model(x, t)
    denoiser = Denoiser(net, schedule, "v")
    x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        with torch.inference_mode():
            sample_ddim(denoiser, x.clone(), timesteps)
    return run


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict, repeats: int, calls: int, device: str) -> dict:
    """Median seconds per call of each function, timed A B A B after one warm-up call each."""
    for fn in fns.values():
        fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(device: str, precision: str, n: int = 4096, repeats: int = 5) -> float:
    """Achievable FLOP/s of this machine: a large square matmul in the given precision."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def step_flops(model, res: int, batch: int, device: str, precision: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(batch, 3, res, res, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            out = model(x, t)
        (out.float() - x).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_memory(kind: str, res: int, precision: str, threads: int, device: str) -> float:
    """MiB: peak RSS growth of a fresh process over a few training steps (CPU), or CUDA peak allocation."""
    out = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(res), precision, str(threads),
                          device], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(kind: str, res: int, precision: str, threads: int, device: str) -> None:
    torch.set_num_threads(threads)
    model = build(kind, res).to(device)
    step = train_step_fn(model, res, SIZES[res]["batch"], device, precision)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        print(torch.cuda.max_memory_allocated() / 2 ** 20)
        return
    before = _proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")            # reset the peak (VmHWM) to the current RSS
    for _ in range(3):
        step()
    print((_proc_status("VmHWM") - before) / 1024)


def _proc_status(key: str) -> int:
    """kB of a /proc/self/status line (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def data_loading(res: int, batch: int, source: str, seconds: float = 5.0) -> float | None:
    """Images/s the training loader hands out (random order, flips) from the prepared uint8 cache."""
    from ddpm_faces.data import BatchLoader, prepare_dataset
    if not Path(source).exists():
        return None
    data = prepare_dataset(source, res, progress=False)
    loader = iter(BatchLoader(data, "train", batch, seed=0, hflip=True))
    next(loader)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(loader)["images"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--res", type=int, nargs="+", default=[32, 64], choices=sorted(SIZES))
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=2, help="training steps per timed repeat")
    p.add_argument("--sample-steps", type=int, default=10, help="DDIM steps per timed sampling run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default="../shared/data/faces")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/speed-<device>.json)")
    p.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        kind, res, precision, threads, device = args.memory_child
        return memory_child(kind, int(res), precision, int(threads), device)

    torch.set_num_threads(args.threads)
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    print(f"device {device} ({name}), {args.threads} threads, torch {torch.__version__}")
    rows = []
    for precision in args.precision:
        peak = matmul_peak(device, precision)
        print(f"\nmatmul peak ({precision}): {peak / 1e9:.0f} GFLOP/s")
        for res in args.res:
            batch = SIZES[res]["batch"]
            torch.manual_seed(0)
            models = {k: build(k, res).to(device) for k in ("ours", "diffusers")}
            params = {k: count_parameters(m) for k, m in models.items()}
            train = alternate({k: train_step_fn(m, res, batch, device, precision) for k, m in models.items()},
                              args.repeats, args.calls, device)
            sample = alternate({k: sample_fn(m, res, batch, device, precision, args.sample_steps)
                                for k, m in models.items()}, max(3, args.repeats // 2), 1, device)
            for k, m in models.items():
                flops = step_flops(m, res, batch, device, precision)
                row = dict(model=k, res=res, precision=precision, batch=batch, threads=args.threads, device=device,
                           params=params[k], train_img_s=batch / train[k],
                           sample_img_s_50_steps=batch / (sample[k] * 50 / args.sample_steps),
                           step_gflop=flops / 1e9, mfu=flops / train[k] / peak, peak_gflop_s=peak / 1e9)
                if not args.no_memory:
                    row["peak_mib"] = peak_memory(k, res, precision, args.threads, device)
                rows.append(row)
            ours, theirs = rows[-2], rows[-1]
            print(f"{res} px, batch {batch}: params ours {ours['params']:,} / diffusers {theirs['params']:,} "
                  f"({ours['params'] / theirs['params'] - 1:+.1%})")
            for r in (ours, theirs):
                mem = f", peak {r['peak_mib']:.0f} MiB" if "peak_mib" in r else ""
                print(f"  {r['model']:9s} train {r['train_img_s']:7.2f} img/s  sample (50 DDIM steps) "
                      f"{r['sample_img_s_50_steps']:7.3f} img/s  {r['step_gflop']:.1f} GFLOP/step  "
                      f"MFU {r['mfu']:.1%}{mem}")
            print(f"  speed-up: train {ours['train_img_s'] / theirs['train_img_s']:.2f}x, "
                  f"sample {ours['sample_img_s_50_steps'] / theirs['sample_img_s_50_steps']:.2f}x")
    for res in args.res:
        pick = {(r["model"], r["precision"]): r for r in rows if r["res"] == res}
        if ("ours", "bf16") in pick and ("diffusers", "fp32") in pick:
            a, b = pick[("ours", "bf16")], pick[("diffusers", "fp32")]
            print(f"{res} px, ours in bf16 (the default where the CPU has bf16 units) vs diffusers in fp32 (its "
                  f"default): train {a['train_img_s'] / b['train_img_s']:.2f}x, "
                  f"sample {a['sample_img_s_50_steps'] / b['sample_img_s_50_steps']:.2f}x")
    loading = {}
    for res in args.res:
        ips = data_loading(res, SIZES[res]["batch"], args.data)
        if ips is not None:
            loading[res] = ips
            fastest = max(r["train_img_s"] for r in rows if r["res"] == res)
            print(f"data loading {res} px: {ips:,.0f} img/s = {ips / fastest:.0f}x the fastest training step")
    out = Path(args.out or Path(__file__).parent / "results" / f"speed-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "threads": args.threads, "torch": torch.__version__,
                               "machine": machine_info(threads=args.threads),
                               "rows": rows, "data_loading_img_s": loading}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
