"""The training loop: Accelerate, EMA, validation with early stopping, TensorBoard, checkpoints, export.

    result = train(load_config("configs/quickstart.yaml"), resume=False)

Only the main process writes logs, samples, checkpoints and exports; the other ranks wait at a barrier
whose timeout is long enough for that work.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from ..config import Config, save_config, yaml_load
from ..data import BatchLoader, prepare_dataset
from ..diffusion import diffusion_loss
from ..errors import UserError
from ..models import count_parameters
from ..models.conditioning import drop_labels
from ..pipeline import build_model, build_schedule, export_model
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .ema import EMA
from .lr import make_scheduler
from .monitors import EarlyStopping, SampleQuality, Validation, sample_grid

log = logging.getLogger("ddpm_faces.train")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best: float | None                           # the best value of train.best_metric
    stopped_early: bool
    is_main: bool = True                         # False on the other ranks of a multi-process run
    interrupted: bool = False                    # stopped by Ctrl-C after saving a checkpoint
    skipped_steps: int = 0                       # optimizer steps skipped for a non-finite loss or gradient


def gather_rng(accelerator) -> dict:
    """Every rank's torch RNG states, gathered (a collective: all ranks call it)."""
    def gather(state: torch.Tensor) -> torch.Tensor:
        return accelerator.gather(state.to(accelerator.device)[None]).cpu()
    rng = {"torch": gather(torch.get_rng_state())}
    if torch.cuda.is_available() and accelerator.device.type == "cuda":
        rng["cuda"] = gather(torch.cuda.get_rng_state(accelerator.device))
    return rng


def restore_rng(rng: dict, rank: int, world: int, seed: int) -> None:
    """This rank's saved RNG states; a fresh seed when the run was saved with another number of processes."""
    if rng["torch"].shape[0] != world:
        log.warning("checkpoint saved by %d process(es), resumed by %d: fresh noise streams",
                    rng["torch"].shape[0], world)
        torch.manual_seed(seed)
        return
    torch.set_rng_state(rng["torch"][rank].clone())        # a clone: torch crashes on a view with an offset
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"][rank].clone(), torch.cuda.current_device())


def conditioning_columns(cfg: Config, data) -> list[int]:
    """Columns of the data's labels the model is conditioned on; fills cfg.model.vocab from the data."""
    m = cfg.model
    if not m.attributes:
        return []
    missing = [a for a in m.attributes if a not in data.attributes]
    if missing:
        have = ", ".join(data.attributes) if data.attributes else "none (add a labels.csv)"
        raise UserError(f"model.attributes asks for {', '.join(missing)}, which the data does not label; its "
                        f"labels: {have}. Set model.attributes to a subset, or [] for an unconditional model")
    vocab = {a: list(data.vocab[a]) for a in m.attributes}
    if m.vocab and m.vocab != vocab:
        raise UserError(f"the data's label values differ from the run's model.vocab ({cfg.run_dir}/config.yaml): "
                        "resume on the data the run was started with")
    m.vocab = vocab
    known = (data.labels[data.indices("train")][:, [data.attributes.index(a) for a in m.attributes]] >= 0).mean(0)
    for name, share in zip(m.attributes, known):
        if share < 0.5:
            log.warning("only %.0f%% of the training images have a %s label", 100 * share, name)
    return [data.attributes.index(a) for a in m.attributes]


def check_sharding(accelerator, rows: torch.Tensor, main: bool) -> None:
    """Every rank must train on its own images: compare the first batch of all ranks (one gather)."""
    everyone = accelerator.gather(rows.to(accelerator.device)[None]).cpu()       # (world, batch)
    if len(set(everyone.flatten().tolist())) != everyone.numel():
        raise UserError("the processes were given overlapping images: launch every rank with its own "
                        "RANK/WORLD_SIZE (torchrun or accelerate launch)")
    if main:
        log.info("data: %d processes, each with its own images (checked on the first batch)", len(everyone))


def check_writable(folder: Path) -> None:
    """Fail before any training when the run folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write the run folder {folder}: {err.strerror or err}; choose a writable "
                        "train.out_dir (--set train.out_dir=...) or free some space") from None


class Interrupt:
    """Ctrl-C once: finish the step, save a checkpoint and stop cleanly. Ctrl-C twice: stop at once."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit at once)", file=sys.stderr,
              flush=True)

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _check_run_dir(cfg: Config, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite a run that was not asked to resume."""
    run_dir = cfg.run_dir
    ckpts = list_checkpoints(run_dir)
    if (ckpts or (run_dir / "export").exists()) and not resume:
        raise UserError(f"{run_dir} already holds a trained model: pass --resume to continue it, or pick another "
                        "run name with --set name=<new>")
    saved = run_dir / "config.yaml"
    if resume and ckpts and saved.is_file():
        old = yaml_load(saved.read_text()) or {}
        for section in ("model", "diffusion"):
            new = cfg.to_dict()[section]
            if section == "model":                  # the vocabularies are filled in from the data later
                old.setdefault("model", {}).pop("vocab", None), new.pop("vocab", None)
            if old.get(section) != new:
                raise UserError(f"--resume: the {section} section differs from the one in {saved}; "
                                "resume with the run's own config (--config " + str(saved) + ")")
    return ckpts[-1] if (resume and ckpts) else None


def train(cfg: Config, *, resume: bool = False, progress: bool = True, until_step: int | None = None) -> TrainResult:
    """Train (or, with resume, continue) the run `cfg.name`; `until_step` pauses early, after a checkpoint,
    as if the run had been interrupted there (the learning-rate schedule still ends at max_steps)."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                              dynamo_backend="inductor" if t.compile else None,
                              cpu=not torch.cuda.is_available(),   # several CPU processes then use gloo
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=4))])
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    run_dir = cfg.run_dir
    resume_from = _check_run_dir(cfg, resume)
    if main:
        check_writable(run_dir)
    if t.fid_every:
        SampleQuality.check_dependencies()          # on every rank, before hours of training

    with accelerator.main_process_first():
        data = prepare_dataset(cfg.data.source, cfg.data.resolution, crop=cfg.data.crop,
                               cache_dir=cfg.data.cache_dir, hf_config=cfg.data.hf_config, progress=main and progress)
    label_columns = conditioning_columns(cfg, data)
    loader = BatchLoader(data, "train", t.batch_size, seed=t.seed, hflip=cfg.data.hflip,
                         random_crop=cfg.data.random_crop, rank=rank, world_size=world)
    validation = Validation(data, cfg, rank, world)
    quality = None
    if t.fid_every:
        with accelerator.main_process_first():       # the main process builds the reference statistics
            quality = SampleQuality(cfg, data, rank, world, main, accelerator.device)

    torch.manual_seed(t.seed)                       # the same initial weights (and EMA) on every rank
    model = build_model(cfg)
    ema = EMA(model, t.ema_decay, t.ema_warmup)
    torch.manual_seed(t.seed + rank)                # then each rank its own noise and timesteps
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                  weight_decay=t.weight_decay, foreach=True)
    scheduler = make_scheduler(optimizer, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    stopper = EarlyStopping(t.patience, t.min_delta)
    step = 0
    if resume_from is not None:
        try:
            state, rng = load_checkpoint(resume_from, model=model, ema=ema, optimizer=optimizer,
                                         scheduler=scheduler, scaler=accelerator.scaler)
        except Exception as err:                 # safetensors, torch.load and json raise many types
            raise UserError(f"checkpoint {resume_from} cannot be read ({type(err).__name__}): it is damaged or "
                            "from another version; delete that folder to resume from the one before it") from None
        step = state["step"]
        restore_rng(rng, rank, world, seed=t.seed + 1_000_003 * rank + step)
        loader.load_state_dict(state["data"])
        stopper = EarlyStopping(t.patience, t.min_delta, state["best"], state["bad_evals"])
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.model.to(accelerator.device)
    schedule = build_schedule(cfg)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        writer = SummaryWriter(str(run_dir / "tb"))
        writer.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "\n```", step)
        log.info("model: %s parameters; data: %d train / %d val images at %d px; %d process(es); %s",
                 f"{count_parameters(raw_model):,}", len(loader.indices), validation.size, cfg.data.resolution, world,
                 f"resuming from {resume_from.name}" if resume_from else f"run folder {run_dir}")
    if validation.size == 0 and main:
        log.warning("no validation images: %s off", "validation loss and early stopping are"
                    if t.best_metric == "val_loss" else "validation loss is")

    def evaluate() -> float | None:
        if validation.size == 0:
            return None
        total = accelerator.reduce(validation(ema.model, schedule, accelerator.device, t.batch_size), "sum")
        return float(total) / validation.size

    def checkpoint():
        rng = gather_rng(accelerator)
        if main:
            state = {"data": loader.state_dict(), "best": stopper.best, "bad_evals": stopper.bad}
            try:
                save_checkpoint(run_dir, step, model=raw_model, ema=ema, optimizer=optimizer.optimizer,
                                scheduler=scheduler, state=state, rng=rng, scaler=accelerator.scaler,
                                keep=t.keep_checkpoints)
                export_model(ema.model, cfg, run_dir / "export", step=step)
            except OSError as err:
                done = list_checkpoints(run_dir)
                kept = f"the last complete one, {done[-1]}, is intact" if done else "no earlier checkpoint exists"
                raise UserError(f"could not write the checkpoint of step {step} in {run_dir}: "
                                f"{err.strerror or err}; {kept}. Free some space, then continue with --resume") from None
        accelerator.wait_for_everyone()

    def track_best(label: str, value: float | None) -> bool:
        """Record an evaluation of the best metric; export runs/<name>/best on improvement; True to stop."""
        if value is None:
            return False
        improved = stopper.update(value)
        if main:
            bar.write(f"step {step}: {label} {value:.5f} (best {stopper.best:.5f}"
                      f"{', new best' if improved else f', {stopper.bad}/{t.patience} without improvement'})")
            if improved:
                export_model(ema.model, cfg, run_dir / "best", step=step)
        return stopper.should_stop

    images_per_step = t.batch_size * world * t.grad_accum
    bar = tqdm(total=t.max_steps, initial=step, desc=cfg.name, unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    def zeros():
        return torch.zeros((), device=accelerator.device)
    loss_sum, norm_sum, n_logged, tick = zeros(), zeros(), 0, time.perf_counter()
    stopped_early, interrupted, skipped, bad_in_row, micro_loss = False, False, 0, 0, zeros()
    interrupt = Interrupt()
    start_step = step
    batches = iter(loader)
    model.train()
    last_step = min(t.max_steps, until_step or t.max_steps)
    checks_finite = accelerator.scaler is None       # fp16's loss scaler skips non-finite steps by itself
    try:
        while step < last_step and not stopped_early:
            batch = next(batches)
            if world > 1 and step == start_step:
                check_sharding(accelerator, batch["rows"], main)
            with accelerator.accumulate(model):
                x0 = batch["images"].to(accelerator.device)
                ts = torch.randint(0, cfg.diffusion.timesteps, (len(x0),)).to(accelerator.device)
                noise = torch.randn_like(x0)
                cond = None
                if label_columns:
                    cond = drop_labels(batch["labels"][:, label_columns], t.label_dropout).to(accelerator.device)
                loss = diffusion_loss(model, schedule, x0, ts, noise, prediction=cfg.diffusion.prediction,
                                      min_snr_gamma=cfg.diffusion.min_snr_gamma, cond=cond)
                accelerator.backward(loss)
                micro_loss += loss.detach().float() / t.grad_accum   # stays on the device until a log step
                finite = True
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip).detach().float()
                    # the one host sync per optimizer step: a NaN/inf loss or gradient must not reach the weights
                    finite = not checks_finite or bool(torch.isfinite(norm) & torch.isfinite(micro_loss))
                    if finite:
                        norm_sum += norm
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if not finite:
                skipped, bad_in_row, micro_loss = skipped + 1, bad_in_row + 1, zeros()
                if main:
                    bar.write(f"step {step + 1}: non-finite loss or gradient, step skipped ({skipped} so far)")
                    writer.add_scalar("train/skipped_steps", skipped, step)
                if bad_in_row >= t.max_bad_steps:
                    done = list_checkpoints(run_dir)
                    kept = f"the last checkpoint, {done[-1]}, is intact" if done else "no checkpoint was written yet"
                    raise UserError(f"{bad_in_row} steps in a row had a non-finite loss or gradient (at step {step}): "
                                    f"training stopped; {kept}. Lower train.lr, use mixed_precision=bf16 instead of "
                                    "fp16, or check the data")
                continue
            bad_in_row = 0
            loss_sum += micro_loss
            micro_loss = zeros()
            scheduler.step()
            ema.update(raw_model)
            step += 1
            n_logged += 1
            bar.update(1)

            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.perf_counter() - tick
                loss_sum = accelerator.reduce(loss_sum, "mean")             # every rank checks (the one host sync)
                mean_loss, mean_norm = float(loss_sum) / n_logged, float(norm_sum) / n_logged
                if not math.isfinite(mean_loss):
                    raise UserError(f"training diverged at step {step} (loss {mean_loss}): lower train.lr, "
                                    "use mixed_precision=bf16 instead of fp16, or resume from an earlier checkpoint")
                if main:
                    ips = n_logged * images_per_step / elapsed
                    for key, value in {"train/loss": mean_loss, "train/grad_norm": mean_norm, "train/images_per_s": ips,
                                       "train/lr": scheduler.get_last_lr()[0], "train/ema_decay": ema.current_decay()
                                       }.items():
                        writer.add_scalar(key, value, step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}")
                loss_sum, norm_sum, n_logged, tick = zeros(), zeros(), 0, time.perf_counter()

            if step % t.eval_every == 0 or step == t.max_steps:
                val = evaluate()
                if val is not None and main:
                    writer.add_scalar("val/loss", val, step)
                if t.best_metric == "val_loss":
                    stopped_early = track_best("val loss", val)
                elif val is not None and main:
                    bar.write(f"step {step}: val loss {val:.5f}")
            if quality is not None and (step % t.fid_every == 0 or step == t.max_steps):
                metrics = quality(ema.model, accelerator)
                if main:
                    for key in ("fid", "kid_mean", "precision", "recall", "face_rate"):
                        writer.add_scalar(f"quality/{key}", metrics[key], step)
                    if t.best_metric != "fid":
                        bar.write(f"step {step}: FID {metrics['fid']:.2f}, KID {metrics['kid_mean']:.4f}, "
                                  f"face rate {metrics['face_rate']:.2f} ({t.fid_images} samples)")
                if t.best_metric == "fid":
                    fid = accelerator.gather(torch.tensor([metrics["fid"] if main else 0.0],
                                                          device=accelerator.device))[0].item()
                    stopped_early = track_best(f"FID ({t.fid_images} samples)", fid)
            if main and (step % t.sample_every == 0 or step == t.max_steps):
                sample_grid(ema.model, cfg, step, writer)
            saved = step % t.checkpoint_every == 0 or step == last_step or stopped_early
            if saved:
                checkpoint()
            tick = time.perf_counter() if n_logged == 0 else tick
            stop = interrupt.requested
            if world > 1:                   # every rank must stop at the same step: agree at log steps only
                stop = step % t.log_every == 0 and bool(accelerator.reduce(
                    torch.tensor(float(stop), device=accelerator.device), "sum") > 0)
            if stop:
                if not saved:
                    checkpoint()
                interrupted = True
                if main:
                    bar.write(f"stopped at step {step}; checkpoint saved: continue with --resume")
                break
    finally:
        interrupt.restore()
    bar.close()
    if stopped_early and main:
        log.info("early stopping at step %d: no improvement in %d evaluations", step, t.patience)
    if main:
        writer.close()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, step, stopper.best, stopped_early, main, interrupted, skipped)
