"""What this machine computes natively, the precision "auto" stands for, and the facts a speed figure needs.

    resolve_precision("auto", torch.device("cpu"))    # "bf16" on a CPU with bf16 units, else "fp32"
    machine_info(threads=1, precision="fp32")         # CPU model, ISA flags, torch version: for benchmark JSONs

bf16 is fast only where the hardware has bf16 units: a CUDA GPU that supports it, or a CPU with AVX512-BF16
or AMX, where oneDNN reports bf16 support. Elsewhere (AVX2-only CPUs: AMD before Zen 4, most laptop and
desktop Intel parts) oneDNN falls back to a reference path about 20x slower than fp32, so "auto" is fp32.
An explicit bf16 there still runs, after one warning line.
"""
from __future__ import annotations

import logging
import os
import platform
from functools import lru_cache

import torch

from .errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")        # what a person may ask for
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")   # the ones that set CPU speed
_warned: set[str] = set()


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """True where bf16 runs on the hardware's own units (and so is faster than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16_native()
    return False


@lru_cache(maxsize=1)
def _cpu_bf16_native() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """ "auto" -> "bf16" where it is native, else "fp32"; an explicit choice is checked against the device.

    fp16 runs only on a GPU (CPUs have no fast fp16 path and its range overflows without loss scaling); bf16
    on a CPU without bf16 units runs but warns once that it will be many times slower."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("fp16 needs a CUDA GPU; on the CPU use precision auto (bf16 where the CPU has bf16 "
                        "units, else fp32)")
    if precision == "bf16" and not bf16_native(device):
        warn_once("bf16", f"bf16 on this {device.type.upper()}, which has no bf16 units (AVX512-BF16 or AMX): "
                          "it runs on a slow fallback, many times slower than fp32; precision auto picks fp32 here")
    return precision


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def training_precision(mixed_precision: str, device: torch.device | str = "cpu") -> str:
    """train.mixed_precision ("auto", "no", "fp16", "bf16") as Accelerate's value ("no", "fp16", "bf16")."""
    if mixed_precision == "no":
        return "no"
    resolved = resolve_precision(mixed_precision, device)
    return "no" if resolved == "fp32" else resolved


# ------------------------------------------------------------------------------------------ machine facts
@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_flags() -> dict[str, bool]:
    """The ISA flags that decide CPU speed (ISA_FLAGS), as the kernel reports them; empty if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return {flag: flag in present for flag in ISA_FLAGS}
    except OSError:
        pass
    return {}


def machine_info(*, threads: int | None = None, precision: str | None = None,
                 device: torch.device | str = "cpu") -> dict:
    """What a speed figure was measured on: CPU model and flags, what torch uses of them, threads, precision.

    `kernel_isa` is the instruction set torch's own kernels use and `bf16_native` oneDNN's answer: both follow
    ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, which can restrict a CPU to, say, AVX2 (recorded under
    `isa_limits`), so a figure taken that way says so."""
    device = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "kernel_isa": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_native("cpu"),
        "isa_limits": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if precision is not None:
        info["precision"] = precision
    return info


def cpu_label(info: dict | None = None) -> str:
    """A short name for the CPU a figure came from, e.g. "AMD EPYC (AVX2 only)" or "... (AVX512-BF16)"."""
    info = info or machine_info()
    if info.get("bf16_native"):
        kind = "AMX" if info["cpu_flags"].get("amx_bf16") and not info["isa_limits"] else "AVX512-BF16"
    else:
        kind = "AVX2 only" if info["kernel_isa"] in ("AVX2", "DEFAULT") or info["isa_limits"] else info["kernel_isa"]
    return f"{info['cpu']} ({kind}{', limited by env' if info['isa_limits'] else ''})"
