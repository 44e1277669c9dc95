"""The models the web app offers: discovery (the bundled models and the exported runs under runs/, or the
given checkpoints) and the model card shown beside the controls. No Gradio here.

    models = discover_models(None, "runs")          # {label: ModelEntry}, the default model first
    text = model_card(models[label], pipe)          # Markdown
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, config_from_dict, read_yaml
from ..diffusion import sampler_spec
from ..errors import UserError
from ..models import count_parameters
from ..pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, Pipeline
from ..runs import (BUNDLED_DIR, CONFIG_FILE, DEFAULT_MODEL, METRICS_FILE, WEIGHTS_FILE, bundled_folders,
                    checkpoint_step, find_model, run_of_export)
from ..runs.weights import readable



@dataclass
class ModelEntry:
    label: str                   # what the model picker shows (valid UTF-8: a folder name's other bytes as \xNN)
    source: str                  # what load_pipeline takes
    cfg: Config
    folder: Path                 # where the weights are
    cli_checkpoint: str | None   # the --checkpoint that names it on the command line (None: the default)

    @property
    def max_sampling_steps(self) -> int:
        """The most sampling steps this model's schedule has."""
        return self.cfg.diffusion.timesteps


def read_model_config(config_file: Path) -> Config:
    """The ddpm-faces config in `config_file`, or a UserError naming the file."""
    try:
        return config_from_dict(read_yaml(config_file))
    except UserError:
        raise
    except Exception as err:     # a YAML or type error in a foreign file
        raise UserError(f"{config_file} is not a ddpm-faces config ({type(err).__name__}: {err})") from None


def _is_diffusion_model(folder: Path) -> bool:
    """An export of a model that samples faces: its config reads as a ddpm-faces config (not, say, the attribute
    classifier's) of a denoiser, not a codec (an autoencoder only encodes and decodes)."""
    if not all((folder / name).is_file() for name in (WEIGHTS_FILE, CONFIG_FILE)):
        return False
    try:
        return not read_model_config(folder / CONFIG_FILE).kind.codec
    except UserError:
        return False


def bundled_models() -> list[Path]:
    """The package's bundled diffusion models, the default one first."""
    return [folder for folder in bundled_folders() if _is_diffusion_model(folder)]


def _given(path: str) -> ModelEntry:
    files = find_model(path)                         # UserError for a path that holds no model
    if not files.config.is_file():
        raise UserError(f"{files.config} is missing: the model's config must sit beside its weights")
    return ModelEntry(readable(path), str(path), read_model_config(files.config), files.folder, readable(path))


def _found(runs_dir: str | Path) -> list[ModelEntry]:
    entries = [ModelEntry(f"{folder.name} (bundled)", str(folder), read_model_config(folder / CONFIG_FILE), folder,
                          None if folder.name == DEFAULT_MODEL else folder.name) for folder in bundled_models()]
    runs = Path(runs_dir)
    for export in sorted(runs.glob("*/export")) if runs.is_dir() else []:
        if _is_diffusion_model(export):
            label = readable(export.parent if runs.is_absolute() else f"{runs_dir}/{export.parent.name}")
            entries.append(ModelEntry(label, str(export), read_model_config(export / CONFIG_FILE), export, label))
    return entries


def discover_models(checkpoints: list[str] | None = None, runs_dir: str | Path = "runs") -> dict[str, ModelEntry]:
    """The models the page offers, by label, the default first: the given checkpoints (any form
    `load_pipeline` takes), or else the bundled model(s) and every exported run under `runs_dir`."""
    entries = [_given(path) for path in checkpoints] if checkpoints else _found(runs_dir)
    if not entries:
        raise UserError(f"no model to serve: the bundled weights are missing from {BUNDLED_DIR} and {runs_dir}/ "
                        "has no exported run; pass --checkpoint runs/<name>")
    models: dict[str, ModelEntry] = {}
    for entry in entries:
        models.setdefault(entry.label, entry)
    return models


# ---------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------
def read_metrics(folder: Path) -> dict | None:
    """metrics.json beside the weights (or in the run folder above an export/), if there is one."""
    run = run_of_export(folder)
    for candidate in (folder / METRICS_FILE, run.root / METRICS_FILE if run is not None else None):
        if candidate is not None and candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    return None


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {format_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def latest_checkpoint_step(folder: Path) -> int | None:
    """The step of the newest checkpoint of the run above an export/ folder, if any."""
    run = run_of_export(folder)
    if run is None:
        return None
    newest = run.latest_checkpoint()
    return checkpoint_step(newest) if newest is not None else None


def where(folder: Path) -> str:
    """A short name for a weights folder: inside the package, under the working folder, or in full."""
    for root, prefix in ((BUNDLED_DIR.parent, "the package's "), (Path.cwd(), "")):
        try:
            return f"{prefix}{readable(folder.resolve().relative_to(root.resolve()))}/"
        except ValueError:
            continue
    return readable(folder)


def _trained(entry: ModelEntry, pipe: Pipeline) -> str:
    configured = entry.cfg.train.max_steps
    if pipe.step is not None:
        return f"{pipe.step:,} (of {configured:,} configured)"
    latest = latest_checkpoint_step(entry.folder)
    newest = f"; the run's newest checkpoint: step {latest:,}" if latest is not None else ""
    return f"{configured:,} configured (train.max_steps){newest}"


def _card_rows(entry: ModelEntry, pipe: Pipeline) -> list[tuple[str, str]]:
    m, d = entry.cfg.model, entry.cfg.diffusion
    params, side = count_parameters(pipe.net), pipe.codec.image_size
    attributes = "; ".join(f"{a}: {', '.join(m.vocab[a])}" for a in m.attributes) or "none (unconditional)"
    calls = sampler_spec(DEFAULT_SAMPLER).network_evaluations(DEFAULT_STEPS)
    return [
        ("parameters", f"{params / 1e6:.2f} M ({params:,})"),
        ("resolution", f"{side} × {side} px"),
        ("training steps", _trained(entry, pipe)),
        ("diffusion", f"{d.prediction}-prediction, {d.schedule} schedule, {d.timesteps} timesteps"),
        ("attributes", attributes),
        ("default sampler", f"{DEFAULT_SAMPLER}, {DEFAULT_STEPS} steps ({calls} network calls per image)"),
        ("weights", where(entry.folder)),
    ]


def model_card(entry: ModelEntry, pipe: Pipeline) -> str:
    """Markdown: what the model is, how it was trained and how well it does (when measured)."""
    rows = _card_rows(entry, pipe)
    metrics = read_metrics(entry.folder)
    if metrics:
        rows += [(f"metric: {k}", format_value(v)) for k, v in metrics.items()]
    else:
        rows.append(("metrics", "not recorded here (no metrics.json beside the weights)"))
    return f"**{entry.label}**\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in rows) + "\n"
