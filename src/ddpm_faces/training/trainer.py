"""The training loop: Accelerate, EMA, validation with early stopping, TensorBoard, checkpoints, export.

    result = train(load_config("configs/quickstart.yaml"), resume=False)

`train` sets up (run folder checks, the run lock, data, model, optimizer, a resumed state) and runs the
loop; what happens between optimizer steps is training/run.py. Only the main process writes logs,
samples, checkpoints and exports, and holds the run lock; the other ranks wait at a barrier whose timeout
is long enough for that work.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from ..config import Config, TrainConfig, save_config
from ..data import BatchLoader, PreparedData, prepare_dataset
from ..data.latents import LatentLoader, encode_latents
from ..errors import OTHER_OUT_DIR, RunError, UserError
from ..hardware import machine_info, training_precision
from ..io import atomic_file
from ..models import Codec, count_parameters
from ..models.conditioning import count_combinations
from ..pipeline import build_codec, build_model, start_from
from ..runs import RunFolder, tensors_key
from ..runs.lock import RunLock
from .autoencoder import prepare_autoencoder_run
from .ema import EMA
from .interrupt import Interrupt
from .lr import make_scheduler
from .monitors import SampleQuality, Validation
from .resume import check_run_exists, check_run_folder, check_same_codec, restore
from .run import DiffusionRun, Run, Trainees, TrainResult

log = logging.getLogger("ddpm_faces.train")
PROCESS_GROUP_TIMEOUT = timedelta(hours=4)      # how long the other ranks wait while the main process writes


def conditioning_columns(cfg: Config, data: PreparedData) -> list[int]:
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
        raise UserError(f"the data's label values differ from the run's model.vocab ({RunFolder(cfg.run_dir).config}):"
                        " resume on the data the run was started with")
    m.vocab = vocab
    warn_sparse_labels(cfg, data)
    columns = [data.attributes.index(a) for a in m.attributes]
    m.label_counts = count_combinations(torch.from_numpy(data.labels[data.indices("train")][:, columns]),
                                        [len(vocab[a]) for a in m.attributes])
    return columns


def warn_sparse_labels(cfg: Config, data: PreparedData) -> None:
    """A warning for each conditioning attribute that most training images leave unlabelled."""
    columns = [data.attributes.index(a) for a in cfg.model.attributes]
    known = (data.labels[data.indices("train")][:, columns] >= 0).mean(0)
    for name, share in zip(cfg.model.attributes, known):
        if share < 0.5:
            log.warning("only %.0f%% of the training images have a %s label", 100 * share, name)


def check_writable(folder: Path) -> None:
    """Fail before any training when the run folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise RunError(f"cannot write the run folder {folder}: {err.strerror or err}; choose a writable "
                       "train.out_dir or free some space", fix=OTHER_OUT_DIR) from None


def make_accelerator(tc: TrainConfig) -> Accelerator:
    """Accelerate for this machine: CUDA when present, else the CPU (several CPU processes then use gloo);
    train.mixed_precision "auto" is bf16 where the device has bf16 units, else none."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Accelerator(mixed_precision=training_precision(tc.mixed_precision, device),
                       gradient_accumulation_steps=tc.grad_accum, dynamo_backend="inductor" if tc.compile else None,
                       cpu=device == "cpu", kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])


def record_machine(folder: RunFolder, accelerator: Accelerator, step: int) -> None:
    """Append this (re)start's machine and the precision actually used to the run's machines.json."""
    path = folder.machines
    try:
        starts = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        starts = []
    precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    starts.append({"step": step, "processes": accelerator.num_processes,
                   **machine_info(precision=precision, device=accelerator.device)})
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(starts, indent=1) + "\n")


def load_data(cfg: Config, accelerator: Accelerator, progress: bool) -> PreparedData:
    """The prepared data set; the main process prepares (and caches) it first, the others then read it."""
    d = cfg.data
    with accelerator.main_process_first():
        return prepare_dataset(d.source, d.resolution, crop=d.crop, cache_dir=d.cache_dir, hf_config=d.hf_config,
                               progress=accelerator.is_main_process and progress)


def make_loader(cfg: Config, data: PreparedData, codec: Codec, accelerator: Accelerator, progress: bool):
    """Batches of images, or for latent diffusion of cached latents (encoded once by the main process)."""
    tc, rank, world = cfg.train, accelerator.process_index, accelerator.num_processes
    if not cfg.codec.autoencoder:
        return BatchLoader(data, "train", tc.batch_size, seed=tc.seed, hflip=cfg.data.hflip,
                           random_crop=cfg.data.random_crop, rank=rank, world_size=world)
    if cfg.data.random_crop:
        raise UserError("data.random_crop does not apply to cached latents: set it to false (flips still apply)")
    with accelerator.main_process_first():
        key = tensors_key(codec, codec.ENCODING)          # a new decoder (encoder frozen) keeps the cache
        latents = encode_latents(data, codec.fast_encoder(), key, cache_dir=cfg.data.cache_dir,
                                 progress=progress and accelerator.is_main_process)
    return LatentLoader(latents, "train", tc.batch_size, seed=tc.seed, hflip=cfg.data.hflip, rank=rank,
                        world_size=world, lowres=cfg.lowres.resolution if cfg.model.lowres_channels else None)


def build_trainees(cfg: Config, rank: int) -> Trainees:
    """A new model (the same initial weights on every rank, or train.init_from's), its EMA, AdamW and the warmup-cosine schedule;
    then seeds each rank's own noise and timesteps."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_model(cfg)
    if tc.init_from:
        start_from(model, tc.init_from)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    torch.manual_seed(tc.seed + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas),
                                  weight_decay=tc.weight_decay, foreach=True)
    return Trainees(model, ema, optimizer, make_scheduler(optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))


def open_writer(cfg: Config, step: int):
    """TensorBoard for the run (main process), with the config as text."""
    from torch.utils.tensorboard import SummaryWriter          # slow to import: only when training

    writer = SummaryWriter(str(RunFolder(cfg.run_dir).tensorboard))
    writer.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "\n```", step)
    return writer


def prepare_run(cfg: Config, accelerator: Accelerator, resume_from: Path | None = None, *, progress: bool = False,
                until_step: int | None = None, writer=None) -> Run:
    """Everything before the first step: data, codec, validation, model, EMA, optimizer, schedule (restored from
    `resume_from` when given), the run's config.yaml and TensorBoard (or `writer`)."""
    tc, rank, world, main = cfg.train, accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    data = load_data(cfg, accelerator, progress)
    if cfg.kind.codec:
        return prepare_first_stage(cfg, accelerator, data, resume_from, progress=progress, until_step=until_step,
                                   writer=writer)
    label_columns = conditioning_columns(cfg, data)
    codec = build_codec(cfg).to(accelerator.device).eval()
    if resume_from is not None:
        check_same_codec(resume_from, codec)
    loader = make_loader(cfg, data, codec, accelerator, progress)
    validation = Validation(data, cfg, codec.shape, rank, world)
    quality = None
    if tc.fid_every:
        with accelerator.main_process_first():       # the main process builds the reference statistics
            quality = SampleQuality(cfg, data, rank, world, main, accelerator.device)
    trainees, step, stopper = build_trainees(cfg, rank), 0, None
    if resume_from is not None:
        step, stopper = restore(resume_from, tc, accelerator, loader=loader, **vars(trainees))
    trainees.model, trainees.optimizer = accelerator.prepare(trainees.model, trainees.optimizer)
    trainees.ema.model.to(accelerator.device)
    if main:
        save_config(cfg, RunFolder(cfg.run_dir).config)
        writer = writer if writer is not None else open_writer(cfg, step)
    run = DiffusionRun(cfg, accelerator, trainees, loader=loader, validation=validation, quality=quality,
                       writer=writer, codec=codec, step=step, stopper=stopper, label_columns=label_columns,
                       until_step=until_step, progress=progress)
    describe(run, resume_from)
    return run


def prepare_first_stage(cfg: Config, accelerator: Accelerator, data: PreparedData, resume_from: Path | None, *,
                        progress: bool, until_step: int | None, writer=None) -> Run:
    """prepare_run for an autoencoder (training/autoencoder.py)."""
    def restore_into(trainees, extras, loader):
        if resume_from is None:
            return 0, None
        return restore(resume_from, cfg.train, accelerator, loader=loader, extras=extras, **vars(trainees))

    if accelerator.is_main_process:
        save_config(cfg, RunFolder(cfg.run_dir).config)
        writer = writer if writer is not None else open_writer(cfg, 0)
    run = prepare_autoencoder_run(cfg, accelerator, data, restore_into, writer=writer, progress=progress,
                                  until_step=until_step)
    describe(run, resume_from)
    return run


def describe(run: Run, resume_from: Path | None) -> None:
    """The run's one-line summary, and a warning when there are no validation images."""
    if not run.main:
        return
    record_machine(run.folder, run.acc, run.step)
    log.info("model: %s parameters; data: %d train / %d val images at %d px; %d process(es), %s; %s",
             f"{count_parameters(run.raw_model):,}", len(run.loader.indices), run.val_images,
             run.cfg.data.resolution, run.world, {"no": "fp32"}.get(run.acc.mixed_precision,
                                                                    run.acc.mixed_precision),
             f"resuming from {resume_from.name}" if resume_from else f"run folder {run.folder.root}")
    if run.val_images == 0:
        log.warning("no validation images: %s off", "validation loss and early stopping are"
                    if run.tc.best_metric == "val_loss" else "validation loss is")


def train(cfg: Config, *, resume: bool = False, progress: bool = True, until_step: int | None = None) -> TrainResult:
    """Train (or, with resume, continue) the run `cfg.name`; `until_step` pauses early, after a checkpoint,
    as if the run had been interrupted there (the learning-rate schedule still ends at max_steps).

    Ctrl-C or SIGTERM: the step finishes, a checkpoint is saved, and the result says `interrupted`."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    accelerator = make_accelerator(tc)
    main, folder = accelerator.is_main_process, RunFolder(cfg.run_dir)
    check_run_exists(cfg, resume)
    if main:
        check_writable(folder.root)
    with RunLock(folder) if main else nullcontext():      # one trainer per run folder
        resume_from = check_run_folder(cfg, resume)
        if tc.fid_every:
            SampleQuality.check_dependencies()          # on every rank, before hours of training
        run = prepare_run(cfg, accelerator, resume_from, progress=progress, until_step=until_step)
        batches = iter(run.loader)
        run.model.train()
        with Interrupt() as interrupt:
            while not run.finished:
                finite = run.micro_step(next(batches))
                if finite is not None:
                    run.after_step(finite, stop_asked=interrupt.requested)
        return run.finish()
