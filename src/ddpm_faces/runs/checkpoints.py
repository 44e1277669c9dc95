"""Training state on disk: written atomically, loaded without executing code.

runs/<name>/checkpoints/step-N/
    model.safetensors   live weights          ema.safetensors   EMA weights
    optimizer.pt        optimizer, LR schedule and fp16 loss-scaler state (loaded with weights_only=True)
    rng.pt              every rank's torch RNG states (CPU and, where present, CUDA)
    state.json          step, data position, early-stopping state, EMA count
    <extra>.safetensors other trained networks of the run (an autoencoder's discriminator), their optimizers
                        in optimizer.pt under the same name
Each checkpoint is written into `step-N.tmp` and renamed when complete, so a crash never leaves a
half-written `step-N`; only complete ones are listed and resumed from.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_folder
from .layout import EMA_FILE, RunFolder


def state_tensors(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The module's tensors on the CPU, floating-point ones cast to `dtype` when given."""
    return {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
            for k, v in module.state_dict().items()}


def save_checkpoint(run: RunFolder, step: int, *, model, ema, optimizer, scheduler, state: dict, rng: dict,
                    scaler=None, keep: int = 3, extras: dict | None = None, metadata: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically and keep the newest `keep`; `extras` maps a name to (network,
    optimizer) pairs trained beside the model; `metadata` goes into the weights files (e.g. the codec key of
    the latents they trained on)."""
    final = run.checkpoint(step)
    extras = extras or {}
    with atomic_folder(final) as tmp:
        save_file(state_tensors(model), tmp / "model.safetensors", metadata=metadata)
        save_file(state_tensors(ema.model), tmp / EMA_FILE, metadata=metadata)
        for name, (net, _) in extras.items():
            save_file(state_tensors(net), tmp / f"{name}.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    **{name: opt.state_dict() for name, (_, opt) in extras.items()}}, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "ema": ema.state_dict()}, indent=2))
    prune(run, keep)
    return final


def prune(run: RunFolder, keep: int) -> None:
    for old in run.checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, *, model, ema, optimizer, scheduler, scaler=None,
                    extras: dict | None = None) -> tuple[dict, dict]:
    """Restore weights, EMA, optimizer, LR schedule, loss scaler and `extras` (as saved); returns (state.json,
    rng.pt)."""
    path = Path(path)
    model.load_state_dict(load_file(path / "model.safetensors"))
    ema.model.load_state_dict(load_file(path / EMA_FILE))
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    for name, (net, net_optimizer) in (extras or {}).items():
        net.load_state_dict(load_file(path / f"{name}.safetensors"))
        net_optimizer.load_state_dict(opt[name])
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if scaler is not None and opt.get("scaler"):
        scaler.load_state_dict(opt["scaler"])
    state = json.loads((path / "state.json").read_text())
    ema.load_state_dict(state["ema"])
    return state, torch.load(path / "rng.pt", weights_only=True)
