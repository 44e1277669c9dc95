"""Faster fp32 sampling on one CPU thread? The bundled models through five inference paths, side by side.

    python benchmarks/fast_path.py                                    # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CPP_MARCH=x86-64-v3 \\
        python benchmarks/fast_path.py                                # standing in for an AVX2-only CPU

Variants of the denoiser (pipe.net) and, for latent128, of the decoder (pipe.codec.decode):
  plain          the network as load_pipeline returns it
  channels_last  a copy in torch.channels_last, inputs made channels-last (outputs made contiguous again)
  compile        torch.compile (inductor), batch marked dynamic so batch 4 and 8 share one graph
  cl_compile     channels_last + compile
  freeze         compile with torch._inductor.config.freezing (weights folded and prepacked for oneDNN); only
                 when asked for: in a probe (faces32, batch 4, dynamic batch) it ran 1.3x slower than plain
  onnx           torch.onnx.export (TorchScript exporter, dynamic batch) + onnxruntime CPUExecutionProvider
  bf16           (reference, only where bf16 is native) generate()'s precision="bf16": bf16 autocast on the net

Every variant takes (x, t, cond) with t cast to float32 and cond=None replaced by "unspecified" labels (what
the UNet does itself with cond=None), so a compiled graph or an ONNX graph serves every call of a sampler.

Per variant: the denoiser's latency per call at batch 4 (4 faces, unguided) and 8 (4 faces with classifier-free
guidance: Denoiser.output batches the conditional and unconditional halves into one call of 2 x 4), the
decoder's latency for 4 latents, and end to end `generate(pipe, SamplingRequest(num=4, seed=0, steps=S))` for
S = 20 and 10 (the default sampler, dpmpp-2m, one call per step; decoding included) with the variant's net
and decoder, plus the largest difference of those images from the plain path's, in grey levels. One-off
costs (compile, export, session start) are reported separately. Variants are timed interleaved in one process
(A B C ... A B C ...) and medians taken, so background load hits them alike; the figures compared are CPU
seconds of this process (wall seconds are in the JSON too: another benchmark shares these two cores).
One torch thread, one onnxruntime thread (intra and inter op).

Caveats: onnxruntime (MLAS) picks its kernels from CPUID and ignores ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY,
so in an AVX2-limited run its numbers still come from AVX-512 kernels (flagged in the JSON). Inductor's
generated C++ follows ATEN_CPU_CAPABILITY; TORCHINDUCTOR_CPP_MARCH=x86-64-v3 keeps g++ from -march=native.
Compile time is measured on an empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR per run unless
--keep-cache); kernels compiled for the first model are reused by the second where identical.
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
import warnings
from pathlib import Path

if "--keep-cache" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-fast-path-")

import numpy as np                                                     # noqa: E402
import torch                                                           # noqa: E402
from torch import nn                                                   # noqa: E402

from ddpm_faces.hardware import bf16_native, cpu_label, machine_info   # noqa: E402
from ddpm_faces.models import Codec                                    # noqa: E402
from ddpm_faces.pipeline import Pipeline, SamplingRequest, generate, load_pipeline   # noqa: E402

CL = torch.channels_last
VARIANTS = ("plain", "channels_last", "compile", "cl_compile", "freeze", "onnx", "bf16")
RESULTS = Path(__file__).parent / "results"


# ------------------------------------------------------------------------------------------------ variants
class Normalised(nn.Module):
    """net(x, t, cond) with t as float32 and cond=None as all-unspecified labels: one signature, one graph."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, cond)


def unspecified(net, n: int) -> torch.Tensor | None:
    return net.cond_embedding.unspecified(n) if getattr(net, "conditional", False) else None


def args_of(net, x, t, cond):
    """The (x, t, cond) every variant sees: float t, explicit labels on a conditional net."""
    return x, t.to(torch.float32), cond if cond is not None else unspecified(net, len(x))


# One wrapper class per compiled variant: dynamo caches graphs on the code object it compiles and (with nn
# modules inlined) does not guard on which module instance runs, so two compiled copies of the UNet called
# through the same code would share one graph, e.g. a frozen variant would silently run the unfrozen graph.
class CompiledNet(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args):
        return self.net(*args)


class CompiledNetCL(CompiledNet):
    def forward(self, *args):
        return self.net(*args)


class FrozenNet(CompiledNet):
    def forward(self, *args):
        return self.net(*args)


WRAPPERS = {"compile": CompiledNet, "cl_compile": CompiledNetCL, "freeze": FrozenNet}


def torch_variant(net: nn.Module, name: str, *, channels_last: bool, compile_: bool, freeze: bool = False):
    """A callable (x, t, cond=None) -> out that runs a copy of net this variant's way."""
    module = copy.deepcopy(net).eval()
    if channels_last:
        module = module.to(memory_format=CL)
    run = torch.compile(WRAPPERS[name](module)) if compile_ else module

    def call(x, t, cond=None):
        x, t, cond = args_of(net, x, t, cond)
        if channels_last:
            x = x.contiguous(memory_format=CL)
        if compile_:
            for tensor in (x, t) + ((cond,) if cond is not None else ()):
                torch._dynamo.mark_dynamic(tensor, 0)
        with freezing(freeze):
            out = run(x, t, cond) if cond is not None else run(x, t)
        return out.contiguous()
    return call


class freezing:
    """torch._inductor.config.freezing on while a frozen variant runs (its graphs compile on first call)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        import torch._inductor.config as ic
        self.before = ic.freezing
        ic.freezing = self.on or self.before

    def __exit__(self, *exc):
        import torch._inductor.config as ic
        ic.freezing = self.before


def ort_session(path: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def export_onnx(module: nn.Module, example: tuple, names: list[str], path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, path, dynamo=False, input_names=names, output_names=["out"],
                          dynamic_axes={k: {0: "batch"} for k in names + ["out"]}, opset_version=17)


def onnx_net(net: nn.Module, shape: tuple, folder: str) -> tuple:
    """(call, export seconds, session seconds) for the denoiser through onnxruntime."""
    x, t = torch.randn(2, *shape), torch.full((2,), 500.5)
    cond = unspecified(net, 2)
    module, names = (Normalised(net), ["x", "t", "cond"]) if cond is not None else (net, ["x", "t"])
    example = (x, t, cond) if cond is not None else (x, t)
    path = os.path.join(folder, "net.onnx")
    start = time.perf_counter()
    export_onnx(module, example, names, path)
    exported = time.perf_counter()
    session = ort_session(path)
    started = time.perf_counter()

    def call(x, t, cond=None):
        x, t, cond = args_of(net, x, t, cond)
        feed = {"x": x.numpy(), "t": t.numpy()}
        if cond is not None:
            feed["cond"] = cond.numpy()
        return torch.from_numpy(session.run(None, feed)[0])
    return call, exported - start, started - exported


def onnx_decoder(codec: Codec, folder: str) -> tuple:
    decoder = codec.autoencoder.decoder
    path = os.path.join(folder, "decoder.onnx")
    start = time.perf_counter()
    export_onnx(decoder, (torch.randn(2, *codec.shape),), ["z"], path)
    exported = time.perf_counter()
    session = ort_session(path)
    started = time.perf_counter()
    scale, shift = codec.scale.view(1, -1, 1, 1), codec.shift.view(1, -1, 1, 1)

    def decode(x):
        z = (x * scale + shift).float().contiguous()
        return torch.from_numpy(session.run(None, {"z": z.numpy()})[0]).clamp(-1, 1)
    return decode, exported - start, started - exported


class CompiledDecoder(CompiledNet):
    def forward(self, *args):
        return self.net(*args)


class CompiledDecoderCL(CompiledNet):
    def forward(self, *args):
        return self.net(*args)


class FrozenDecoder(CompiledNet):
    def forward(self, *args):
        return self.net(*args)


DECODER_WRAPPERS = {"compile": CompiledDecoder, "cl_compile": CompiledDecoderCL, "freeze": FrozenDecoder}


def torch_decoder(codec: Codec, name: str, *, channels_last: bool, compile_: bool, freeze: bool = False):
    if not hasattr(codec, "autoencoder"):
        return codec.decode
    decoder = copy.deepcopy(codec.autoencoder.decoder).eval()
    if channels_last:
        decoder = decoder.to(memory_format=CL)
    run = torch.compile(DECODER_WRAPPERS[name](decoder)) if compile_ else decoder
    scale, shift = codec.scale.view(1, -1, 1, 1), codec.shift.view(1, -1, 1, 1)

    def decode(x):
        z = x * scale + shift
        if channels_last:
            z = z.contiguous(memory_format=CL)
        if compile_:
            torch._dynamo.mark_dynamic(z, 0)
        with freezing(freeze):
            return run(z).clamp(-1, 1).contiguous()
    return decode


class CallableNet(nn.Module):
    """A Pipeline's net that runs `fn`; holds the original net so Pipeline.device still finds its parameters."""

    def __init__(self, fn, original: nn.Module):
        super().__init__()
        self.fn, self.original = fn, original

    def forward(self, x, t, cond=None):
        return self.fn(x, t, cond)


class DecodeWith(Codec):
    """`codec` with its decode replaced by `fn` (encode is not used when sampling)."""

    def __init__(self, codec: Codec, fn):
        super().__init__()
        self.inner, self.fn = codec, fn
        self.shape, self.image_size, self.bounded = codec.shape, codec.image_size, codec.bounded

    def decode(self, x):
        return self.fn(x)


class Variant:
    def __init__(self, name, net, decode, setup: dict, precision: str = "fp32"):
        self.name, self.net, self.decode, self.setup, self.precision = name, net, decode, setup, precision

    def pipeline(self, pipe: Pipeline) -> Pipeline:
        if self.name in ("plain", "bf16"):
            return pipe
        return Pipeline(CallableNet(self.net, pipe.net), pipe.cfg, pipe.source, pipe.step,
                        codec=DecodeWith(pipe.codec, self.decode))


def build_variant(name: str, pipe: Pipeline, folder: str) -> Variant:
    net, codec = pipe.net, pipe.codec
    if name == "plain":
        return Variant(name, net, codec.decode, {})
    if name == "bf16":
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(*args).float()
        return Variant(name, run, codec.decode, {}, precision="bf16")     # generate's bf16: decoder in fp32
    if name == "onnx":
        call, export_s, session_s = onnx_net(net, codec.shape, folder)
        setup = {"net_export_s": export_s, "net_session_s": session_s}
        decode = codec.decode
        if hasattr(codec, "autoencoder"):
            decode, export_s, session_s = onnx_decoder(codec, folder)
            setup.update(decoder_export_s=export_s, decoder_session_s=session_s)
        return Variant(name, call, decode, setup)
    opts = dict(channels_last=name in ("channels_last", "cl_compile"),
                compile_=name in ("compile", "cl_compile", "freeze"), freeze=name == "freeze")
    return Variant(name, torch_variant(net, name, **opts), torch_decoder(codec, name, **opts), {})


def first_calls(variant: Variant, pipe: Pipeline) -> None:
    """Run each shape once (compiles a compiled variant; the time of each first call goes into setup)."""
    shape = pipe.codec.shape
    with torch.inference_mode():
        for key, call in (("net_first_call_b4_s", lambda: variant.net(torch.randn(4, *shape), torch.full((4,), 999))),
                          ("net_first_call_b8_s", lambda: variant.net(*guided_inputs(pipe, 8))),
                          ("decoder_first_call_s", lambda: variant.decode(torch.randn(4, *shape)))):
            start = time.perf_counter()
            call()
            variant.setup[key] = time.perf_counter() - start


def guided_inputs(pipe: Pipeline, n: int):
    """A guided call's inputs: n // 2 images twice, labelled and all-unspecified (Denoiser.output)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n // 2, *pipe.codec.shape, generator=g)
    t = torch.full((n // 2,), 412.37)
    if not pipe.conditional:
        return torch.cat([x, x]), torch.cat([t, t])
    cond = pipe.labels({pipe.cfg.model.attributes[0]: pipe.cfg.model.vocab[pipe.cfg.model.attributes[0]][0]}, n // 2)
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.full_like(cond, -1)])


# ------------------------------------------------------------------------------------------------ timing
def median_call(fn, n: int) -> tuple[float, float]:
    """Median wall and CPU seconds of n calls. CPU time (process_time: every thread of this process) is what
    the comparisons use: with one thread it is the work done, whatever share of a core the other benchmark
    on this machine leaves us; wall time is kept beside it."""
    walls, cpus = [], []
    for _ in range(n):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def measure_round(variant: Variant, pipe: Pipeline, steps: list[int], calls: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    x4, t4 = torch.randn(4, *pipe.codec.shape, generator=g), torch.full((4,), 700)
    x8 = guided_inputs(pipe, 8)
    row, images = {}, {}
    with torch.inference_mode():
        for key, fn, n in (("net_b4", lambda: variant.net(x4, t4), calls),
                           ("net_b8_guided", lambda: variant.net(*x8), max(1, calls // 2)),
                           ("decoder_b4", lambda: variant.decode(x4), max(1, calls // 2))):
            row[f"{key}_wall_s"], row[f"{key}_s"] = median_call(fn, n)
    sampling = variant.pipeline(pipe)
    for s in steps:
        request = SamplingRequest(num=4, seed=0, steps=s, precision=variant.precision)
        wall, cpu = time.perf_counter(), time.process_time()
        images[s] = generate(sampling, request, progress=False)
        row[f"e2e_{s}_steps_wall_s"] = time.perf_counter() - wall
        row[f"e2e_{s}_steps_s"] = time.process_time() - cpu
    return row, images


def run_model(name: str, variants: list[str], rounds: int, steps: list[int], calls: int) -> dict:
    pipe = load_pipeline(name)
    torch._dynamo.reset()              # the other model's graphs would make dynamo treat channels as dynamic
    folder = tempfile.mkdtemp(prefix=f"fast-path-{name}-")
    built, failed = {}, {}
    for v in variants:
        try:
            start = time.perf_counter()
            variant = build_variant(v, pipe, folder)
            variant.setup["build_s"] = time.perf_counter() - start
            first_calls(variant, pipe)
            built[v] = variant
            print(f"  {name} {v}: ready, " + ", ".join(f"{k} {s:.1f}" for k, s in variant.setup.items()), flush=True)
        except Exception as err:                      # a failing variant is a result, not a crash
            failed[v] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            print(f"  {name} {v}: FAILED {failed[v]}", flush=True)
    rows = {v: [] for v in built}
    diffs = {v: {} for v in built}
    reference: dict = {}
    for r in range(rounds):
        for v, variant in built.items():
            row, images = measure_round(variant, pipe, steps, calls)
            rows[v].append(row)
            if v == "plain" and r == 0:
                reference = images
            for s, im in images.items():
                if s in reference:
                    d = np.abs(im.astype(np.int16) - reference[s].astype(np.int16))
                    prev = diffs[v].get(s, (0, 0.0))
                    diffs[v][s] = (max(prev[0], int(d.max())), max(prev[1], float((d > 1).mean())))
        print(f"  {name}: round {r + 1}/{rounds} done", flush=True)
    out = {"model": name, "variants": {}, "failed": failed}
    for v, variant in built.items():
        med = {k: statistics.median(row[k] for row in rows[v]) for k in rows[v][0]}
        med.update({f"setup_{k}": s for k, s in variant.setup.items()})
        for s, (worst, share) in diffs[v].items():
            med[f"e2e_{s}_max_abs_diff_grey"] = worst
            med[f"e2e_{s}_share_pixels_off_by_more_than_1"] = share
        med["precision"] = variant.precision
        out["variants"][v] = med
    plain = out["variants"].get("plain")
    if plain:
        for v, med in out["variants"].items():
            for key in [k for k in med if k.endswith("_s") and not k.startswith("setup_") and "_wall" not in k]:
                med[f"speedup_{key[:-2]}"] = plain[key] / med[key]
    return out


def table(result: dict, steps: list[int]) -> str:
    cols = ["net_b4_s", "net_b8_guided_s", "decoder_b4_s"] + [f"e2e_{s}_steps_s" for s in steps]
    names = ["net b4 ms", "net b8 ms", "decoder ms"] + [f"{s} steps s" for s in steps]
    head = f"{'variant':14s}" + "".join(f"{c:>14s}" for c in names) + \
        "".join(f"{f'x e2e{s}':>10s}" for s in steps) + "".join(f"{f'grey{s}':>8s}" for s in steps) + "   one-off (s)"
    lines = [f"{result['model']} (CPU time, median: ms per call; s end to end for 4 faces; x = speed-up on the plain "
             "path; grey = largest difference from the plain path's images, in grey levels)", head]
    for v, med in result["variants"].items():
        cells = "".join(f"{med[c] * (1000 if not c.startswith('e2e') else 1):14.{0 if not c.startswith('e2e') else 2}f}"
                        for c in cols)
        cells += "".join(f"{med.get(f'speedup_e2e_{s}_steps', float('nan')):10.2f}" for s in steps)
        cells += "".join(f"{med.get(f'e2e_{s}_max_abs_diff_grey', -1):8d}" for s in steps)
        setup = {k[6:]: s for k, s in med.items() if k.startswith("setup_") and s >= 0.5}
        lines.append(f"{v:14s}{cells}   " + ", ".join(f"{k} {s:.0f}" for k, s in setup.items()))
    for v, why in result["failed"].items():
        lines.append(f"{v:14s} FAILED: {why}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["faces32", "latent128"])
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "freeze"], choices=VARIANTS,
                   help="default: all but freeze (with the batch dynamic it ran 1.3x slower than plain, in a probe)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[20, 10])
    p.add_argument("--calls", type=int, default=5, help="network calls per latency median, per round")
    p.add_argument("--keep-cache", action="store_true", help="use the usual inductor cache (compile time warm)")
    p.add_argument("--label", help="default: native or avx2, from the environment")
    p.add_argument("--out", help="default: benchmarks/results/fast-path-<label>.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    native = bf16_native("cpu")
    variants = [v for v in args.variants if v != "bf16" or native]
    label = args.label or ("native" if not any(k in os.environ for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"))
                           else "avx2")
    info = machine_info(threads=1, precision="fp32")
    info["label"] = cpu_label(info)
    info["torchinductor_cpp_march"] = os.environ.get("TORCHINDUCTOR_CPP_MARCH")
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_note"] = "MLAS picks kernels from CPUID: it ignores the ISA limits above"
    except ImportError:
        pass
    print(info["label"], f"torch {torch.__version__}, 1 thread; variants: {', '.join(variants)}", flush=True)
    result = {"machine": info, "rounds": args.rounds, "steps": args.steps, "calls": args.calls,
              "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
              "skipped": {} if native or "bf16" not in args.variants else
              {"bf16": "bf16 is not native under this limit (oneDNN reference path, ~50x slower than fp32)"},
              "models": {}}
    start = time.perf_counter()
    for name in args.models:
        result["models"][name] = run_model(name, variants, args.rounds, args.steps, args.calls)
        print(table(result["models"][name], args.steps), flush=True)
    result["wall_s"] = time.perf_counter() - start
    out = Path(args.out or RESULTS / f"fast-path-{label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
