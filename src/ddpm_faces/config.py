"""Run configuration: YAML files in configs/, `--set section.key=value` overrides, validation.

A config has a run name, a task (diffusion, or autoencoder: the first stage of latent diffusion) and its
sections (data, model, diffusion, train; codec for latent diffusion; autoencoder and reconstruction for an
autoencoder); every key has a default here, so a YAML file only lists what it changes. Unknown keys and
invalid values raise UserError with the valid choices.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS, PREDICTIONS, SAMPLERS, SCHEDULES
from .errors import UserError
from .io import atomic_file
from .models import UNetConfig
from .models.autoencoder import AutoencoderConfig

MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")   # train.mixed_precision (sampling: pipeline.SAMPLING_PRECISIONS)
FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class DataConfig:
    source: str = "../shared/data/faces"       # folder, FairFace layout, parquet, or hf:<name>
    resolution: int = 32
    crop: str = "center"                      # center | none
    hflip: bool = True                        # random horizontal flips
    random_crop: bool = False                 # the original script's resize to 1.1x + random crop
    hf_config: str = "0.25"                   # HuggingFaceM4/FairFace margin config: 0.25 | 1.25
    cache_dir: str | None = None              # default: $DDPM_FACES_CACHE or ~/.cache/ddpm-faces/data


@dataclass
class DiffusionConfig:
    schedule: str = "linear"                  # linear | cosine | sigmoid
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"                   # eps | v | x0
    min_snr_gamma: float | None = None        # e.g. 5.0 (Hang et al. 2023); None = plain MSE


@dataclass
class TrainConfig:
    batch_size: int = 32                      # per process
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 500
    max_steps: int = 10000                    # optimizer steps; the cosine decay ends here
    min_lr_ratio: float = 0.0                 # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0
    mixed_precision: str = "auto"             # auto (bf16 where the CPU/GPU has bf16 units, else no) | no | fp16 (GPU) | bf16
    compile: bool = False                     # torch.compile the model (about +10% on CPU after ~2 min compiling)
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = True                   # decay_n = min(decay, (1 + n) / (10 + n))
    log_every: int = 50
    eval_every: int = 500                     # validation loss with the EMA weights
    val_images: int = 256                     # images of the val split used for it
    patience: int = 10                        # evaluations without improvement before stopping; 0 = never
    min_delta: float = 0.0
    fid_every: int = 0                        # small-sample FID / KID / face rate every N steps; 0 = off
    fid_images: int = 256                     # samples for it (split across processes)
    fid_sampler: str = DEFAULT_SAMPLER
    fid_steps: int = DEFAULT_STEPS
    best_metric: str = "val_loss"             # val_loss | fid: what picks runs/<name>/best and early stopping
    sample_every: int = 1000                  # sample grid to TensorBoard and runs/<name>/samples
    sample_images: int = 16
    sample_sampler: str = "ddpm"              # sampler for those grids
    sample_steps: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    out_dir: str = "runs"
    threads: int | None = None                # torch.set_num_threads; None = torch's default
    max_bad_steps: int = 10                   # non-finite losses/gradients in a row before the run stops
    label_dropout: float = 0.1                # conditional models: P(a label is replaced by "unspecified")
    init_from: str | None = None              # a diffusion model (export, run or bundled name) to start from


@dataclass
class CodecConfig:
    autoencoder: str | None = None            # an autoencoder export to diffuse in its latents; None = pixels


@dataclass
class ReconstructionConfig:
    """The autoencoder's losses (training/reconstruction.py)."""
    l1_weight: float = 1.0
    mse_weight: float = 0.0
    fft_weight: float = 0.0                   # L1 between amplitude spectra; 0 = off
    kl_weight: float = 1e-6                   # KL(q(z|x) || N(0, I)); the papers use ~1e-6
    disc_weight: float = 0.5                  # the GAN term's weight (see disc_weight_mode); 0 = no discriminator
    disc_weight_mode: str = "adaptive"        # adaptive: disc_weight x VQGAN's gradient-norm ratio | fixed: disc_weight
    disc_start: int = 2000                    # optimizer steps before the GAN term is switched on
    disc_warmup: int = 0                      # steps the discriminator trains alone before disc_start
    disc_lr: float = 2e-4
    disc_channels: int = 32
    disc_layers: int = 3
    lecam_weight: float = 0.0                 # LeCAM regulariser of the discriminator (Tseng et al. 2021); 0 = off
    lecam_decay: float = 0.99                 # EMA decay of the discriminator's mean logits that LeCAM anchors to
    crop: int = 64                            # train on random crops of this side; 0 = whole images
    eval_images: int = 256                    # val images for PSNR / SSIM / reconstruction FID
    init_from: str | None = None              # autoencoder export/run or latent model (e.g. latent128) to start from
    freeze_encoder: bool = False              # train the decoder only: encoder, latents and their statistics stay


@dataclass
class LowResConfig:
    """A super-resolution stage (model.lowres_channels > 0): the cascade's second stage, conditioned on a
    low-resolution image (diffusion/cascade.py)."""
    resolution: int = 32                      # side of the low-resolution image it is conditioned on
    stage1: str | None = None                 # the model that draws that image at sampling (bundled name or path)
    train_max_level: int = 350                # augmentation levels drawn from 0 .. this (timesteps) in training
    sample_level: int = 100                   # the level used at sampling
    sample_steps: int = 5                     # this stage's sampling steps
    guidance: float = 1.0                     # this stage's guidance with the labels stage 1 drew


@dataclass(frozen=True)
class TaskKind:
    """What a kind of model is, for every layer that must tell the kinds apart: what it trains, what its export
    records and how it is used. A model is a chain of stages (docs/architecture.md): codecs, then denoisers."""
    codec: bool                               # a first stage: it encodes and decodes images (no denoiser)
    records: tuple[str, ...]                  # config sections its export records and a loader checks


TASK_KINDS = {
    # a denoiser on pixels or on a codec's latents (optionally a super-resolution stage): it samples faces
    "diffusion": TaskKind(codec=False, records=("model", "diffusion")),
    # a codec, the first stage of latent diffusion: it encodes and decodes, evaluated by its reconstructions
    "autoencoder": TaskKind(codec=True, records=("autoencoder",)),
}
TASKS = tuple(TASK_KINDS)


@dataclass
class Config:
    name: str = "quickstart"
    task: str = "diffusion"                   # diffusion | autoencoder
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    lowres: LowResConfig = field(default_factory=LowResConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def kind(self) -> TaskKind:
        return TASK_KINDS[self.task]

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / self.name


SECTIONS = {"data": DataConfig, "model": UNetConfig, "diffusion": DiffusionConfig, "train": TrainConfig,
            "codec": CodecConfig, "autoencoder": AutoencoderConfig, "reconstruction": ReconstructionConfig, "lowres": LowResConfig}
CHOICES = {
    "data.crop": ("center", "none"),
    "data.hf_config": ("0.25", "1.25"),
    "diffusion.schedule": SCHEDULES,
    "diffusion.prediction": PREDICTIONS,
    "train.mixed_precision": MIXED_PRECISIONS,
    "train.fid_sampler": SAMPLERS,
    "train.sample_sampler": SAMPLERS,
    "train.best_metric": ("val_loss", "fid"),
    "reconstruction.disc_weight_mode": ("adaptive", "fixed"),
    "task": TASKS,
}
POSITIVE = ("data.resolution", "diffusion.timesteps", "train.batch_size", "train.grad_accum", "train.max_steps",
            "train.log_every", "train.eval_every", "train.sample_every", "train.checkpoint_every",
            "train.keep_checkpoints", "train.sample_steps", "train.fid_images", "train.fid_steps",
            "train.sample_images", "train.max_bad_steps", "model.groups", "model.base_channels", "model.blocks_per_level",
            "model.head_channels", "autoencoder.resolution", "autoencoder.latent_channels",
            "autoencoder.blocks_per_level", "reconstruction.disc_channels", "reconstruction.disc_layers",
            "lowres.resolution", "lowres.sample_steps")


def _build(cls, values: dict, prefix: str):
    """Dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(values or {}, dict):
        raise UserError(f"config section '{prefix.rstrip('.')}' must be a mapping of keys, got {values!r}")
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in fields:
            raise UserError(f"unknown config key '{prefix}{key}': valid keys are {', '.join(fields)}")
        nested = cls is Config and key in SECTIONS
        kwargs[key] = _build(SECTIONS[key], value, f"{key}.") if nested else _as_field_type(fields[key].type, value)
    return cls(**kwargs)


TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _fields(cfg: Config):
    """(dotted key, annotation, value) for every setting."""
    yield "name", "str", cfg.name
    yield "task", "str", cfg.task
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            yield f"{section}.{f.name}", str(f.type), getattr(obj, f.name)


def _check_type(key: str, annotation: str, value) -> None:
    """Values must have the annotated type (an int may stand for a float; None only where allowed)."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").strip()
    if value is None:
        if not optional:
            raise UserError(f"config {key} needs a value ({base}), got nothing")
        return
    expected = list if base.startswith("list") else dict if base.startswith("dict") else TYPES.get(base, object)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise UserError(f"config {key} must be {base}{' or null' if optional else ''}, got {value!r}")


def validate(cfg: Config) -> Config:
    for key, annotation, value in _fields(cfg):
        _check_type(key, annotation, value)
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"invalid {key} {value!r}: choose one of {', '.join(CHOICES[key])}")
        if key in POSITIVE and value < 1:
            raise UserError(f"invalid {key} {value!r}: must be a positive integer")
    _check_ranges(cfg)
    _check_stages(cfg)
    m = cfg.model
    if m.resolution % 2 ** (len(m.channel_mults) - 1):
        raise UserError(f"model.resolution {m.resolution} must be divisible by 2^(levels-1) = "
                        f"{2 ** (len(m.channel_mults) - 1)} for model.channel_mults {m.channel_mults}")
    if cfg.train.best_metric == "fid" and not cfg.train.fid_every:
        raise UserError("train.best_metric=fid needs train.fid_every > 0 (how often FID is measured)")
    if not 0 <= cfg.train.ema_decay < 1:
        raise UserError(f"invalid train.ema_decay {cfg.train.ema_decay}: must be in [0, 1)")
    _check_conditioning(cfg)
    if not 0 <= m.dropout < 1:
        raise UserError(f"invalid model.dropout {m.dropout}: must be in [0, 1)")
    if m.base_channels % 2:
        raise UserError(f"invalid model.base_channels {m.base_channels}: must be even (it sizes the sinusoidal "
                        "time embedding)")
    levels = [(m.resolution >> i, m.base_channels * k) for i, k in enumerate(m.channel_mults)]
    attended = [w for r, w in levels if r in m.attn_resolutions] + [levels[-1][1]]     # + the middle block
    for width in attended:
        if width > m.head_channels and width % m.head_channels:
            raise UserError(f"model.head_channels {m.head_channels} must divide the width of every level with attention "
                            f"(base_channels x channel_mults = {width})")
    return cfg


def _check_stages(cfg: Config) -> None:
    """The data, the codec and the denoiser must agree on sizes: pixels need model.resolution =
    data.resolution and 3 channels; latents need the autoencoder's latent shape and image size."""
    d, m, a = cfg.data, cfg.model, cfg.autoencoder
    _int_list("autoencoder.channels", a.channels)
    if a.resolution % a.factor:
        raise UserError(f"autoencoder.resolution {a.resolution} must be divisible by 2^(levels-1) = {a.factor}")
    if cfg.kind.codec or cfg.codec.autoencoder:
        if d.resolution != a.resolution:
            raise UserError(f"data.resolution ({d.resolution}) and autoencoder.resolution ({a.resolution}) differ: "
                            "the autoencoder encodes images of the data's size")
    if cfg.kind.codec:
        return
    if cfg.codec.autoencoder:
        if (m.in_channels, m.resolution) != (a.latent_channels, a.latent_size):
            raise UserError(f"model.in_channels/resolution ({m.in_channels}/{m.resolution}) must be the "
                            f"autoencoder's latent channels/size ({a.latent_channels}/{a.latent_size})")
        return
    if d.resolution != m.resolution:
        raise UserError(f"data.resolution ({d.resolution}) and model.resolution ({m.resolution}) differ: "
                        "set both to the same value")
    if m.in_channels != 3:
        raise UserError(f"invalid model.in_channels {m.in_channels}: a pixel model sees RGB images, so it must be 3 "
                        "(set codec.autoencoder for latent diffusion)")


def _check_conditioning(cfg: Config) -> None:
    m = cfg.model
    if not all(isinstance(a, str) for a in m.attributes) or len(set(m.attributes)) != len(m.attributes):
        raise UserError(f"invalid model.attributes {m.attributes!r}: a list of distinct label names, e.g. "
                        "[age, gender, race], or [] for an unconditional model")
    if not isinstance(m.vocab, dict) or not all(
            isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in m.vocab.values()):
        raise UserError("invalid model.vocab: a mapping from attribute to its list of values (filled in from "
                        "the data at training time; leave it out of configs)")
    if m.vocab and sorted(m.vocab) != sorted(m.attributes):
        raise UserError(f"model.vocab covers {sorted(m.vocab)} but model.attributes is {m.attributes}: "
                        "they must name the same attributes")
    if m.label_counts:
        sizes = [len(m.vocab.get(a, [])) for a in m.attributes]
        if len(m.label_counts) != math.prod(sizes) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in m.label_counts):
            raise UserError(f"invalid model.label_counts: {math.prod(sizes)} counts of 0 or more, one per "
                            "combination of the attributes' values (filled in from the data at training time; "
                            "leave it out of configs)")
    if m.lowres_channels not in (0, 3):
        raise UserError(f"invalid model.lowres_channels {m.lowres_channels}: 3 for a super-resolution stage "
                        "conditioned on an RGB image, 0 for none")
    lr, T = cfg.lowres, cfg.diffusion.timesteps
    if m.lowres_channels and not (0 <= lr.train_max_level < T and 0 <= lr.sample_level < T):
        raise UserError(f"lowres.train_max_level and lowres.sample_level must be timesteps from 0 to {T - 1}")
    if not 0 <= cfg.train.label_dropout < 1:
        raise UserError(f"invalid train.label_dropout {cfg.train.label_dropout}: a probability in [0, 1)")


def _int_list(key: str, values, allow_empty: bool = False) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values) or (
            not values and not allow_empty):
        raise UserError(f"invalid {key} {values!r}: must be a list of positive integers, e.g. [1, 2, 2]")


def _check_ranges(cfg: Config) -> None:
    """Values that have the right type but would fail later, perhaps hours into a run."""
    m, d, tc, rc = cfg.model, cfg.diffusion, cfg.train, cfg.reconstruction
    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name) or cfg.name in (".", ".."):
        raise UserError(f"invalid name {cfg.name!r}: use letters, digits, '.', '_' or '-' (it names runs/<name>)")
    _int_list("model.channel_mults", m.channel_mults)
    _int_list("model.attn_resolutions", m.attn_resolutions, allow_empty=True)
    if not (len(tc.adam_betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in tc.adam_betas)):
        raise UserError(f"invalid train.adam_betas {tc.adam_betas!r}: two numbers in [0, 1), e.g. [0.9, 0.999]")
    if not 0 < d.beta_start < d.beta_end < 1:
        raise UserError(f"invalid diffusion.beta_start/beta_end {d.beta_start}/{d.beta_end}: "
                        "need 0 < beta_start < beta_end < 1 (e.g. 1e-4 and 0.02)")
    for key, value in (("train.lr", tc.lr), ("train.grad_clip", tc.grad_clip),
                       ("diffusion.min_snr_gamma", d.min_snr_gamma or 1.0)):
        if value <= 0:
            raise UserError(f"invalid {key} {value}: must be positive")
    for key, value in (("train.val_images", tc.val_images), ("train.fid_every", tc.fid_every),
                       ("train.warmup_steps", tc.warmup_steps), ("train.patience", tc.patience),
                       ("train.weight_decay", tc.weight_decay), ("train.min_lr_ratio", tc.min_lr_ratio),
                       ("reconstruction.disc_start", rc.disc_start), ("reconstruction.disc_warmup", rc.disc_warmup)):
        if value < 0:
            raise UserError(f"invalid {key} {value}: must be 0 or more")
    if rc.disc_warmup > rc.disc_start:
        raise UserError(f"invalid reconstruction.disc_warmup {rc.disc_warmup}: at most disc_start ({rc.disc_start}), "
                        "the step its term switches on")
    _check_reconstruction(rc)
    if tc.threads is not None and tc.threads < 1:
        raise UserError(f"invalid train.threads {tc.threads}: a positive number, or null for torch's default")
    if tc.fid_every and tc.fid_images < 4:
        raise UserError(f"invalid train.fid_images {tc.fid_images}: at least 4 samples for FID and precision/recall")
    for key, steps in (("train.fid_steps", tc.fid_steps), ("train.sample_steps", tc.sample_steps)):
        if steps > d.timesteps:
            raise UserError(f"invalid {key} {steps}: at most diffusion.timesteps ({d.timesteps})")


def _check_reconstruction(rc: ReconstructionConfig) -> None:
    """The adversarial weights, LeCAM and starting from another autoencoder."""
    for key, value in (("reconstruction.disc_weight", rc.disc_weight),
                       ("reconstruction.lecam_weight", rc.lecam_weight)):
        if value < 0:
            raise UserError(f"invalid {key} {value}: must be 0 or more")
    if rc.disc_lr <= 0:
        raise UserError(f"invalid reconstruction.disc_lr {rc.disc_lr}: must be positive")
    if not 0 <= rc.lecam_decay < 1:
        raise UserError(f"invalid reconstruction.lecam_decay {rc.lecam_decay}: must be in [0, 1), e.g. 0.99")
    if rc.init_from is not None and not rc.init_from.strip():
        raise UserError("invalid reconstruction.init_from '': name an autoencoder export or run, or a latent model "
                        "such as latent128, or null to start from random weights")
    if rc.freeze_encoder and not rc.init_from:
        raise UserError("reconstruction.freeze_encoder needs reconstruction.init_from: a frozen encoder must come "
                        "from a trained autoencoder (e.g. init_from: latent128)")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read `mixed_precision: no` or a run named `off`
    as a boolean."""


_Loader.yaml_implicit_resolvers = {key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
                                   for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"a setting must be section.key=value, got {text!r} (e.g. train.lr=2e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"setting {text!r}: {part!r} is not a config section")
        node[path[-1]] = value
    return raw


def read_yaml(path: Path) -> dict:
    """A YAML mapping from a file, or a UserError naming the file and the problem."""
    try:
        raw = yaml_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a UTF-8 text file: a config must be YAML text") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path} is not valid YAML{line}: fix the file") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a YAML mapping of sections (data, model, diffusion, train, ...)")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a path, a run folder, or the name of one in configs/), apply overrides, validate."""
    raw = read_yaml(_find_config(path)) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides or []))


def _as_field_type(ftype: str, value):
    """YAML 1.1 reads 1e-4 (no dot) as a string, and 0.25 as a number even for a text field:
    convert such values to the field's type."""
    if "float" in str(ftype) and isinstance(value, str) and FLOAT.match(value):
        return float(value)
    if str(ftype).startswith("str") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def bundled_configs_dir() -> Path:
    """The configs/ folder (inside the package it is a link to the repository's configs/)."""
    return Path(__file__).resolve().parent / "configs"


CONFIG_FILE = "config.yaml"                  # a run's, an export's or a checkpoint's config (runs/ lays them out)


def _find_config(path: str | Path) -> Path:
    """A YAML file, a run folder's config.yaml, or a bundled config named without folder or suffix."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / CONFIG_FILE).is_file():
            return p / CONFIG_FILE
        raise UserError(f"{p} is a folder without {CONFIG_FILE}: give a YAML file or a run folder")
    available = sorted(q.stem for q in bundled_configs_dir().glob("*.yaml"))
    named = bundled_configs_dir() / f"{p.name}.yaml"
    if str(p) == p.name and not p.suffix and named.is_file():
        return named
    raise UserError(f"config {path} not found: give a YAML path, a run folder, or one of "
                    f"{', '.join(available) or 'none'}")


class _Dumper(yaml.SafeDumper):
    """Lists of numbers on one line ([1, 2, 2]; model.label_counts' 90 counts too), the rest in block style."""

    def represent_list(self, data):
        flow = bool(data) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow or None)


_Dumper.add_representer(list, _Dumper.represent_list)


def save_config(cfg: Config, path: Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False))


def config_from_dict(raw: dict) -> Config:
    return validate(_build(Config, derive_shapes(raw), ""))


def derive_shapes(raw: dict) -> dict:
    """A denoiser's input shape follows from what it sees, so a config need not copy it: unless the config gives
    them, model.resolution and model.in_channels are the codec's latent grid and channels (latent diffusion), or
    data.resolution and 3 (pixels). Values the config gives are kept, and checked by validate."""
    if not isinstance(raw, dict) or raw.get("task", "diffusion") != "diffusion" or \
            not isinstance(raw.get("model", {}), dict):
        return raw
    model = dict(raw.get("model") or {})
    try:
        if (raw.get("codec") or {}).get("autoencoder"):
            ae = AutoencoderConfig(**(raw.get("autoencoder") or {}))
            shape = {"resolution": int(ae.latent_size), "in_channels": int(ae.latent_channels)}
        else:
            shape = {"resolution": int((raw.get("data") or {}).get("resolution", DataConfig().resolution)),
                     "in_channels": 3}
    except (TypeError, ValueError, AttributeError):
        return raw                               # a malformed section: _build names it
    return {**raw, "model": {**shape, **model}}
