"""A trained model ready to sample: (codec, denoising network, noise schedule) with its config.

    pipe = load_pipeline("runs/faces64")        # a run, its export/, a checkpoint, or None: the bundled model

Where weights live and how they are checked is runs/weights.py; this module builds the pieces.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, config_from_dict, read_yaml
from ..diffusion import Denoiser, NoiseSchedule
from ..errors import CPU_DEVICE, DeviceError, UserError
from ..models import Codec, PixelCodec, UNet
from ..models.autoencoder import Autoencoder
from ..models.codec import LatentCodec
from ..models.conditioning import encode_attributes
from ..runs import CODEC_FILE, find_model, read_codec, read_weights, tensors_key
from .request import ANY


def build_model(cfg: Config) -> UNet:
    return UNet(cfg.model)


def build_schedule(cfg: Config) -> NoiseSchedule:
    d = cfg.diffusion
    return NoiseSchedule.from_config(d.schedule, d.timesteps, d.beta_start, d.beta_end)


def build_codec(cfg: Config, carried: Path | None = None) -> Codec:
    """The codec the denoiser works through: pixels, or with codec.autoencoder a LatentCodec whose weights come
    from `carried` (the codec file an export carries) or else from the autoencoder export the config names."""
    if not cfg.codec.autoencoder:
        return PixelCodec(cfg.model.in_channels, cfg.model.resolution)
    codec = latent_codec(cfg)
    if carried is not None and carried.is_file():
        state, source = read_codec(carried), carried
    else:
        state, source = autoencoder_state(cfg)
    try:
        codec.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"the autoencoder in {source} does not match the config's autoencoder section: use the "
                        "config that came with it") from None
    return codec.eval()


def latent_codec(cfg: Config) -> LatentCodec:
    """An untrained LatentCodec of the config's autoencoder section (the weights come from its export)."""
    return LatentCodec(Autoencoder(cfg.autoencoder))


def autoencoder_state(cfg: Config) -> tuple[dict, Path]:
    """The weights of the autoencoder that codec.autoencoder names (an autoencoder run or export, or a latent
    model that carries its autoencoder, e.g. latent128), checked against cfg.autoencoder."""
    files = find_model(cfg.codec.autoencoder)
    if not files.config.is_file():
        raise UserError(f"{files.config} is missing: the autoencoder's config must sit beside its weights")
    ae_cfg = config_from_dict(read_yaml(files.config))
    carried = files.folder / CODEC_FILE
    if not ae_cfg.kind.codec and not (ae_cfg.codec.autoencoder and carried.is_file()):
        raise UserError(f"codec.autoencoder {cfg.codec.autoencoder} holds a {ae_cfg.task} model without an "
                        "autoencoder: point it at an autoencoder run or export, or a latent model such as latent128")
    if ae_cfg.autoencoder != cfg.autoencoder:
        raise UserError(f"the autoencoder section differs from the one {cfg.codec.autoencoder} was trained with: "
                        "copy that run's autoencoder section into the config")
    if not ae_cfg.kind.codec:
        return read_codec(carried), carried
    state, _, _ = read_weights(files, ae_cfg)
    return state, files.weights


def start_from(net: torch.nn.Module, name: str) -> None:
    """Load train.init_from's weights (a diffusion model: export, run or bundled name) into `net`. A network
    that only adds inputs may grow from a smaller one: a super-resolution stage from a latent model of the
    same shape, its low-resolution channels in the first layer starting at zero and its augmentation-level
    embedding ending in zeros, so it starts as exactly the model it grew from."""
    files, source_cfg = find_model(name), read_config(name)
    if source_cfg.kind.codec:
        raise UserError(f"train.init_from {name} holds a {source_cfg.task} model: give a diffusion model")
    state, _, _ = read_weights(files, source_cfg)
    own = net.state_dict()
    bad = [k for k, v in state.items() if k not in own or not _fits(v, own[k], k)]
    if bad:
        raise UserError(f"train.init_from {name} does not fit this model ({len(bad)} tensors differ, e.g. {bad[0]}): "
                        "use a model section with the same widths, levels and attributes as its config.yaml")
    with torch.no_grad():
        for key, value in state.items():
            if own[key].shape == value.shape:
                own[key].copy_(value)
            else:                                           # conv_in with more input channels
                own[key].zero_()
                own[key][:, :value.shape[1]].copy_(value)


def _fits(source: torch.Tensor, target: torch.Tensor, key: str) -> bool:
    if source.shape == target.shape:
        return True
    return (key == "conv_in.weight" and source.ndim == 4 and source.shape[0] == target.shape[0]
            and source.shape[1] < target.shape[1] and source.shape[2:] == target.shape[2:])


@dataclass
class Pipeline:
    net: torch.nn.Module                        # the denoising network f(x_t, t, labels)
    cfg: Config
    source: Path                                # where the weights came from
    step: int | None = None                     # the training step of the weights, where recorded
    codec: Codec = field(default=None)          # default: build_codec(cfg)
    previous: Pipeline | None = None            # a super-resolution stage's stage 1, which draws its lowres image

    def __post_init__(self):
        self.codec = self.codec if self.codec is not None else build_codec(self.cfg)
        self.schedule = build_schedule(self.cfg)

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, self.schedule, self.cfg.diffusion.prediction)

    @property
    def conditional(self) -> bool:
        return bool(self.cfg.model.attributes)

    @property
    def superres(self) -> bool:
        """A super-resolution stage: conditioned on a low-resolution image (diffusion/cascade.py)."""
        return bool(self.cfg.model.lowres_channels)

    @property
    def stages(self) -> list[Pipeline]:
        """The chain that draws this model's images, first stage first."""
        return (self.previous.stages if self.previous is not None else []) + [self]

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def labels(self, attributes: dict[str, str | None] | None, batch: int) -> torch.Tensor | None:
        """(batch, n_attributes) labels for attribute values given by name, or None for none given."""
        wanted = {k: v for k, v in (attributes or {}).items() if v not in ANY}
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


def read_config(path: str | Path | None) -> Config:
    """The config beside the weights that `path` names (any form runs.find_model takes)."""
    files = find_model(path)
    if not files.config.is_file():
        raise UserError(f"{files.config} is missing: the model's config must sit beside its weights")
    return config_from_dict(read_yaml(files.config))


def load_codec(path: str | Path, device: str | torch.device = "cpu") -> LatentCodec:
    """An autoencoder run or export (task: autoencoder) as the LatentCodec it trained, in eval mode."""
    files, cfg = find_model(path), read_config(path)
    if not cfg.kind.codec:
        raise UserError(f"{path} holds a {cfg.task} model, not an autoencoder")
    codec = latent_codec(cfg)
    state, _, _ = read_weights(files, cfg)
    codec.load_state_dict(state)
    return codec.to(check_device(device)).eval()


def load_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu", *,
                  stage1: bool = True) -> Pipeline:
    """The model at `path` (any form runs.find_model takes) in eval mode on `device`. A super-resolution stage
    comes with its stage 1 (lowres.stage1) as `previous`, unless `stage1` is False (to upscale given images)."""
    files, cfg = find_model(path), read_config(path)
    if cfg.kind.codec:
        raise UserError(f"{path} is an autoencoder, which does not sample faces on its own: train a latent "
                        "diffusion model on it (codec.autoencoder), or `ddpm-faces eval` it")
    net = build_model(cfg)
    state, step, codec_key = read_weights(files, cfg)
    expected = net.state_dict()
    wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if wrong or set(state) - set(expected):
        raise UserError(f"{files.weights} does not match its config.yaml ({len(wrong)} missing or differently shaped, "
                        f"{len(set(state) - set(expected))} unexpected tensors): export the run again")
    net.load_state_dict(state)
    carried = files.folder / CODEC_FILE
    try:
        codec = build_codec(cfg, carried)
    except UserError:
        if codec_key is not None and not carried.is_file():      # an export that carried its autoencoder
            raise UserError(f"{carried} is missing: this export carries the autoencoder it was trained with; copy "
                            "the whole export folder") from None
        raise
    if codec_key is not None and codec_key not in (tensors_key(codec, codec.ENCODING), tensors_key(codec)):
        raise UserError(f"{files.weights} was trained on another autoencoder's latents than the one it is loaded "
                        "with: use the autoencoder.safetensors exported with it")
    dev = check_device(device)
    previous = load_stage1(cfg, path, dev) if cfg.model.lowres_channels and stage1 else None
    return Pipeline(net.to(dev).eval(), cfg, files.folder, step, codec=codec.to(dev).eval(), previous=previous)


def load_stage1(cfg: Config, path, device: torch.device) -> Pipeline:
    """The stage that draws a super-resolution stage's low-resolution images, checked to fit it."""
    name, size = cfg.lowres.stage1, cfg.lowres.resolution
    if not name:
        raise UserError(f"{path} is a super-resolution stage without a stage 1 (lowres.stage1): it cannot draw faces "
                        "alone; use `ddpm-faces upscale` on a photo, or a cascade whose config names its stage 1")
    try:
        first = load_pipeline(name, device)
    except UserError as err:
        raise UserError(f"the stage 1 of {path} ({name}) cannot be loaded: {err}") from None
    if first.codec.image_size != size:
        raise UserError(f"the stage 1 of {path} ({name}) draws {first.codec.image_size} px images, but this stage "
                        f"is conditioned on {size} px ones: set lowres.stage1 to a {size} px model")
    if first.cfg.model.attributes and cfg.model.attributes and first.cfg.model.vocab != cfg.model.vocab:
        raise UserError(f"the stage 1 of {path} ({name}) labels its attributes differently from this stage: "
                        "use a stage 1 trained on the same data")
    return first


def check_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here, or a UserError naming what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but this PyTorch has no CUDA GPU", fix=CPU_DEVICE)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r} asked for, but MPS is not available", fix=CPU_DEVICE)
    return dev


def default_threads() -> int:
    """Torch threads when none are asked for: all cores but one (at least one). With every core, sampling slows
    down several times as soon as another process holds a core (the threads wait on each other)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores - 1)
