"""Weights for sampling: exports, the bundled models, and finding the weights a path names.

An export is a folder with `model.safetensors` (EMA weights; metadata: the task, the config sections the
weights depend on (`recorded_sections`), the training step and, for a latent model, the key of its codec),
`config.yaml` (the run's resolved config) and, for a latent model, `autoencoder.safetensors` (its codec). Loading never executes code: safetensors only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load as load_bytes, load_file, save_file

from ..config import Config
from ..models.unet import UNetConfig
from ..errors import OTHER_MODEL, ModelNotFound, UserError
from ..io import atomic_folder, escaped, recover_folder
from .checkpoints import state_tensors
from .layout import CODEC_FILE, CONFIG_FILE, EMA_FILE, WEIGHTS_FILE, RunFolder, checkpoint_step

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "weights"    # weights shipped inside the package
DEFAULT_MODEL = "cascade128"
DEFAULT_UPSCALER = "cascade128"                # the cascade whose super-resolution stage `upscale` uses
DEFAULT_CLASSIFIER = "attributes32"
EXPORT_FILES = {WEIGHTS_FILE, CONFIG_FILE, CODEC_FILE}
SAMPLING_KEYS = ("schedule", "timesteps", "beta_start", "beta_end", "prediction")   # diffusion settings sampling needs


@dataclass(frozen=True)
class ModelFiles:
    weights: Path
    config: Path

    @property
    def folder(self) -> Path:
        return self.weights.parent


def bundled(name: str) -> Path:
    return BUNDLED_DIR / name


def model_name(source: str | Path) -> str:
    """How a model is named where others may read it (a PNG's text chunks): a bundled model by its name, a
    folder under the working directory by its relative path, anything else by its last two path parts, never
    the absolute local path."""
    path = Path(source).resolve()
    if path.parent == BUNDLED_DIR.resolve():
        return readable(path.name)
    try:
        return readable(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return readable(Path(*path.parts[-2:]))


def readable(path: str | Path) -> str:
    """A path as text that encodes as UTF-8 (a PNG text chunk, a JSON file, a web page): the bytes of a name that
    is not UTF-8 (a folder named on another system) shown as \\xNN escapes, any other name unchanged."""
    return escaped(str(path), "utf-8")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file. The safetensors library takes UTF-8 paths only; a file whose
    path is not UTF-8 (a folder named on another system) is read into memory and parsed from there."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        data = Path(path).read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size]) if 8 <= 8 + size <= len(data) else None
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        return load_bytes(data), metadata if isinstance(metadata, dict) else {}
    state = load_file(path)
    with safe_open(path, "pt") as f:
        return state, f.metadata() or {}


def bundled_folders() -> list[Path]:
    """Folders under the package's weights/ holding model.safetensors + config.yaml, the default first."""
    found = [f for f in sorted(BUNDLED_DIR.iterdir()) if (f / WEIGHTS_FILE).is_file() and (f / CONFIG_FILE).is_file()
             ] if BUNDLED_DIR.is_dir() else []
    return sorted(found, key=lambda f: f.name != DEFAULT_MODEL)


def find_model(path: str | Path | None) -> ModelFiles:
    """The weights and config that `path` names: a bundled model's name (or None for the default), an export,
    a run folder (its export/, else its newest checkpoint), or one checkpoints/step-N folder."""
    if path is None or (not Path(path).exists() and bundled(str(path)).is_dir()):
        folder = bundled(str(path) if path else DEFAULT_MODEL)
        if not (folder / WEIGHTS_FILE).is_file():
            raise ModelNotFound(f"bundled model {folder.name!r} is missing from {BUNDLED_DIR}: reinstall ddpm-faces",
                                fix=OTHER_MODEL)
        return ModelFiles(folder / WEIGHTS_FILE, folder / CONFIG_FILE)
    p = Path(path)
    for folder in (p, RunFolder(p).export):
        recover_folder(folder)                                  # an export interrupted between its renames
    if not p.exists():
        raise ModelNotFound(f"checkpoint {p} does not exist: name a run folder (runs/<name>), its export/ folder, "
                            "a checkpoints/step-N folder, or none for the bundled model")
    run = RunFolder(p)
    if (p / WEIGHTS_FILE).is_file() and (p / CONFIG_FILE).is_file():
        return ModelFiles(p / WEIGHTS_FILE, p / CONFIG_FILE)                            # an export
    if (run.export / WEIGHTS_FILE).is_file():
        return ModelFiles(run.export / WEIGHTS_FILE, run.export / CONFIG_FILE)          # a run with an export
    latest = run.latest_checkpoint()
    if latest is not None:
        return ModelFiles(latest / EMA_FILE, run.config)                                # a run without one yet
    if (p / EMA_FILE).is_file():
        return ModelFiles(p / EMA_FILE, RunFolder(p.parent.parent).config)              # one checkpoint
    raise UserError(f"no model found in {p}: expected model.safetensors + config.yaml, export/, or checkpoints/")


def tensors_key(module: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> str:
    """A hash of a module's tensors (names, dtypes, shapes and values): the identity of a codec. With
    `prefixes`, of the tensors whose names start with one of them only (e.g. a codec's encoding half)."""
    digest = hashlib.sha256()
    tensors = state_tensors(module, torch.float32)
    if prefixes is not None:
        tensors = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def export_model(model: torch.nn.Module, cfg: Config, out_dir: Path, dtype: torch.dtype = torch.float32,
                 step: int | None = None, codec: torch.nn.Module | None = None) -> Path:
    """Write model.safetensors + config.yaml into out_dir atomically, and the codec's weights when it has any
    (a latent model's autoencoder), so that the folder samples on its own. An existing out_dir is replaced
    only if it holds nothing but an earlier export, so no other files are ever deleted."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or {p.name for p in out_dir.iterdir()} - EXPORT_FILES):
        raise UserError(f"{out_dir} exists and holds other files: export into a new or empty folder")
    metadata = weights_metadata(cfg, step)
    key = codec_key(codec)                     # the latents' identity: a new decoder keeps it
    carries_codec = key is not None
    if carries_codec:
        metadata["codec"] = key
    with atomic_folder(out_dir) as tmp:
        save_file(state_tensors(model, dtype), tmp / WEIGHTS_FILE, metadata=metadata)
        if carries_codec:
            save_file(state_tensors(codec), tmp / CODEC_FILE, metadata={"format": "ddpm-faces", "task": "autoencoder"})
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out_dir


def recorded_sections(cfg: Config) -> dict[str, dict]:
    """The config sections an export records (and a loader checks): a diffusion model's network and the
    diffusion settings sampling needs (a config that differs in either samples noise); an autoencoder's
    architecture."""
    raw = cfg.to_dict()
    raw["model"] = {k: v for k, v in raw["model"].items() if k not in DATA_KEYS}
    raw["diffusion"] = {k: raw["diffusion"][k] for k in SAMPLING_KEYS}
    return {section: raw[section] for section in cfg.kind.records}


def weights_metadata(cfg: Config, step: int | None = None) -> dict[str, str]:
    """What an export records beside its tensors: `recorded_sections` and the training step."""
    return {"format": "ddpm-faces", "task": cfg.task, **{k: json.dumps(v, sort_keys=True) for k, v in
                                                          recorded_sections(cfg).items()},
            **({"step": str(step)} if step is not None else {})}


DATA_KEYS = {"label_counts"}                   # model keys that describe the data, not the network
DEFAULTS = {"model": dataclasses.asdict(UNetConfig())}


def codec_key(codec: torch.nn.Module | None) -> str | None:
    """The identity of the latents a codec makes: a hash of its encoder and latent statistics (a new decoder
    keeps it); None for a codec without weights (pixels)."""
    if codec is None or not any(True for _ in codec.parameters()):
        return None
    return tensors_key(codec, getattr(codec, "ENCODING", None))


def check_recorded(files: ModelFiles, cfg: Config, metadata: dict[str, str]) -> None:
    """The config beside the weights must match what the weights recorded of their training."""
    if metadata.get("task", "diffusion") != cfg.task:
        raise UserError(f"{files.weights} holds a {metadata.get('task', 'diffusion')} model but {files.config} "
                        f"describes a {cfg.task} model: use the config.yaml that came with the weights")
    for section, current in recorded_sections(cfg).items():
        if section not in metadata:                    # exports older than the record of that section
            continue
        recorded = json.loads(metadata[section])
        differ = sorted(k for k, v in recorded.items() if current.get(k) != v)
        # a setting added after the export is fine at its default (the same network as before it existed)
        added = [k for k in current if k not in recorded and current[k] != DEFAULTS.get(section, {}).get(k, object())]
        if differ or (section == "model" and added):
            raise UserError(f"{files.weights} was exported with another {section} config than {files.config} "
                            f"(differs in {', '.join(differ) or 'its keys'}): use the config.yaml that came with "
                            "the weights")


def check_finite(files: ModelFiles, state: dict[str, torch.Tensor]) -> None:
    """One NaN or inf in the weights makes every image black: refuse them, naming the tensor."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{files.weights} holds {bad} non-finite value(s) in {name}: the weights are damaged "
                            "(a diverged run or a broken file); export an earlier checkpoint")


def read_codec(path: Path) -> dict[str, torch.Tensor]:
    """The float32 tensors of a codec file carried by an export."""
    try:
        state = {k: v.float() for k, v in read_safetensors(path)[0].items()}
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:
        raise UserError(f"{path} is not a readable safetensors file ({type(err).__name__}): export the run again "
                        "or check the download") from None
    check_finite(ModelFiles(path, path.with_name(CONFIG_FILE)), state)
    return state


def read_weights(files: ModelFiles, cfg: Config) -> tuple[dict[str, torch.Tensor], int | None, str | None]:
    """(float32 state dict, training step or None, the key of the codec it was trained with or None) of the
    weights, checked against the config sections the weights' metadata records."""
    try:
        state, metadata = read_safetensors(files.weights)
        state = {k: v.float() for k, v in state.items()}
    except OSError as err:
        raise UserError(f"cannot read {files.weights}: {err.strerror or err}") from None
    except Exception as err:                     # safetensors raises its own error types for bad files
        raise UserError(f"{files.weights} is not a readable safetensors file ({type(err).__name__}): "
                        "export the run again or check the download") from None
    check_recorded(files, cfg, metadata)
    check_finite(files, state)
    recorded = metadata.get("step", "")                # exports record it; a checkpoint's folder is named by it
    return state, int(recorded) if recorded.isdigit() else checkpoint_step(files.folder), metadata.get("codec")
