"""Nothing the user made is lost: kill -9 (also in the middle of writing a checkpoint), Ctrl-C, SIGTERM,
non-finite losses, an unwritable run folder and a full disk (simulated, and a real small tmpfs). Resumed runs
must end with the weights of an uninterrupted one (CPU, deterministic)."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from ddpm_faces.cli import FIXES
from ddpm_faces.config import load_config
from ddpm_faces.errors import UserError
from ddpm_faces.runs import RunFolder
from ddpm_faces.runs import checkpoints as checkpoint_module
from ddpm_faces.training import step as step_module
from ddpm_faces.training import train

pytestmark = pytest.mark.slow          # the integration tier (real training runs killed, interrupted and resumed): `make test-fast` leaves it out

STEPS = 24


def overrides(root: Path, data: Path, **extra) -> list[str]:
    values = {"train.max_steps": STEPS, "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
              "train.eval_every": 100, "train.sample_every": 100, "train.log_every": 4, "train.threads": 1}
    values.update(extra)
    return tiny_overrides(root, data, **values)


def list_checkpoints(run: Path) -> list[Path]:
    return RunFolder(run).checkpoints()


def final_weights(root: Path) -> dict:
    return load_file(root / "runs" / "tiny" / "checkpoints" / f"step-{STEPS}" / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, face_folder) -> dict:
    root = tmp_path_factory.mktemp("straight")
    train(load_config("quickstart", overrides(root, face_folder)), progress=False)
    return final_weights(root)


# a training process whose checkpoint writes are slowed down, so that a kill can land inside one
SLOW_SAVE = """
import sys, time
import ddpm_faces.runs.checkpoints as checkpoints
save_file = checkpoints.save_file
def slow(*args, **kwargs):
    time.sleep(0.2)
    return save_file(*args, **kwargs)
checkpoints.save_file = slow                 # two per checkpoint: 0.4 s more
from ddpm_faces.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(root: Path, data: Path, resume: bool = False) -> subprocess.Popen:
    args = ["train", "--config", "quickstart", "--no-progress", *sum((["--set", o] for o in overrides(root, data)), [])]
    if resume:
        args = ["train", "--config", str(root / "runs" / "tiny"), "--resume", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the kill: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting to kill the training process")
        time.sleep(0.01)


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, face_folder, uninterrupted):
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    # 1. killed while a checkpoint is being written (its .tmp folder exists)
    proc = start(tmp_path, face_folder)
    wait_for(lambda: ckpts.is_dir() and any(p.name.endswith(".tmp") and p.name != "step-2.tmp"
                                            for p in ckpts.iterdir()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    half = [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert half, "the kill should have left a half-written checkpoint behind"
    newest = list_checkpoints(tmp_path / "runs" / "tiny")[-1]
    assert (newest / "state.json").is_file() and not newest.name.endswith(".tmp")
    # 2. resumed, and killed again at a random later step
    proc = start(tmp_path, face_folder, resume=True)
    target = int(newest.name.split("-")[1]) + 2 + int(torch.randint(0, 8, (1,)))
    wait_for(lambda: any(p.name == f"step-{min(target, STEPS - 2)}" for p in ckpts.iterdir()), proc)
    time.sleep(float(torch.rand(())) * 0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 3. resumed to the end
    proc = start(tmp_path, face_folder, resume=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert same(final_weights(tmp_path), uninterrupted)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly_then_resume_matches(tmp_path, face_folder, uninterrupted):
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    proc = start(tmp_path, face_folder)
    wait_for(lambda: (ckpts / "step-4").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted after" in out and "--resume" in out
    stopped = list_checkpoints(tmp_path / "runs" / "tiny")[-1]
    assert int(stopped.name.split("-")[1]) < STEPS
    proc = start(tmp_path, face_folder, resume=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert same(final_weights(tmp_path), uninterrupted)


def stopped_by(sig: int, tmp_path: Path, face_folder: Path):
    """A real training process sent `sig` once its step-4 checkpoint exists: (process, stdout, stderr, run)."""
    run = tmp_path / "runs" / "tiny"
    sets = sum((["--set", o] for o in overrides(tmp_path, face_folder)), [])
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_faces", "train", "--no-progress", *sets], text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: (run / "checkpoints" / "step-4").is_dir(), proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc, out, err, run


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resume_matches(tmp_path, face_folder, uninterrupted):
    """SIGTERM is how Slurm, Kubernetes and docker stop end a job: treated like Ctrl-C."""
    proc, out, err, run = stopped_by(signal.SIGTERM, tmp_path, face_folder)
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert f"Continue with: ddpm-faces train --config {run} --resume" in out
    stopped = list_checkpoints(run)[-1]
    assert 4 <= int(stopped.name.split("-")[1]) < STEPS
    resumed = subprocess.run([sys.executable, "-m", "ddpm_faces", "train", "--config", str(run), "--resume",
                              "--no-progress"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same(final_weights(tmp_path), uninterrupted)


def test_second_ctrl_c_quits_at_once(tmp_path, face_folder):
    proc = start(tmp_path, face_folder)
    wait_for(lambda: (tmp_path / "runs" / "tiny" / "checkpoints" / "step-2").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)                  # two signals sent at once reach Python as one; the save takes 0.4 s
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err


def nan_at(steps: set[int]):
    """A diffusion_loss that returns NaN on the given calls (0-based), the true loss otherwise."""
    real, calls = step_module.diffusion_loss, {"n": 0}

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        calls["n"] += 1
        return value * float("nan") if calls["n"] - 1 in steps else value
    return loss


def test_non_finite_losses_are_skipped_and_counted(tmp_path, face_folder, monkeypatch):
    monkeypatch.setattr(step_module, "diffusion_loss", nan_at({3, 4}))
    result = train(load_config("quickstart", overrides(tmp_path, face_folder, **{"train.max_steps": 8})),
                   progress=False)
    assert result.step == 8 and result.skipped_steps == 2
    weights = load_file(tmp_path / "runs" / "tiny" / "checkpoints" / "step-8" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_losses_in_a_row_stop_the_run_with_the_last_checkpoint_intact(tmp_path, face_folder, monkeypatch):
    monkeypatch.setattr(step_module, "diffusion_loss", nan_at(set(range(5, 100))))
    cfg = load_config("quickstart", overrides(tmp_path, face_folder, **{"train.max_bad_steps": 3}))
    with pytest.raises(UserError, match="3 steps in a row had a non-finite loss.*step-4.*intact"):
        train(cfg, progress=False)
    newest = list_checkpoints(tmp_path / "runs" / "tiny")[-1]
    assert newest.name == "step-4"
    assert all(torch.isfinite(w).all() for w in load_file(newest / "model.safetensors").values())


def test_unwritable_run_folder_fails_before_training(tmp_path, face_folder):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder should go")
    cfg = load_config("quickstart", overrides(tmp_path, face_folder, **{"train.out_dir": str(blocker / "runs")}))
    started = time.perf_counter()
    with pytest.raises(UserError, match="cannot write the run folder .*train.out_dir"):
        train(cfg, progress=False)
    assert time.perf_counter() - started < 5


def test_disk_full_at_save_keeps_the_previous_checkpoint(tmp_path, face_folder, monkeypatch):
    real, calls = checkpoint_module.save_file, {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if "step-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(UserError, match="step 4.*No space left on device.*step-2, is intact.*continue the run") as err:
        train(load_config("quickstart", overrides(tmp_path, face_folder)), progress=False)
    assert err.value.worded(FIXES).endswith(f"ddpm-faces train --config {tmp_path / 'runs' / 'tiny'} --resume")
    ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path / "runs" / "tiny")] == ["step-2"]
    assert not list(ckpts.glob("*.tmp"))
    assert load_file(ckpts / "step-2" / "model.safetensors")


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MB tmpfs, unmounted afterwards (needs root and a working mount)."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root")
    if shutil.which("mount") is None:
        pytest.skip("a real full disk needs a small tmpfs: no mount command here")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"a real full disk needs a small tmpfs, which cannot be mounted here: {out.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Fill the file system of `disk` up to `leave` free bytes."""
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(disk).free - leave))


@pytest.mark.parametrize("fails_in, error", [("model.safetensors", "SafetensorError"),
                                             ("optimizer.pt", "RuntimeError")])
def test_a_really_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_disk, tmp_path, face_folder,
                                                                      uninterrupted, fails_in, error):
    """On a real full file system safetensors and torch.save raise their own errors, not OSError."""
    cfg = load_config("quickstart", overrides(tmp_path, face_folder, **{"train.out_dir": str(small_disk / "runs")}))
    train(cfg, progress=False, until_step=2)
    run = small_disk / "runs" / "tiny"
    size = {p.name: p.stat().st_size for p in (run / "checkpoints" / "step-2").iterdir()}
    room = {"model.safetensors": size["model.safetensors"] // 2,         # model.safetensors of step 4 cannot fit
            "optimizer.pt": size["model.safetensors"] + size["ema.safetensors"] + 2**16}[fails_in]
    fill(small_disk, leave=room)
    resume = [sys.executable, "-m", "ddpm_faces", "train", "--config", str(run), "--resume", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write the checkpoint of step 4 in {run}: {error}"), last
    assert f"the last complete checkpoint, {run / 'checkpoints' / 'step-2'}, is intact" in last
    assert [p.name for p in list_checkpoints(run)] == ["step-2"] and not list(run.glob("checkpoints/*.tmp"))
    (small_disk / "filler").unlink()                                     # space again: the run goes on from step 2
    out = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert same(load_file(run / "checkpoints" / f"step-{STEPS}" / "model.safetensors"), uninterrupted)


def test_damaged_checkpoint_is_a_one_line_error_and_the_one_before_still_resumes(tmp_path, face_folder):
    cfg = load_config("quickstart", overrides(tmp_path, face_folder, **{"train.max_steps": 4}))
    train(cfg, progress=False)
    run = tmp_path / "runs" / "tiny"
    newest = list_checkpoints(run)[-1]
    (newest / "model.safetensors").write_bytes(b"\x00" * 100)
    more = load_config(run, ["train.max_steps=6"])
    with pytest.raises(UserError, match="step-4 cannot be read.*delete that folder"):
        train(more, resume=True, progress=False)
    shutil.rmtree(newest)
    assert train(more, resume=True, progress=False).step == 6


def test_a_closed_output_pipe_does_not_end_training(tmp_path, face_folder):
    """`ddpm-faces train ... | head`: once the reader is gone the run keeps training, silently, to its end."""
    run = tmp_path / "runs" / "tiny"
    sets = sum((["--set", o] for o in overrides(tmp_path, face_folder)), [])
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_faces", "train", *sets], env={**os.environ,
                            "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                                   # both readers gone before the first line
    proc.stderr.close()
    assert proc.wait(timeout=300) == 0
    assert (run / "export" / "model.safetensors").is_file()


def test_sighup_saves_a_checkpoint_and_exits_cleanly(tmp_path, face_folder):
    """A closed terminal (SIGHUP) stops the run like SIGTERM: a checkpoint, then exit 0."""
    proc, out, err, run = stopped_by(signal.SIGHUP, tmp_path, face_folder)
    assert proc.returncode == 0 and "interrupted (SIGHUP)" in err and "Traceback" not in err, err[-2000:]
    assert 4 <= int(list_checkpoints(run)[-1].name.split("-")[1]) < STEPS
