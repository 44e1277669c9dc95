"""Run configuration: bundled YAML files, --set overrides, one-line UserErrors, save/load round trip."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ddpm_faces.config import Config, bundled_configs_dir, load_config, save_config
from ddpm_faces.errors import UserError
from ddpm_faces.models import UNet, count_parameters

BUNDLED = sorted(p.stem for p in bundled_configs_dir().glob("*.yaml"))
TrainDefaults = Config().train


def test_bundled_configs_are_found():
    assert {"quickstart", "bundled32", "faces64", "faces128"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_config_loads_and_builds_a_model_of_its_resolution(name):
    by_name = load_config(name)
    assert by_name == load_config(bundled_configs_dir() / f"{name}.yaml")
    assert by_name.name == name
    if by_name.task == "autoencoder":
        from ddpm_faces.models.autoencoder import Autoencoder
        a = by_name.autoencoder
        recon, posterior = Autoencoder(a)(torch.zeros(1, 3, a.resolution, a.resolution))
        assert recon.shape == (1, 3, a.resolution, a.resolution) and posterior.mean.shape[1] == a.latent_channels
        return
    m = by_name.model
    if by_name.codec.autoencoder:                       # latent diffusion: the UNet sees the latent grid
        assert (m.in_channels, m.resolution) == (by_name.autoencoder.latent_channels, by_name.autoencoder.latent_size)
    else:
        assert m.resolution == by_name.data.resolution and m.in_channels == 3
    res, c = m.resolution, m.in_channels
    # a conditional config gets its vocabularies from the data at training time; stand in two values each
    by_name.model.vocab = {a: ["a", "b"] for a in by_name.model.attributes}
    with torch.device("meta"):                          # shapes only: faces128 has > 100 M parameters
        model = UNet(by_name.model)
        lowres = {}
        if m.lowres_channels:                           # a super-resolution stage also sees its low-res image
            r = by_name.lowres.resolution
            lowres = {"lowres": torch.zeros(2, m.lowres_channels, r, r), "lowres_t": torch.zeros(2)}
        out = model(torch.zeros(2, c, res, res), torch.zeros(2), **lowres)
    assert out.shape == (2, c, res, res)
    if name == "faces64":                               # its header says "about 44 M parameters"
        assert 40e6 < count_parameters(model) < 48e6


def test_yaml_values_reach_the_config():
    cfg = load_config("faces128")
    assert cfg.data.source == "hf:HuggingFaceM4/FairFace" and cfg.data.hf_config == "0.25"
    assert cfg.data.random_crop is True and cfg.train.mixed_precision == "fp16"
    assert cfg.model.channel_mults == [1, 1, 2, 2, 4, 4] and cfg.train.lr == 1e-4
    assert cfg.train.grad_clip == TrainDefaults.grad_clip    # not in the file: the default



def test_overrides_are_parsed_and_applied():
    cfg = load_config("quickstart", ["train.lr=2e-4", "model.channel_mults=[1,2]", "train.batch_size=7",
                                     "diffusion.schedule=cosine", "data.hflip=false", "name=run-a",
                                     "diffusion.min_snr_gamma=5", "train.adam_betas=[0.5, 0.9]"])
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.channel_mults == [1, 2]
    assert cfg.train.batch_size == 7 and cfg.diffusion.schedule == "cosine" and cfg.data.hflip is False
    assert cfg.name == "run-a" and cfg.diffusion.min_snr_gamma == 5 and cfg.train.adam_betas == [0.5, 0.9]
    assert cfg.model.base_channels == 32                # untouched values keep the file's
    assert load_config(None, ["train.lr=3e-5"]).train.lr == 3e-5     # no file: the defaults plus overrides


def test_exponent_without_dot_is_a_float_for_float_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 5E-2\n  min_lr_ratio: 1e0\n"
                    "diffusion:\n  beta_end: 2e-2\n  min_snr_gamma: 5e0\ndata:\n  source: 1e-4\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.05 and cfg.train.min_lr_ratio == 1.0
    assert cfg.diffusion.beta_end == 0.02 and cfg.diffusion.min_snr_gamma == 5.0
    assert cfg.data.source == "1e-4"                    # a string field keeps the string


def test_yes_no_words_stay_text_and_only_true_false_are_booleans(tmp_path):
    """YAML 1.1 reads no/off/yes as booleans; `mixed_precision: no` and a run named `off` must stay text."""
    path = tmp_path / "c.yaml"
    path.write_text("name: off\ntrain:\n  mixed_precision: no\ndata:\n  hflip: false\n")
    cfg = load_config(path)
    assert (cfg.name, cfg.train.mixed_precision, cfg.data.hflip) == ("off", "no", False)
    cfg = load_config(path, ["train.mixed_precision=bf16", "name=yes", "data.hflip=true"])
    assert (cfg.name, cfg.train.mixed_precision, cfg.data.hflip) == ("yes", "bf16", True)
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("overrides, words", [
    (["train.lrr=1"], ["train.lrr", "batch_size", "lr", "warmup_steps", "threads"]),
    (["trian.lr=1"], ["trian", "data", "model", "diffusion", "train"]),
    (["diffusion.schedule=foo"], ["diffusion.schedule", "foo", "linear", "cosine", "sigmoid"]),
    (["diffusion.prediction=epsilon"], ["diffusion.prediction", "eps", "v", "x0"]),
    (["train.mixed_precision=fp8"], ["train.mixed_precision", "no", "fp16", "bf16"]),
    (["train.batch_size=abc"], ["train.batch_size", "int", "abc"]),
    (["train.batch_size=2.5"], ["train.batch_size", "int"]),
    (["train.batch_size=true"], ["train.batch_size", "int"]),
    (["train.lr=fast"], ["train.lr", "float", "fast"]),
    (["model.channel_mults=2"], ["model.channel_mults", "list"]),
    (["train.batch_size=0"], ["train.batch_size", "positive"]),
    (["diffusion.timesteps=-5"], ["diffusion.timesteps", "positive"]),
    (["data.resolution=64", "model.resolution=32"], ["data.resolution", "model.resolution", "64", "32"]),
    (["codec.autoencoder=ae", "data.resolution=128", "model.in_channels=3"], ["model.in_channels/resolution", "3/32", "4/32"]),
    (["data.resolution=34", "model.resolution=34"], ["model.resolution", "34", "channel_mults", "4"]),
    (["train.ema_decay=1"], ["train.ema_decay", "[0, 1)"]),
    (["model.dropout=-0.1"], ["model.dropout"]),
    (["reconstruction.disc_start=100", "reconstruction.disc_warmup=200"], ["disc_warmup", "disc_start (100)"]),
    (["reconstruction.disc_warmup=-1"], ["reconstruction.disc_warmup", "0 or more"]),
    (["data.resolution.x=1"], ["data.resolution", "section"]),
    (["train.lr"], ["a setting must be", "section.key=value", "train.lr"]),
    (["train=5"], ["train", "mapping"]),
])
def test_invalid_overrides_raise_one_line_user_errors(overrides, words):
    with pytest.raises(UserError) as err:
        load_config("quickstart", overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("overrides, words", [
    (["diffusion.min_snr_gamma=abc"], ["diffusion.min_snr_gamma", "float"]),
    (["train.threads=abc"], ["train.threads", "int"]),
    (["train.lr=null"], ["train.lr", "float"]),
    (["model.base_channels=33"], ["model.base_channels", "even"]),
    (["model.head_channels=48"], ["model.head_channels", "64"]),
])
def test_optional_and_structural_values_are_checked(overrides, words):
    with pytest.raises(UserError) as err:
        load_config("quickstart", overrides)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


def test_hf_config_choice_can_be_set_on_the_command_line():
    assert load_config(None, ["data.hf_config=1.25"]).data.hf_config == "1.25"


def test_missing_config_lists_available_ones():
    with pytest.raises(UserError) as err:
        load_config("no-such-config")
    message = str(err.value)
    assert "\n" not in message and "no-such-config" in message
    assert all(name in message for name in BUNDLED)


def test_non_mapping_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(path)


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config("bundled32", ["train.lr=3e-5", "diffusion.min_snr_gamma=5.0", "train.threads=2",
                                    "data.cache_dir=/tmp/x", "model.attn_resolutions=[16, 8]", "name=saved"])
    path = tmp_path / "deep" / "config.yaml"
    save_config(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg and dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
    assert loaded != load_config("bundled32")           # the comparison does see the differences
    assert isinstance(loaded.train.lr, float) and loaded.data.hf_config == "0.25"


def test_the_denoiser_shape_follows_the_codec_or_the_data_unless_given():
    """A config need not copy the latent shape: model.resolution/in_channels come from the autoencoder section
    (latent diffusion) or from data.resolution and RGB (pixels)."""
    latent = load_config("latent128")
    assert (latent.model.resolution, latent.model.in_channels) == (32, 4)
    wider = load_config("latent128", ["autoencoder.latent_channels=8", "autoencoder.channels=[32,64]"])
    assert (wider.model.resolution, wider.model.in_channels) == (64, 8)
    pixels = load_config("quickstart", ["data.resolution=64"])
    assert (pixels.model.resolution, pixels.model.in_channels) == (64, 3)
    assert load_config("quickstart", ["data.resolution=64", "model.resolution=64"]).model.resolution == 64
    assert load_config("ae128").kind.codec and not latent.kind.codec
