"""A run in progress: its state between optimizer steps, and each periodic event as a method.

    run = DiffusionRun(cfg, accelerator, trainees, loader=loader, validation=validation, writer=writer)
    while not run.finished:
        finite = run.micro_step(next(batches))          # None between optimizer steps (gradient accumulation)
        if finite is not None:
            run.after_step(finite, stop_asked=interrupt.requested)
    result = run.finish()

After every optimizer step the events that are due run in this order: log, validation, sample quality,
sample grid, checkpoint (with the export), then the check whether to stop. Only the main process writes
(logs, samples, checkpoints, exports); collectives (reduce, gather) run on every rank.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..config import Config
from ..errors import RESUME, RunError, UserError
from ..models import Codec
from ..pipeline import Pipeline, build_codec
from ..runs import RunFolder, codec_key, export_model, save_checkpoint
from .ema import EMA
from .monitors import EarlyStopping, SampleQuality, Validation, sample_grid
from .resume import gather_rng
from .step import diffusion_step

log = logging.getLogger("ddpm_faces.train")
QUALITY_KEYS = ("fid", "kid_mean", "precision", "recall", "face_rate")
# what a failed write raises: OSError, but on a full disk safetensors raises SafetensorError and torch.save
# a RuntimeError ("unexpected pos ...", "file write failed")
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best: float | None                           # the best value of train.best_metric
    stopped_early: bool
    is_main: bool = True                         # False on the other ranks of a multi-process run
    interrupted: bool = False                    # stopped by Ctrl-C or SIGTERM after saving a checkpoint
    skipped_steps: int = 0                       # optimizer steps skipped for a non-finite loss or gradient


@dataclass
class Trainees:
    """What the optimizer changes: the model (as accelerator.prepare returned it), its EMA, the optimizer
    (prepared) and the learning-rate schedule."""
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def check_sharding(accelerator, rows: torch.Tensor, main: bool) -> None:
    """Every rank must train on its own images: compare the first batch of all ranks (one gather)."""
    everyone = accelerator.gather(rows.to(accelerator.device)[None]).cpu()       # (world, batch)
    if len(set(everyone.flatten().tolist())) != everyone.numel():
        raise UserError("the processes were given overlapping images: launch every rank with its own "
                        "RANK/WORLD_SIZE (torchrun or accelerate launch)")
    if main:
        log.info("data: %d processes, each with its own images (checked on the first batch)", len(everyone))


def free_space(path: Path) -> str:
    """The free space of the disk holding `path`, for error messages."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.1f} MB free there"
    except OSError:
        return "free space unknown"


def write_failure(err: Exception, what: str, folder: RunFolder, step: int) -> UserError:
    """The one-line error for a checkpoint or export (`what`) that could not be written."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
    done = folder.checkpoints()
    kept = f"the last complete checkpoint, {done[-1]}, is intact" if done else "no earlier checkpoint exists"
    return RunError(f"could not write {what} of step {step} in {folder.root}: {reason[:300]} "
                    f"({free_space(folder.root)}); {kept}. Free some space, then continue the run", fix=RESUME,
                    run_dir=folder.root)


class Run:
    """A run between optimizer steps, whatever it trains: counters, running sums, the periodic events and the
    checkpoints. A subclass says what one step does and what is measured, drawn and exported: DiffusionRun
    below, AutoencoderRun in autoencoder.py."""

    def __init__(self, cfg: Config, accelerator, trainees: Trainees, *, loader, writer=None, step: int = 0,
                 stopper: EarlyStopping | None = None, until_step: int | None = None, progress: bool = False):
        self.cfg, self.tc, self.acc = cfg, cfg.train, accelerator
        self.main, self.world = accelerator.is_main_process, accelerator.num_processes
        self.folder = RunFolder(cfg.run_dir)
        self.trainees, self.model, self.ema = trainees, trainees.model, trainees.ema
        self.raw_model = accelerator.unwrap_model(trainees.model, keep_torch_compile=False)
        self.loader, self.writer = loader, writer
        self.step = self.start_step = step
        self.last_step = min(self.tc.max_steps, until_step or self.tc.max_steps)
        self.stopper = stopper or EarlyStopping(self.tc.patience, self.tc.min_delta)
        self.skipped = self.bad_in_row = 0
        self.stopped_early = self.interrupted = self.saved = self.sharding_checked = False
        self.checks_finite = accelerator.scaler is None      # fp16's loss scaler skips non-finite steps by itself
        self.micro_loss = self.zeros()
        self.reset_sums()
        self.bar = tqdm(total=self.tc.max_steps, initial=step, desc=cfg.name, unit="step",
                        disable=not (progress and self.main), dynamic_ncols=True)

    # ---- what a subclass defines -----------------------------------------------------------------------------

    def micro_step(self, batch: dict) -> bool | None:
        """Forward and backward one micro-batch; at an optimizer step, whether the loss and gradient were
        finite (the step is skipped when not), else None."""
        raise NotImplementedError

    def validation_loss(self) -> float | None:
        """The value logged as val/loss (and picked by best_metric val_loss), on every rank; None without one."""
        raise NotImplementedError

    @property
    def val_images(self) -> int:
        """How many val images validation_loss sees (0: it has none)."""
        raise NotImplementedError

    def measure_quality(self) -> None:
        """The train.fid_every measurements."""
        raise NotImplementedError

    def save_samples(self) -> None:
        """The train.sample_every picture (main process)."""
        raise NotImplementedError

    def export(self, folder: Path) -> None:
        """The EMA weights as an export in `folder` (main process)."""
        raise NotImplementedError

    def checkpoint_extras(self) -> dict:
        """Other networks trained beside the model, saved in its checkpoints: name -> (network, optimizer)."""
        return {}

    def trained_on(self) -> str | None:
        """The key of the latents the model trains on, recorded in its checkpoints (None: pixels, or a codec)."""
        return None

    # ---- helpers ---------------------------------------------------------------------------------------------

    def zeros(self) -> torch.Tensor:
        return torch.zeros((), device=self.acc.device)

    def reset_sums(self) -> None:
        """Start a new log interval: loss and gradient-norm sums (kept on the device), step count, clock."""
        self.loss_sum, self.norm_sum, self.n_logged, self.tick = self.zeros(), self.zeros(), 0, time.perf_counter()

    def say(self, message: str) -> None:
        """A line for the user, from the main process only (above the progress bar)."""
        if self.main:
            self.bar.write(message)

    def due(self, every: int) -> bool:
        """An event every `every` steps is due now (they all happen at train.max_steps too)."""
        return self.step % every == 0 or self.step == self.tc.max_steps

    @property
    def finished(self) -> bool:
        return self.step >= self.last_step or self.stopped_early or self.interrupted

    # ---- one optimizer step ----------------------------------------------------------------------------------

    def clip_and_check(self) -> bool:
        """Clip the gradient norm; False when it or the step's loss is not finite (fp16 checks by itself)."""
        norm = self.acc.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip).detach().float()
        # the one host sync per optimizer step: a NaN/inf loss or gradient must not reach the weights
        finite = not self.checks_finite or bool(torch.isfinite(norm) & torch.isfinite(self.micro_loss))
        if finite:
            self.norm_sum += norm
        return finite

    def after_step(self, finite: bool, stop_asked: bool = False) -> None:
        """Everything after an optimizer step: count it (or the skip), run the events due, stop if asked."""
        if not finite:
            self.skip_step()
            return
        self.advance()
        self.run_events()
        if self.agree_to_stop(stop_asked):
            self.stop()

    def advance(self) -> None:
        """A finite optimizer step was taken: learning rate, EMA, counters."""
        self.bad_in_row = 0
        self.loss_sum += self.micro_loss
        self.micro_loss = self.zeros()
        self.trainees.scheduler.step()
        self.ema.update(self.raw_model)
        self.step += 1
        self.n_logged += 1
        self.bar.update(1)

    def skip_step(self) -> None:
        """A non-finite loss or gradient: the step was skipped. Count it; stop after train.max_bad_steps in a row."""
        self.skipped, self.bad_in_row, self.micro_loss = self.skipped + 1, self.bad_in_row + 1, self.zeros()
        self.say(f"step {self.step + 1}: non-finite loss or gradient, step skipped ({self.skipped} so far)")
        if self.main:
            self.writer.add_scalar("train/skipped_steps", self.skipped, self.step)
        if self.bad_in_row >= self.tc.max_bad_steps:
            done = self.folder.checkpoints()
            kept = f"the last checkpoint, {done[-1]}, is intact" if done else "no checkpoint was written yet"
            raise UserError(f"{self.bad_in_row} steps in a row had a non-finite loss or gradient (at step "
                            f"{self.step}): training stopped; {kept}. Lower train.lr, use mixed_precision=bf16 "
                            "instead of fp16, or check the data")

    # ---- the events ------------------------------------------------------------------------------------------

    def run_events(self) -> None:
        """The events due at this step, in order; a checkpoint at the last step and when stopping early."""
        tc = self.tc
        if self.due(tc.log_every):
            self.log()
        if self.due(tc.eval_every):
            self.validate()
        if tc.fid_every and self.due(tc.fid_every):
            self.measure_quality()
        if self.main and self.due(tc.sample_every):
            self.save_samples()
        self.saved = self.due(tc.checkpoint_every) or self.step == self.last_step or self.stopped_early
        if self.saved:
            self.checkpoint()
        if self.n_logged == 0:
            self.tick = time.perf_counter()               # the events' time does not count as training speed

    def log(self) -> None:
        """Mean loss and gradient norm since the last log (loss averaged over the ranks), learning rate, EMA
        decay and speed to TensorBoard; then a new interval. A non-finite mean loss stops the run."""
        elapsed = time.perf_counter() - self.tick
        loss = float(self.acc.reduce(self.loss_sum, "mean")) / self.n_logged   # every rank checks (a host sync)
        norm = float(self.norm_sum) / self.n_logged
        if not math.isfinite(loss):
            raise UserError(f"training diverged at step {self.step} (loss {loss}): lower train.lr, use "
                            "mixed_precision=bf16 instead of fp16, or resume from an earlier checkpoint")
        if self.main:
            speed = self.n_logged * self.tc.batch_size * self.world * self.tc.grad_accum / elapsed
            for key, value in {"train/loss": loss, "train/grad_norm": norm, "train/images_per_s": speed,
                               "train/lr": self.trainees.scheduler.get_last_lr()[0],
                               "train/ema_decay": self.ema.current_decay()}.items():
                self.writer.add_scalar(key, value, self.step)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{speed:.1f}")
        self.reset_sums()

    def validate(self) -> None:
        """The validation loss to TensorBoard; with best_metric val_loss it also picks the best and may stop."""
        value = self.validation_loss()
        if value is not None and self.main:
            self.writer.add_scalar("val/loss", value, self.step)
        if self.tc.best_metric == "val_loss":
            self.track_best("val loss", value)
        elif value is not None:
            self.say(f"step {self.step}: val loss {value:.5f}")

    def track_best(self, label: str, value: float | None) -> None:
        """Record an evaluation of the best metric: export runs/<name>/best on an improvement, stop early after
        train.patience evaluations without one."""
        if value is None:
            return
        improved = self.stopper.update(value)
        note = ", new best" if improved else f", {self.stopper.bad}/{self.tc.patience} without improvement"
        self.say(f"step {self.step}: {label} {value:.5f} (best {self.stopper.best:.5f}{note})")
        if improved and self.main:
            self.write("the best model", lambda: self.export(self.folder.best))
        self.stopped_early = self.stopped_early or self.stopper.should_stop

    def checkpoint(self) -> None:
        """Save the training state as checkpoints/step-N (pruning old ones) and export the EMA weights."""
        rng = gather_rng(self.acc)
        if self.main:
            self.write("the checkpoint", lambda: self.save_state(rng))
        self.acc.wait_for_everyone()

    def save_state(self, rng: dict) -> None:
        """The checkpoint and the export of this step (main process)."""
        state = {"data": self.loader.state_dict(), "best": self.stopper.best, "bad_evals": self.stopper.bad}
        key = self.trained_on()
        save_checkpoint(self.folder, self.step, model=self.raw_model, ema=self.ema,
                        optimizer=self.trainees.optimizer.optimizer, scheduler=self.trainees.scheduler,
                        state={**state, **({"codec": key} if key else {})}, rng=rng, scaler=self.acc.scaler,
                        keep=self.tc.keep_checkpoints, extras=self.checkpoint_extras(),
                        metadata={"codec": key} if key else None)
        self.export(self.folder.export)

    def write(self, what: str, save) -> None:
        """Run `save`, which writes `what` into the run folder; a failed write (a full disk) becomes one line."""
        try:
            save()
        except WRITE_ERRORS as err:
            raise write_failure(err, what, self.folder, self.step) from None

    # ---- stopping --------------------------------------------------------------------------------------------

    def agree_to_stop(self, stop_asked: bool) -> bool:
        """Whether to stop now; with several processes all stop at the same step, agreed on at log steps."""
        if self.world == 1:
            return stop_asked
        if self.step % self.tc.log_every:
            return False
        votes = self.acc.reduce(torch.tensor(float(stop_asked), device=self.acc.device), "sum")
        return bool(votes > 0)

    def stop(self) -> None:
        """Stop after a signal: a checkpoint (unless this step saved one), then out of the loop."""
        if not self.saved:
            self.checkpoint()
        self.interrupted = True
        self.say(f"stopped at step {self.step}; checkpoint saved: the run continues from it when resumed")

    def finish(self) -> TrainResult:
        """Close the progress bar and TensorBoard; every rank waits for the others."""
        self.bar.close()
        if self.stopped_early and self.main:
            log.info("early stopping at step %d: no improvement in %d evaluations", self.step, self.tc.patience)
        if self.main:
            self.writer.close()
        self.acc.wait_for_everyone()
        return TrainResult(self.folder.root, self.step, self.stopper.best, self.stopped_early, self.main,
                           self.interrupted, self.skipped)


class DiffusionRun(Run):
    """A diffusion model's run: the denoising loss on images or cached latents, the validation loss of the EMA
    weights at fixed timesteps and noise, sample FID, the fixed-seed sample grid, and the export."""

    def __init__(self, cfg: Config, accelerator, trainees: Trainees, *, validation: Validation,
                 quality: SampleQuality | None = None, codec: Codec | None = None,
                 label_columns: list[int] | tuple = (), **kwargs):
        super().__init__(cfg, accelerator, trainees, **kwargs)
        codec = codec if codec is not None else build_codec(cfg).to(accelerator.device).eval()
        self.live = Pipeline(trainees.model, cfg, self.folder.root, codec=codec)      # trained on
        self.averaged = Pipeline(trainees.ema.model, cfg, self.folder.root, codec=codec)  # evaluated, exported
        self.validation, self.quality = validation, quality
        self.label_columns = list(label_columns)

    @property
    def val_images(self) -> int:
        return self.validation.size

    def micro_step(self, batch: dict) -> bool | None:
        """Forward and backward one micro-batch. At the last of train.grad_accum micro-batches the optimizer
        steps, if the loss and gradient are finite: returns whether they were; None between optimizer steps."""
        if self.world > 1 and not self.sharding_checked:
            check_sharding(self.acc, batch["rows"], self.main)
            self.sharding_checked = True
        labels = batch["labels"][:, self.label_columns] if self.label_columns else None
        with self.acc.accumulate(self.model):
            loss = diffusion_step(self.live, batch.get("images"), x0=batch.get("x"), labels=labels,
                                  label_dropout=self.tc.label_dropout, lowres=batch.get("lowres"))
            self.acc.backward(loss)
            self.micro_loss += loss.detach().float() / self.tc.grad_accum   # stays on the device until a log step
            finite = self.clip_and_check() if self.acc.sync_gradients else True
            if finite:
                self.trainees.optimizer.step()
            self.trainees.optimizer.zero_grad(set_to_none=True)
        return finite if self.acc.sync_gradients else None

    def validation_loss(self) -> float | None:
        """Mean per-image loss of the EMA weights on the validation images (fixed t and noise); None without any."""
        if self.validation.size == 0:
            return None
        total = self.acc.reduce(self.validation(self.averaged, self.tc.batch_size), "sum")
        return float(total) / self.validation.size

    def measure_quality(self) -> None:
        """Small-sample FID, KID, precision/recall and face rate; with best_metric fid it picks the best."""
        tc = self.tc
        metrics = self.quality(self.averaged, self.acc)
        if self.main:
            for key in QUALITY_KEYS:
                self.writer.add_scalar(f"quality/{key}", metrics[key], self.step)
            if tc.best_metric != "fid":
                self.say(f"step {self.step}: FID {metrics['fid']:.2f}, KID {metrics['kid_mean']:.4f}, "
                         f"face rate {metrics['face_rate']:.2f} ({tc.fid_images} samples)")
        if tc.best_metric == "fid":
            fid = self.acc.gather(torch.tensor([metrics["fid"] if self.main else 0.0], device=self.acc.device))
            self.track_best(f"FID ({tc.fid_images} samples)", fid[0].item())

    def trained_on(self) -> str | None:
        return codec_key(self.averaged.codec)

    def export(self, folder: Path) -> None:
        """The EMA weights (with the codec they were trained through) as an export in `folder`."""
        export_model(self.ema.model, self.cfg, folder, step=self.step, codec=self.averaged.codec)

    def save_samples(self) -> None:
        """The fixed-seed sample grid of the EMA weights (main process)."""
        sample_grid(self.averaged, self.tc, self.folder.sample_grid(self.step), self.writer, self.step,
                    self.validation.data)
