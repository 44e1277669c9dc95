"""One run folder, one trainer: the run lock against real second processes, and after kill -9 of the holder."""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from ddpm_faces.cli import FIXES
from ddpm_faces.config import load_config
from ddpm_faces.errors import UserError
from ddpm_faces.runs import RunFolder
from ddpm_faces.runs.lock import RunLock, lock_path, read_holder
from ddpm_faces.training import train

pytestmark = pytest.mark.slow          # the integration tier (real trainer processes): `make test-fast` leaves it out

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# a process that takes the lock, says so, and holds it until it is killed
HOLDER = """
import sys, time
from ddpm_faces.runs import RunFolder
from ddpm_faces.runs.lock import RunLock

lock = RunLock(RunFolder(sys.argv[1])).acquire()      # held while `lock` lives
print("locked", flush=True)
time.sleep(600)
"""


def hold(folder: Path) -> subprocess.Popen:
    """A second process holding the lock of `folder` (returns once it holds it)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), "--marker"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def cli_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm_faces", "train", "--no-progress", *args], capture_output=True,
                          text=True, env=ENV, timeout=300)


def sets(root: Path, data: Path, **extra) -> list[str]:
    return sum((["--set", o] for o in tiny_overrides(root, data, **extra)), [])


def test_a_second_process_is_refused_with_the_holders_pid_and_command_until_a_kill_9(tmp_path):
    folder = RunFolder(tmp_path / "runs" / "tiny")
    holder = hold(folder.root)
    try:
        with pytest.raises(UserError) as err:
            RunLock(folder).acquire()
        message = err.value.worded(FIXES)                              # as the command line says it
        assert f"is being trained by process {holder.pid} (" in message and "--marker" in message
        assert "\n" not in message and "--set name=<new>" in message and "--set" not in str(err.value)
        assert read_holder(lock_path(folder))[0] == holder.pid          # a refused process leaves the record alone
    finally:
        kill_9(holder)
    with RunLock(folder) as lock:                                       # the kernel dropped the dead holder's lock
        assert lock.held and read_holder(lock_path(folder)) == (os.getpid(), read_holder(lock_path(folder))[1])
    assert read_holder(lock_path(folder)) == (None, [])                 # released: no holder recorded


def test_train_refuses_a_run_that_another_process_trains(tmp_path, face_folder):
    run = tmp_path / "runs" / "tiny"
    with RunLock(RunFolder(run)):
        out = cli_train(*sets(tmp_path, face_folder))
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {run} is being trained by process {os.getpid()} (")
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


def test_two_real_trainers_then_kill_9_of_the_first_lets_the_second_resume(tmp_path, face_folder):
    run = tmp_path / "runs" / "tiny"
    first = subprocess.Popen([sys.executable, "-m", "ddpm_faces", "train", "--no-progress",
                              *sets(tmp_path, face_folder, **{"train.max_steps": 100_000, "train.checkpoint_every": 2,
                                                              "train.eval_every": 100_000, "train.log_every": 100,
                                                              "train.sample_every": 100_000})],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = 120
        while not RunFolder(run).checkpoints():
            assert first.poll() is None, first.stderr.read()[-2000:]
            deadline -= 0.05
            assert deadline > 0, "the first trainer wrote no checkpoint"
            subprocess.run(["sleep", "0.05"])
        second = cli_train("--config", str(run), "--resume")
        assert second.returncode == 2 and f"is being trained by process {first.pid} (" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        kill_9(first)
    newest = RunFolder(run).latest_checkpoint()
    step = int(newest.name.split("-")[1])
    resumed = cli_train("--config", str(run), "--resume", "--set", f"train.max_steps={step + 2}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {newest.name}" in resumed.stderr and f"trained {step + 2} steps" in resumed.stdout


def test_train_releases_the_lock_when_it_ends(tmp_path, face_folder):
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{"train.max_steps": 1}))
    train(cfg, progress=False)
    with RunLock(RunFolder(cfg.run_dir)) as lock:
        assert lock.held


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunLock(RunFolder(tmp_path)) as lock:
        assert not lock.held
    assert "no file locks" in caplog.text


def test_a_train_that_fails_before_writing_leaves_no_run_folder(tmp_path):
    """A failed `train` (here: data that does not exist) takes the lock, then gives it back with its folder."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "ddpm_faces", "train", "--data", str(tmp_path / "no-such-data"),
                          "--set", f"train.out_dir={tmp_path / 'runs'}", "--set", "name=failed"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "runs" / "failed").exists()
