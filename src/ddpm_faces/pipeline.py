"""A trained model ready to sample: load an export, a run, a checkpoint or the bundled model; generate.

    pipe = load_pipeline("runs/faces64")            # or None for the bundled model
    images = generate(pipe, num=16, seed=0, sampler="ddim", steps=50)   # (16, H, W, 3) uint8

An export is a folder with `model.safetensors` (EMA weights) and `config.yaml` (the run's resolved config).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import Config, config_from_dict, read_yaml
from .diffusion import DEFAULT_SPACING, Denoiser, NoiseSchedule, PerImageNoise, get_sampler, sampling_timesteps
from .errors import UserError
from .images import to_uint8
from .io import atomic_folder
from .models import UNet
from .models.conditioning import encode_attributes

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "faces32"
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp-2m", 20  # measured on the bundled model: FID within 3% of DDPM-50 (README)


def build_model(cfg: Config) -> UNet:
    return UNet(cfg.model)


def build_schedule(cfg: Config) -> NoiseSchedule:
    d = cfg.diffusion
    return NoiseSchedule.from_config(d.schedule, d.timesteps, d.beta_start, d.beta_end)


@dataclass
class Pipeline:
    net: UNet
    cfg: Config
    source: Path
    step: int | None = None     # the training step of the weights, where recorded

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, build_schedule(self.cfg), self.cfg.diffusion.prediction)

    @property
    def conditional(self) -> bool:
        return bool(self.cfg.model.attributes)

    def labels(self, attributes: dict[str, str | None] | None, batch: int) -> torch.Tensor | None:
        """(batch, n_attributes) labels for attribute values given by name, or None for none given."""
        wanted = {k: v for k, v in (attributes or {}).items() if v not in (None, "", "any")}
        if not wanted:
            return None
        m = self.cfg.model
        if not m.attributes:
            raise UserError(f"this model ({self.source}) is unconditional: it cannot be asked for "
                            f"{', '.join(wanted)}; leave out the attribute options or use a conditional model")
        try:
            return encode_attributes(m.vocab, m.attributes, wanted, batch).to(self.device)
        except ValueError as err:
            raise UserError(str(err)) from None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


EXPORT_FILES = {"model.safetensors", "config.yaml"}


def export_model(model: torch.nn.Module, cfg: Config, out_dir: Path, dtype: torch.dtype = torch.float32,
                 step: int | None = None) -> Path:
    """Write model.safetensors + config.yaml into out_dir atomically. An existing out_dir is replaced only
    if it holds nothing but an earlier export, so no other files are ever deleted."""
    from .training.checkpoint import state_tensors

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or {p.name for p in out_dir.iterdir()} - EXPORT_FILES):
        raise UserError(f"{out_dir} exists and holds other files: export into a new or empty folder")
    with atomic_folder(out_dir) as tmp:
        save_file(state_tensors(model, dtype), tmp / "model.safetensors",
                  metadata={"format": "ddpm-faces", "model": json.dumps(cfg.to_dict()["model"], sort_keys=True),
                            **({"step": str(step)} if step is not None else {})})
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out_dir


def _resolve(path: str | Path | None) -> tuple[Path, Path]:
    """(weights file, config file) for a bundled name, an export, a run folder or a checkpoint folder."""
    if path is None or (not Path(path).exists() and (WEIGHTS_DIR / str(path)).is_dir()):
        folder = WEIGHTS_DIR / (str(path) if path else DEFAULT_MODEL)
        if not (folder / "model.safetensors").is_file():
            raise UserError(f"bundled model {folder.name!r} is missing from {WEIGHTS_DIR}: reinstall ddpm-faces "
                            "or pass --checkpoint runs/<name>")
        return folder / "model.safetensors", folder / "config.yaml"
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist: pass a run folder (runs/<name>), its export/ folder, "
                        "a checkpoints/step-N folder, or leave --checkpoint out for the bundled model")
    if (p / "model.safetensors").is_file() and (p / "config.yaml").is_file():
        return p / "model.safetensors", p / "config.yaml"                       # an export
    if (p / "export" / "model.safetensors").is_file():
        return p / "export" / "model.safetensors", p / "export" / "config.yaml"   # a run with an export
    from .training.checkpoint import list_checkpoints                            # a run without one yet
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1] / "ema.safetensors", p / "config.yaml"
    if (p / "ema.safetensors").is_file():                                        # one checkpoint
        return p / "ema.safetensors", p.parent.parent / "config.yaml"
    raise UserError(f"no model found in {p}: expected model.safetensors + config.yaml, export/, or checkpoints/")


def load_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu") -> Pipeline:
    """The model at `path` (see `_resolve` for the accepted forms) in eval mode on `device`."""
    weights, config_file = _resolve(path)
    if not config_file.is_file():
        raise UserError(f"{config_file} is missing: the model's config must sit beside its weights")
    cfg = config_from_dict(read_yaml(config_file))
    net = build_model(cfg)
    try:
        state = {k: v.float() for k, v in load_file(weights).items()}
        with safe_open(weights, "pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:                     # safetensors raises its own error types for bad files
        raise UserError(f"{weights} is not a readable safetensors file ({type(err).__name__}): "
                        "export the run again or check the download") from None
    model_cfg = cfg.to_dict()["model"]
    trained_as = json.loads(metadata["model"]) if "model" in metadata else model_cfg
    if trained_as != model_cfg:
        differ = sorted(k for k, v in trained_as.items() if model_cfg.get(k) != v)
        raise UserError(f"{weights} was exported with another model config than {config_file} "
                        f"(differs in {', '.join(differ) or 'its keys'}): use the config.yaml that came with the weights")
    expected = net.state_dict()
    wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if wrong or set(state) - set(expected):
        raise UserError(f"{weights} does not match its config.yaml ({len(wrong)} missing or differently shaped, "
                        f"{len(set(state) - set(expected))} unexpected tensors): export the run again")
    net.load_state_dict(state)
    from .training.checkpoint import checkpoint_step
    recorded = metadata.get("step", "")                # exports record it; a checkpoint's folder is named by it
    step = int(recorded) if recorded.isdigit() else checkpoint_step(weights.parent)
    return Pipeline(net.to(check_device(device)).eval(), cfg, weights.parent, step)


def check_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here, or a UserError naming what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but this PyTorch has no CUDA GPU: use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} asked for, but MPS is not available: use --device cpu")
    return dev


def generate(pipe: Pipeline, num: int = 16, *, seed: int = 0, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
             eta: float = 0.0, spacing: str | None = None, batch_size: int = 16, first_index: int = 0,
             progress: bool = True, callback=None, attributes: dict[str, str | None] | None = None,
             guidance: float = 1.0, guidance_interval: tuple[float, float] | None = None,
             labels: torch.Tensor | None = None, initial_noise: torch.Tensor | None = None,
             precision: str = "fp32") -> np.ndarray:
    """`num` images as (num, H, W, 3) uint8; image i depends only on (seed, first_index + i) and the
    attributes asked for (a conditional model; names to values, e.g. {"gender": "Female"}, the same for every
    image; or `labels`, (num, n_attributes) class indices, one row per image) with guidance.
    `initial_noise` (num, 3, H, W) replaces the seeded starting noise (e.g. interpolated noise).
    `precision="bf16"` runs the network under bf16 autocast (about 2x faster on CPUs with AMX or AVX512-bf16;
    the sampler's arithmetic stays in fp32)."""
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    if not math.isfinite(guidance) or guidance < 0:
        raise UserError(f"--guidance must be a number >= 0 (1 = no guidance), got {guidance}")
    shared = pipe.labels(attributes, min(num, batch_size))  # checks names and values before any work
    if labels is not None and (not pipe.conditional or tuple(labels.shape) != (num, len(pipe.cfg.model.attributes))):
        raise UserError(f"labels must be ({num}, {len(pipe.cfg.model.attributes)}) for this model, "
                        f"got {tuple(labels.shape)}")
    res = pipe.cfg.model.resolution
    if initial_noise is not None and tuple(initial_noise.shape) != (num, 3, res, res):
        raise UserError(f"initial noise must be ({num}, 3, {res}, {res}), got {tuple(initial_noise.shape)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use {' or '.join(PRECISIONS)}")
    denoiser = Denoiser(_autocast(pipe.net, precision), build_schedule(pipe.cfg), pipe.cfg.diffusion.prediction,
                        guidance, guidance_interval)
    sample_fn = get_sampler(sampler)
    timesteps = sampling_timesteps(build_schedule(pipe.cfg), steps, spacing or DEFAULT_SPACING[sampler])
    extra = {"eta": eta} if sampler == "ddim" else {}
    out = []
    bar = tqdm(total=num * steps, desc=f"sampling ({sampler}, {steps} steps)", unit="step", disable=not progress,
               leave=False)
    with torch.inference_mode():
        for start in range(first_index, first_index + num, batch_size):
            n = min(batch_size, first_index + num - start)
            noise = PerImageNoise(seed, start, n)
            x = noise(torch.empty(n, 3, res, res, device=pipe.device))
            if initial_noise is not None:
                x = initial_noise[start - first_index:start - first_index + n].to(pipe.device, torch.float32)

            def step_callback(i, t, x_i, x0, n=n):
                bar.update(n)
                if callback is not None:
                    callback(i, t, x_i, x0)

            cond = (labels[start - first_index:start - first_index + n].to(pipe.device) if labels is not None
                    else None if shared is None else shared[:n])
            x = sample_fn(denoiser, x, timesteps, noise=noise, cond=cond,
                          callback=step_callback, **extra)
            out.append(to_uint8(x))
    bar.close()
    return np.concatenate(out)


PRECISIONS = ("fp32", "bf16")


def _autocast(net, precision: str):
    if precision == "fp32":
        return net
    device_type = next(net.parameters()).device.type

    def run(*args):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return net(*args)
    return run


def starting_noise(pipe: Pipeline, seed: int, index: int = 0) -> torch.Tensor:
    """(1, 3, H, W): the pure noise that image `index` of seed `seed` starts from in `generate`."""
    res = pipe.cfg.model.resolution
    return PerImageNoise(seed, index, 1)(torch.empty(1, 3, res, res))


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between two Gaussian noise tensors (keeps their norm, so the result still looks
    like Gaussian noise to the model; Shoemake 1985)."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.clamp(fa @ fb / (fa.norm() * fb.norm()), -1.0, 1.0)
    omega = torch.arccos(cos)
    if float(omega) < 1e-6:
        return (1 - weight) * a + weight * b
    out = (torch.sin((1 - weight) * omega) * fa + torch.sin(weight * omega) * fb) / torch.sin(omega)
    return out.reshape(a.shape).to(a.dtype)


def interpolate(pipe: Pipeline, seed_a: int, seed_b: int, num: int = 8, *, sampler: str = "ddim",
                steps: int = DEFAULT_STEPS, **kwargs) -> np.ndarray:
    """`num` faces along the spherical path between the starting noise of seeds a and b (image 0 of each);
    a deterministic sampler (ddim, dpmpp-2m, heun) makes the row change smoothly."""
    if num < 2:
        raise UserError(f"interpolation needs at least 2 images, got {num}")
    a, b = starting_noise(pipe, seed_a), starting_noise(pipe, seed_b)
    noise = torch.cat([slerp(a, b, i / (num - 1)) for i in range(num)])
    return generate(pipe, num, seed=seed_a, sampler=sampler, steps=steps, initial_noise=noise, **kwargs)
