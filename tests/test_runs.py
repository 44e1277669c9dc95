"""Run folders and weights on disk: layout, exports readable under the umask, recovery from a crash inside
an atomic replacement, and weights that are refused before they draw black or noisy images."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ddpm_faces.errors import UserError
from ddpm_faces.pipeline import load_pipeline
from ddpm_faces.runs import RunFolder, export_model, find_model, list_runs


def test_checkpoints_are_complete_ones_in_step_order(tmp_path):
    run = RunFolder(tmp_path / "r")
    for step in (900, 1000, 80):
        run.checkpoint(step).mkdir(parents=True)
        (run.checkpoint(step) / "state.json").write_text("{}")
    run.checkpoint(2000).mkdir()                                   # no state.json: incomplete
    (run.checkpoints_dir / "step-3000.tmp").mkdir()
    assert [p.name for p in run.checkpoints()] == ["step-80", "step-900", "step-1000"]
    assert run.latest_checkpoint() == run.checkpoint(1000)
    assert run.sample_grid(12).name == "step-0000012.png"
    run.config.write_text("name: r\n")
    (tmp_path / "not-a-run").mkdir()
    assert list_runs(tmp_path) == ["r"] and list_runs(tmp_path / "nowhere") == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_exports_are_readable_as_the_umask_allows(tmp_path, unconditional_model, umask, mode):
    pipe = load_pipeline(unconditional_model)
    old = os.umask(umask)
    try:
        out = export_model(pipe.net, pipe.cfg, tmp_path / "shipped")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.yaml"):
        assert (out / name).stat().st_mode & 0o777 == mode


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_one_nan_in_the_weights_is_refused_naming_the_tensor(tmp_path, unconditional_model):
    folder = _copy(unconditional_model, tmp_path / "nan")
    weights = folder / "model.safetensors"
    from safetensors import safe_open
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    state = load_file(weights)
    name = sorted(state)[3]
    state[name].view(-1)[0] = float("nan")
    save_file(state, weights, metadata=metadata)
    with pytest.raises(UserError, match=f"1 non-finite value.*{name}"):
        load_pipeline(folder)


def test_a_config_with_other_diffusion_settings_is_refused(tmp_path, unconditional_model):
    folder = _copy(unconditional_model, tmp_path / "v")
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["diffusion"]["prediction"] = "v" if cfg["diffusion"]["prediction"] != "v" else "eps"
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "ddpm_faces", "sample", "--checkpoint", str(folder), "--num", "1",
                          "--steps", "2", "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "another diffusion config" in lines[0]
    assert "prediction" in lines[0], out.stderr


def test_the_bundled_model_records_its_diffusion_settings():
    from safetensors import safe_open

    with safe_open(find_model("faces32").weights, "pt") as f:
        assert '"prediction": "v"' in f.metadata()["diffusion"]


KILL_BETWEEN_RENAMES = """
import os, signal, sys, torch
from pathlib import Path
from ddpm_faces import io
from ddpm_faces.pipeline import load_pipeline
from ddpm_faces.runs import export_model

pipe = load_pipeline(sys.argv[1])
calls = []
real = os.replace
def replace(a, b):
    calls.append((a, b))
    if len(calls) == 2:                    # final -> final.old done; the process dies before tmp -> final
        os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b)
io.os.replace = replace
with torch.no_grad():
    for p in pipe.net.parameters():
        p.add_(1.0)
export_model(pipe.net, pipe.cfg, Path(sys.argv[2]), step=7)
"""


def test_a_kill_between_the_two_renames_of_an_export_is_recovered(tmp_path, unconditional_model):
    target = _copy(unconditional_model, tmp_path / "export")
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_BETWEEN_RENAMES))
    out = subprocess.run([sys.executable, str(script), str(unconditional_model), str(target)],
                         capture_output=True, text=True)
    assert out.returncode == -9, out.stderr
    assert not target.exists() and (tmp_path / "export.old").is_dir() and (tmp_path / "export.tmp").is_dir()
    pipe = load_pipeline(target)                                   # repaired: the new, complete export
    assert pipe.step == 7 and target.is_dir() and not (tmp_path / "export.old").exists()
    original = load_pipeline(unconditional_model)
    first = next(iter(original.net.state_dict()))
    assert torch.allclose(pipe.net.state_dict()[first], original.net.state_dict()[first] + 1.0)


def test_an_interrupted_checkpoint_swap_is_listed_again(tmp_path):
    run = RunFolder(tmp_path / "r")
    step = run.checkpoint(10)
    old = step.with_name("step-10.old")
    tmp = step.with_name("step-10.tmp")
    for folder, text in ((old, "old"), (tmp, "new")):
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(text)
    assert run.checkpoints() == [step] and (step / "state.json").read_text() == "new"
    assert not old.exists() and not tmp.exists()
