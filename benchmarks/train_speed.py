"""Where one training step of the bundled faces32 UNet spends its time on one CPU thread, and what speeds it up.

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CPP_MARCH=x86-64-v3 \\
        python benchmarks/train_speed.py             # an AVX2-only CPU (fp32: its only fast precision)
    python benchmarks/train_speed.py                 # this CPU as it is (adds bf16 autocast where native)

The step is the trainer's (training/run.py DiffusionRun.micro_step, grad_accum 1): a batch from BatchLoader,
`diffusion_step` (v-prediction, label dropout 0.1), backward, gradient clipping at train.grad_clip, AdamW
with the config's hyperparameters (foreach, as build_trainees makes it), the LR schedule and the EMA update;
the model is built from `load_pipeline("faces32").cfg` and starts from the bundled weights, batch 32.
The data are a synthetic uint8 array of the prepared-cache layout read through the real BatchLoader (flips
on), so "data" is the loader's own cost without disk reads or JPEG decoding (the cache is prepared once).

1. Profile (fp32, plain): torch.profiler's self CPU time per phase (data, forward, backward, clip,
   optimizer, EMA + LR) and per kernel family within them; images/s; MFU = (conv/matmul/attention FLOPs of
   forward + backward, counted by torch.utils.flop_counter.FlopCounterMode) / step time / peak, where the
   peak is the AVX2 fp32 peak of one core, 2 FMA units x 8 lanes x 2 FLOP x clock ('cpu MHz' in
   /proc/cpuinfo). Zen 4 has the same fp32 FLOP per cycle with AVX-512 (256-bit datapaths), so one peak
   serves both runs; bf16 (AVX512-BF16 dot products) peaks at twice that.
2. Side by side, interleaved (A B C ... per round, medians of CPU seconds per step, wall seconds kept too,
   since another benchmark shares these two cores): plain, channels_last (model and input),
   AdamW fused instead of foreach, torch.compile of the model (inductor, compile time reported apart), and
   bf16 autocast (natively only: on AVX2 oneDNN's bf16 is a reference path ~50x slower).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

if "--keep-cache" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-train-speed-")

import numpy as np                                                      # noqa: E402
import torch                                                            # noqa: E402
from torch.profiler import profile, record_function                    # noqa: E402
from torch.utils.flop_counter import FlopCounterMode                   # noqa: E402

from ddpm_faces.data import BatchLoader                                 # noqa: E402
from ddpm_faces.hardware import bf16_native, cpu_label, machine_info    # noqa: E402
from ddpm_faces.pipeline import Pipeline, build_model, load_pipeline    # noqa: E402
from ddpm_faces.training.ema import EMA                                 # noqa: E402
from ddpm_faces.training.lr import make_scheduler                       # noqa: E402
from ddpm_faces.training.step import diffusion_step                     # noqa: E402

CL = torch.channels_last
RESULTS = Path(__file__).parent / "results"
VARIANTS = ("plain", "channels_last", "adamw_fused", "compile", "bf16")
PHASES = ("data", "forward", "backward", "clip", "optimizer", "ema+lr")
FAMILIES = [                                     # first match wins: the order matters
    ("conv", ("convolution", "conv2d", "conv_depthwise", "slow_conv")),
    ("group norm", ("group_norm", "groupnorm")),
    ("SiLU", ("silu",)),
    ("attention / linear", ("bmm", "mm", "addmm", "linear", "scaled_dot_product", "_flash_attention", "baddbmm",
                            "softmax")),
    ("element-wise / copies", ("add", "mul", "sub", "div", "cat", "upsample", "sum", "mean", "pow", "copy_",
                               "_to_copy", "clone", "where", "flip", "fill", "zero", "clamp", "exp", "sqrt",
                               "cos", "sin", "embedding", "index", "rand", "lerp")),
]


def family(name: str) -> str:
    op = name.replace("aten::", "").lower()            # autograd nodes too: ConvolutionBackward0, SiluBackward0
    for label, keys in FAMILIES:
        if any(k in op for k in keys):
            return label
    return "other"


class SyntheticFaces:
    """The prepared cache's layout (uint8 (N, H, W, 3) + (N, n_attributes) labels, -1 = unknown), random."""

    def __init__(self, n: int, resolution: int, vocab_sizes: list[int], seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8)
        self.labels = np.stack([rng.integers(-1, k, n) for k in vocab_sizes], 1).astype(np.int16)

    def indices(self, split: str) -> np.ndarray:
        return np.arange(len(self.images))


class Trainee:
    """One way of training: its own model (from the bundled weights), EMA, AdamW, schedule and loader."""

    def __init__(self, name: str, pipe: Pipeline, batch: int):
        cfg, tc = pipe.cfg, pipe.cfg.train
        self.name, self.cfg, self.tc = name, cfg, tc
        torch.manual_seed(tc.seed)
        model = build_model(cfg)
        model.load_state_dict(pipe.net.state_dict())
        model.train()
        self.channels_last = name == "channels_last"
        if self.channels_last:
            model = model.to(memory_format=CL)
        self.model = model
        self.ema = EMA(model, tc.ema_decay, tc.ema_warmup)
        kind = {"fused": True} if name == "adamw_fused" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas),
                                           weight_decay=tc.weight_decay, **kind)
        self.scheduler = make_scheduler(self.optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        net = torch.compile(model) if name == "compile" else model
        self.live = Pipeline(net, cfg, pipe.source, codec=copy.deepcopy(pipe.codec))
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else nullcontext()
        vocab = [len(cfg.model.vocab[a]) for a in cfg.model.attributes]
        self.loader = iter(BatchLoader(SyntheticFaces(16 * batch, cfg.model.resolution, vocab), "train", batch,
                                       seed=tc.seed, hflip=True))

    def step(self, times: dict | None = None) -> tuple[float, float]:
        """One optimizer step; `times` gets each phase's CPU seconds. Returns the step's (CPU, wall) seconds.

        CPU time (process_time, all of this process's threads) is what the comparisons use: with one thread it
        is the work done, whatever share of a core the other benchmark on this machine leaves us."""
        marks, wall = [time.process_time()], time.perf_counter()
        with record_function("data"):
            batch = next(self.loader)
            images = batch["images"].contiguous(memory_format=CL) if self.channels_last else batch["images"]
        marks.append(time.process_time())
        with record_function("forward"):
            with self.autocast:
                loss = diffusion_step(self.live, images, labels=batch["labels"], label_dropout=self.tc.label_dropout)
        marks.append(time.process_time())
        with record_function("backward"):
            loss.backward()
        marks.append(time.process_time())
        with record_function("clip"):
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
            finite = bool(torch.isfinite(norm) & torch.isfinite(loss))
        marks.append(time.process_time())
        with record_function("optimizer"):
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        marks.append(time.process_time())
        with record_function("ema+lr"):
            self.scheduler.step()
            self.ema.update(self.model)
        marks.append(time.process_time())
        if times is not None:
            for name, a, b in zip(PHASES, marks, marks[1:]):
                times.setdefault(name, []).append(b - a)
        return marks[-1] - marks[0], time.perf_counter() - wall


def step_flops(pipe: Pipeline, batch: int) -> int:
    """FLOPs of forward + backward of one step (convolutions, matmuls, attention), counted by torch."""
    trainee = Trainee("plain", pipe, batch)
    batch_ = next(trainee.loader)
    with FlopCounterMode(display=False) as counter:
        loss = diffusion_step(trainee.live, batch_["images"], labels=batch_["labels"], label_dropout=0.1)
        loss.backward()
    return counter.get_total_flops()


def matmul_flops(n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a large fp32 matmul on this thread: what the kernels reach here (the clock may exceed the
    nominal 'cpu MHz' under boost, so MFU is given against both)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.process_time()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.process_time() - start)


def clock_mhz() -> float:
    with open("/proc/cpuinfo") as f:
        values = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    return statistics.median(values)


def phase_of(event) -> str | None:
    while event is not None:
        if event.name in PHASES:
            return event.name
        event = event.cpu_parent
    return None


def profile_split(pipe: Pipeline, batch: int, steps: int) -> dict:
    """Self CPU time per (phase, kernel family) over `steps` plain fp32 steps, as shares of the total."""
    trainee = Trainee("plain", pipe, batch)
    for _ in range(2):
        trainee.step()
    with profile() as prof:
        for _ in range(steps):
            trainee.step()
    cells: dict[str, float] = {}
    for event in prof.events():
        if event.name in PHASES:
            continue
        where = phase_of(event) or "outside"
        label = where if where in ("data", "clip", "ema+lr", "optimizer") else f"{where}: {family(event.name)}"
        cells[label] = cells.get(label, 0.0) + event.self_cpu_time_total
    whole = sum(cells.values())
    return {k: v / whole for k, v in sorted(cells.items(), key=lambda kv: -kv[1])}


def side_by_side(pipe: Pipeline, names: list[str], batch: int, rounds: int, per_round: int) -> dict:
    trainees, out = {}, {}
    for name in names:
        try:
            trainee = Trainee(name, pipe, batch)
            start = time.perf_counter()
            trainee.step()                                         # compiles the compiled variant (wall time)
            first = time.perf_counter() - start
            trainee.step()
            trainees[name], out[name] = trainee, {"first_step_s": first}
            print(f"  {name}: first step {first:.1f} s", flush=True)
        except Exception as err:                                   # a failing variant is a result
            out[name] = {"failed": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
            print(f"  {name}: FAILED {out[name]['failed']}", flush=True)
    steps = {name: [] for name in trainees}
    walls = {name: [] for name in trainees}
    phases = {name: {} for name in trainees}
    for r in range(rounds):
        for name, trainee in trainees.items():
            for _ in range(per_round):
                cpu, wall = trainee.step(phases[name])
                steps[name].append(cpu)
                walls[name].append(wall)
        print(f"  round {r + 1}/{rounds} (CPU s per step): " +
              ", ".join(f"{n} {statistics.median(s):.2f}" for n, s in steps.items()), flush=True)
    for name in trainees:
        step = statistics.median(steps[name])
        out[name].update(step_s=step, step_wall_s=statistics.median(walls[name]), images_per_s=batch / step,
                         steps_timed=len(steps[name]),
                         phase_s={k: statistics.median(v) for k, v in phases[name].items()})
        out[name]["compile_s"] = max(0.0, out[name]["first_step_s"] - step) if name == "compile" else None
    if "plain" in trainees:
        for name in trainees:
            out[name]["speedup"] = out["plain"]["step_s"] / out[name]["step_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--per-round", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--keep-cache", action="store_true", help="use the usual inductor cache (compile time warm)")
    p.add_argument("--label")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    limited = any(k in os.environ for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"))
    label = args.label or ("avx2" if limited else "native")
    native = bf16_native("cpu")
    names = [v for v in args.variants if v != "bf16" or native]
    info = machine_info(threads=1, precision="fp32")
    info["label"] = cpu_label(info)
    info["torchinductor_cpp_march"] = os.environ.get("TORCHINDUCTOR_CPP_MARCH")
    pipe = load_pipeline("faces32")
    mhz = clock_mhz()
    peak = 2 * 8 * 2 * mhz * 1e6                                  # AVX2 fp32: 2 FMA units x 8 lanes x 2 FLOP
    print(f"{info['label']}; torch {torch.__version__}; 1 thread; batch {args.batch}; clock {mhz:.0f} MHz; "
          f"AVX2 fp32 peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    matmul = matmul_flops()
    print(f"a 2048 x 2048 fp32 matmul runs at {matmul / 1e9:.1f} GFLOP/s ({matmul / peak:.0%} of that peak)",
          flush=True)
    flops = step_flops(pipe, args.batch)
    print(f"FLOPs of one step (forward + backward): {flops / 1e9:.1f} GFLOP", flush=True)
    split = profile_split(pipe, args.batch, args.profile_steps)
    print("share of self CPU time in one fp32 step (plain):")
    for key, share in split.items():
        if share >= 0.002:
            print(f"  {key:40s} {share:6.1%}")
    print("side by side:", flush=True)
    variants = side_by_side(pipe, names, args.batch, args.rounds, args.per_round)
    for name, row in variants.items():
        if "step_s" in row:
            row["mfu_vs_avx2_fp32_peak"] = flops / row["step_s"] / peak
            row["share_of_matmul_flops"] = flops / row["step_s"] / matmul
    print(f"\nCPU seconds (median) per step of {args.batch} images, and per phase")
    print(f"{'variant':15s}{'step s':>9s}{'img/s':>8s}{'x plain':>9s}{'MFU':>8s}{'data':>7s}{'fwd':>7s}{'bwd':>7s}"
          f"{'clip':>7s}{'optim':>7s}{'ema':>7s}  one-off")
    for name, row in variants.items():
        if "step_s" not in row:
            print(f"{name:15s} FAILED: {row['failed']}")
            continue
        ph = row["phase_s"]
        print(f"{name:15s}{row['step_s']:9.3f}{row['images_per_s']:8.1f}{row.get('speedup', float('nan')):9.2f}"
              f"{row['mfu_vs_avx2_fp32_peak']:8.1%}" + "".join(f"{ph[k]:7.3f}" for k in PHASES) +
              (f"  compile {row['compile_s']:.0f} s" if row.get("compile_s") else ""))
    result = {"machine": info, "model": "faces32 (bundled weights, load_pipeline('faces32').cfg)",
              "batch": args.batch, "clock_mhz": mhz, "avx2_fp32_peak_flops": peak, "step_flops": flops,
              "matmul_2048_fp32_flops": matmul,
              "flops_note": "FlopCounterMode: convolutions, matmuls, attention, forward + backward (GroupNorm, SiLU, "
                            "element-wise and the optimizer not counted)",
              "profile_steps": args.profile_steps, "profile_self_cpu_share": split,
              "rounds": args.rounds, "per_round": args.per_round, "variants": variants,
              "skipped": {} if native else {"bf16": "not native under this limit (oneDNN reference path)"},
              "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default")}
    out = Path(args.out or RESULTS / f"train-speed-{label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
