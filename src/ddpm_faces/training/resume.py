"""Starting or continuing a run: which checkpoint to resume from, whether it may be, and restoring it.

A resumed run continues bit for bit where it stopped (CPU, same number of processes): weights, EMA,
optimizer, learning-rate schedule, loss scaler, data position, early-stopping state and every rank's
random number generators all come back from the checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import Config, TrainConfig, yaml_load
from ..errors import MORE_PATIENCE, NEW_RUN, RESUME_AS_SAVED, RUN_LONGER, RunError, UserError
from ..runs import RunFolder, codec_key, load_checkpoint, missing_run_error
from .monitors import EarlyStopping

log = logging.getLogger("ddpm_faces.train")
RESUMED_SECTIONS = ("task", "model", "diffusion", "codec", "autoencoder")   # what a resumed run may not change


def check_run_exists(cfg: Config, resume: bool) -> None:
    """With resume, the run must exist (a checkpoint or a config.yaml): a mistyped name would otherwise
    start a new run from scratch."""
    folder = RunFolder(cfg.run_dir)
    if not resume or folder.checkpoints() or folder.config.is_file():
        return
    raise missing_run_error(repr(cfg.name), cfg.train.out_dir)


def check_run_folder(cfg: Config, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite a run that was not asked to resume, to
    change what RESUMED_SECTIONS name, or to resume a run that has nothing left to train or no checkpoint."""
    folder = RunFolder(cfg.run_dir)
    if folder.has_trained_model() and not resume:
        raise RunError(f"{folder.root} already holds a trained model", fix=NEW_RUN, run_dir=folder.root)
    newest = folder.latest_checkpoint() if resume else None
    if newest is None and resume and folder.export.exists():
        raise RunError(f"{folder.root} has an export but no checkpoint to continue from (they were deleted?); start "
                       "a new run with another name, or restore checkpoints/")
    if newest is None:
        return None
    if folder.config.is_file():
        check_same_model(cfg, folder.config)
    check_work_left(cfg, newest)
    return newest


def check_same_model(cfg: Config, saved: Path) -> None:
    """The sections RESUMED_SECTIONS names (task, model, diffusion, codec, autoencoder) of a resumed run must be
    the ones it was trained with."""
    old = yaml_load(saved.read_text()) or {}
    new = cfg.to_dict()
    old.setdefault("model", {}).pop("vocab", None)          # the vocabularies are filled in from the data later
    new["model"].pop("vocab", None)
    old["model"].pop("label_counts", None)                 # and the label counts
    new["model"].pop("label_counts", None)
    for section in RESUMED_SECTIONS:
        if section in old and old[section] != new[section]:      # runs saved before a section existed skip it
            raise RunError(f"the {section} section differs from the one the run was trained with, in {saved}",
                           fix=RESUME_AS_SAVED, saved=saved)


def check_same_codec(checkpoint: Path, codec) -> None:
    """A latent run resumes only on the latents it trained on: the checkpoint's recorded codec key (its
    autoencoder's encoder) must be the one codec.autoencoder gives now; checked before any latent is encoded."""
    try:
        recorded = json.loads((checkpoint / "state.json").read_text()).get("codec")
    except (OSError, ValueError, AttributeError):
        return                                   # a damaged checkpoint: loading it gives the error
    if recorded is not None and recorded != codec_key(codec):
        raise RunError(f"{checkpoint} trained on the latents of another autoencoder than the one "
                        "codec.autoencoder names now (it was retrained or replaced): point codec.autoencoder back "
                        "at the autoencoder the run started with, or start a new run")


def check_work_left(cfg: Config, checkpoint: Path) -> None:
    """A run at train.max_steps, or stopped early, has nothing left to train: say so and how to go on."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        step, best, bad = int(state["step"]), state["best"], int(state["bad_evals"])
    except (OSError, ValueError, KeyError, TypeError):
        return                                   # a damaged checkpoint: loading it gives the error
    tc = cfg.train
    if step >= tc.max_steps:
        raise RunError(f"run {cfg.name!r} has nothing left to train: {checkpoint.name} is at train.max_steps "
                       f"({tc.max_steps})", fix=RUN_LONGER, run_dir=cfg.run_dir, steps=2 * step)
    if EarlyStopping(tc.patience, tc.min_delta, best, bad).should_stop:
        raise RunError(f"run {cfg.name!r} has nothing left to train: it stopped early at {checkpoint.name}, "
                       f"{bad} evaluations without improvement (train.patience={tc.patience})", fix=MORE_PATIENCE,
                       run_dir=cfg.run_dir, patience=tc.patience + bad)


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


def restore(path: Path, tc: TrainConfig, accelerator, *, model, ema, optimizer, scheduler,
            loader, extras: dict | None = None) -> tuple[int, EarlyStopping]:
    """Load checkpoint `path` into the training objects (and `extras`, name -> (network, optimizer)); returns
    (its step, the early-stopping state)."""
    try:
        state, rng = load_checkpoint(path, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                                     scaler=accelerator.scaler, extras=extras)
    except Exception as err:                     # safetensors, torch.load and json raise many types
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}): it is damaged or "
                        "from another version; delete that folder to resume from the one before it") from None
    step, rank = state["step"], accelerator.process_index
    restore_rng(rng, rank, accelerator.num_processes, seed=tc.seed + 1_000_003 * rank + step)
    loader.load_state_dict(state["data"])
    return step, EarlyStopping(tc.patience, tc.min_delta, state["best"], state["bad_evals"])
