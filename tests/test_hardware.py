"""Precision "auto": bf16 only where the hardware computes it natively, one warning for a slow explicit bf16,
one-line errors for what cannot run, and the machine facts every speed figure carries."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ddpm_faces import hardware
from ddpm_faces.errors import UserError
from ddpm_faces.hardware import bf16_native, machine_info, resolve_precision, training_precision
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline


@pytest.fixture
def cpu_has_bf16(monkeypatch):
    """Set the answer of the CPU's bf16 check (oneDNN's) for one test."""
    def answer(value: bool):
        monkeypatch.setattr(hardware, "_cpu_bf16_native", lambda: value)
        monkeypatch.setattr(hardware, "_warned", set())
    return answer


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_where_the_cpu_has_bf16_units(cpu_has_bf16, native, expected):
    cpu_has_bf16(native)
    assert resolve_precision("auto", "cpu") == expected
    assert training_precision("auto", "cpu") == {"bf16": "bf16", "fp32": "no"}[expected]
    assert training_precision("no", "cpu") == "no" and resolve_precision("fp32") == "fp32"


def test_explicit_bf16_without_bf16_units_runs_but_warns_once(cpu_has_bf16, caplog):
    cpu_has_bf16(False)
    with caplog.at_level(logging.WARNING, logger="ddpm_faces.hardware"):
        assert resolve_precision("bf16") == "bf16"
        assert resolve_precision("bf16") == "bf16"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "slower than fp32" in warnings[0] and "\n" not in warnings[0]


def test_explicit_bf16_with_bf16_units_is_silent(cpu_has_bf16, caplog):
    cpu_has_bf16(True)
    with caplog.at_level(logging.WARNING, logger="ddpm_faces.hardware"):
        assert resolve_precision("bf16") == "bf16"
    assert caplog.records == []


@pytest.mark.parametrize("precision, words", [("fp16", "GPU"), ("fp8", "unknown precision"), ("", "unknown")])
def test_what_cannot_run_on_a_cpu_is_one_line(precision, words):
    with pytest.raises(UserError) as err:
        resolve_precision(precision, "cpu")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_sampling_request_resolves_auto_for_its_device(cpu_has_bf16):
    pipe = load_pipeline("faces32")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        cpu_has_bf16(native)
        assert SamplingRequest().validate(pipe).precision == expected
    with pytest.raises(UserError, match="GPU"):
        SamplingRequest(precision="fp16").validate(pipe)


def test_auto_on_this_machine_draws_the_fp32_faces_or_their_bf16_rounding():
    """One real run with the machine's own answer: fp32 where there are no bf16 units (the same images), and
    where there are, bf16 faces that stay close to the fp32 ones (same seed, same noise)."""
    pipe = load_pipeline("faces32")
    request = SamplingRequest(num=2, steps=8, seed=3)
    auto = generate(pipe, request, progress=False).astype(int)
    fp32 = generate(pipe, request.replace(precision="fp32"), progress=False).astype(int)
    if not bf16_native("cpu"):
        assert np.array_equal(auto, fp32)
    else:
        assert 0 < np.abs(auto - fp32).mean() < 8


def test_machine_info_names_the_cpu_its_flags_and_the_precision(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = machine_info(threads=1, precision="fp32")
    assert info["cpu"] and info["torch"] == torch.__version__ and info["threads"] == 1
    assert info["precision"] == "fp32" and info["isa_limits"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert set(info["cpu_flags"]) <= set(hardware.ISA_FLAGS)
    assert info["bf16_native"] == bf16_native("cpu")
