"""The cascade: a super-resolution stage on latents, conditioned on a low-resolution image (Ho et al. 2022).
Its conditioning augmentation against the forward process, a stage grown from a latent model (exactly that
model at step 0), training on (latent, low-resolution image) pairs, a stage whose output follows its
low-resolution input, the chain's reproducibility end to end, upscaling given images, and the one-line
errors of stages that do not fit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_overrides
from ddpm_faces.config import load_config
from ddpm_faces.diffusion import NoiseSchedule, augment_lowres, bind_lowres
from ddpm_faces.errors import UserError
from ddpm_faces.pipeline import SamplingRequest, generate, load_pipeline, read_config, start_from
from ddpm_faces.models import UNet
from ddpm_faces.runs import RunFolder
from ddpm_faces.training import train
from test_latent import AE, latent_overrides


@pytest.fixture(scope="module")
def stages(tmp_path_factory, face_folder):
    """A tiny autoencoder (16 px, 4x4x4 latents), a latent model on it, an 8 px pixel model (stage 1) and a
    super-resolution stage grown from the latent model, trained 12 steps."""
    root = tmp_path_factory.mktemp("cascade")
    train(load_config("quickstart", tiny_overrides(root, face_folder, **AE)), progress=False)
    ae = root / "runs" / "ae"
    train(load_config("quickstart", tiny_overrides(root, face_folder, **latent_overrides(ae))), progress=False)
    latent = root / "runs" / "latent"
    train(load_config("quickstart", tiny_overrides(root, face_folder, **{
        "name": "small", "data.resolution": 8, "model.resolution": 8, "model.attn_resolutions": "[]",
        "model.attributes": "[gender]"})), progress=False)
    small = root / "runs" / "small"
    sr = tiny_overrides(root, face_folder, **latent_overrides(ae, **{
        "name": "sr", "model.lowres_channels": 3, "lowres.resolution": 8, "lowres.stage1": str(small),
        "lowres.sample_steps": 3, "lowres.train_max_level": 20, "lowres.sample_level": 5,
        "train.init_from": str(latent), "train.lr": 3e-3}))
    train(load_config("quickstart", sr), progress=False)
    return {"root": root, "latent": latent, "small": small, "sr": root / "runs" / "sr", "sr_overrides": sr}


def test_augmentation_is_the_forward_process_at_its_level():
    """z_s = sqrt(abar_s) z + sqrt(1 - abar_s) eps, per image, for the schedule's own abar."""
    schedule = NoiseSchedule.from_config("cosine", 1000)
    z, eps = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    level = torch.tensor([0, 250, 999])
    out = augment_lowres(schedule, z, level, eps)
    ab = schedule.alpha_bar[level].view(-1, 1, 1, 1).float()
    torch.testing.assert_close(out, ab.sqrt() * z + (1 - ab).sqrt() * eps)
    assert (out[0] - z[0]).abs().max() < 0.05 and (out[2] - eps[2]).abs().max() < 0.05


def test_a_bound_network_shares_its_image_between_the_guided_halves():
    seen = {}

    def net(x, t, cond=None, lowres=None, lowres_t=None):
        seen["lowres"], seen["level"] = lowres, lowres_t
        return x

    z, level = torch.randn(2, 3, 4, 4), torch.tensor([7, 7])
    bind_lowres(net, z, level)(torch.zeros(4, 4, 4, 4), torch.zeros(4))
    assert torch.equal(seen["lowres"], torch.cat([z, z])) and seen["level"].tolist() == [7, 7, 7, 7]


def test_a_stage_grown_from_a_latent_model_starts_as_that_model(stages):
    torch.manual_seed(0)
    grown = UNet(read_config(stages["sr"]).model)
    start_from(grown, str(stages["latent"]))
    grown.eval()
    plain = load_pipeline(stages["latent"]).net
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([3, 40])
    for lowres in (torch.zeros(2, 3, 8, 8), torch.randn(2, 3, 8, 8)):
        torch.testing.assert_close(grown(x, t, None, lowres=lowres, lowres_t=torch.tensor([0, 9])), plain(x, t))


def test_the_trained_stage_follows_its_low_resolution_image(stages):
    pipe = load_pipeline(stages["sr"])
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 30])
    a = pipe.net(x, t, None, lowres=-torch.ones(2, 3, 8, 8), lowres_t=torch.zeros(2, dtype=torch.long))
    b = pipe.net(x, t, None, lowres=torch.ones(2, 3, 8, 8), lowres_t=torch.zeros(2, dtype=torch.long))
    c = pipe.net(x, t, None, lowres=torch.ones(2, 3, 8, 8), lowres_t=torch.full((2,), 20))
    assert (a - b).abs().mean() > 1e-3 and (b - c).abs().mean() > 1e-5
    assert sorted(RunFolder(stages["sr"]).samples.glob("*.png")), "the upscaled val photos are drawn"


def test_the_chain_is_reproducible_and_its_first_stage_is_stage_one(stages):
    cascade = load_pipeline(stages["sr"])
    assert [p.codec.image_size for p in cascade.stages] == [8, 16]
    request = SamplingRequest(num=3, seed=5, steps=4, attributes={"gender": "Female"}, precision="fp32")
    images = generate(cascade, request, progress=False)
    assert images.shape == (3, 16, 16, 3)
    assert np.array_equal(images, generate(cascade, request, progress=False))
    assert np.array_equal(images[1:], generate(cascade, request.replace(num=2), first_index=1, progress=False))
    small = generate(cascade.previous, request, progress=False)
    seen = []
    generate(cascade, request.replace(num=1), progress=False, callback=lambda i, t, x, x0: seen.append(x0.shape[-1]))
    assert seen == [8] * 4 + [16] * 3                         # both stages' steps, at their own sizes
    upscaled = generate(load_pipeline(stages["sr"], stage1=False), request.replace(sr_level=5, sr_steps=3),
                        lowres=torch.from_numpy(small).permute(0, 3, 1, 2).float() / 127.5 - 1, progress=False)
    assert np.abs(upscaled.astype(int) - images.astype(int)).max() <= 1   # = stage 2 on stage 1's images


def test_sr_options_change_stage_two_only_and_are_checked(stages):
    cascade = load_pipeline(stages["sr"])
    request = SamplingRequest(num=2, seed=1, steps=4, precision="fp32")
    base = generate(cascade, request, progress=False)
    assert not np.array_equal(base, generate(cascade, request.replace(sr_level=15), progress=False))
    with pytest.raises(UserError, match="sr_level"):
        request.replace(sr_level=5000).validate(cascade)
    with pytest.raises(UserError, match="one stage"):
        request.replace(sr_steps=2).validate(load_pipeline(stages["small"]))


def test_stages_that_do_not_fit_are_one_line(stages, tmp_path):
    export = RunFolder(stages["sr"]).export
    cfg = yaml.safe_load((export / "config.yaml").read_text())
    for stage1, message in ((None, "without a stage 1"), (str(tmp_path / "nowhere"), "cannot be loaded"),
                            (str(stages["latent"]), "draws 16 px images")):
        folder = tmp_path / f"bad{len(message)}"
        folder.mkdir()
        for name in ("model.safetensors", "autoencoder.safetensors"):
            (folder / name).write_bytes((export / name).read_bytes())
        (folder / "config.yaml").write_text(yaml.safe_dump({**cfg, "lowres": {**cfg["lowres"], "stage1": stage1}}))
        with pytest.raises(UserError, match=message):
            load_pipeline(folder)
    alone = load_pipeline(stages["sr"], stage1=False)
    with pytest.raises(UserError, match="without its stage 1"):
        generate(alone, SamplingRequest(num=1), progress=False)
    with pytest.raises(UserError, match="train.init_from"):
        start_from(UNet(read_config(stages["sr"]).model), str(stages["small"]))


def test_upscale_draws_a_larger_face_and_compares_it(stages, tmp_path):
    from PIL import Image

    from ddpm_faces.cli import main

    photo = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "up.png"
    assert main(["upscale", str(photo), "--checkpoint", str(stages["sr"]), "--no-detect", "--out", str(out),
                 "--no-progress"]) == 0
    face = Image.open(out)
    assert face.size == (16, 16) and "synthetic" in face.text["Description"]
    again = tmp_path / "again.png"
    assert main(["upscale", str(photo), "--checkpoint", str(stages["sr"]), "--no-detect", "--out", str(again),
                 "--no-progress", "--compare"]) == 0
    pair = np.asarray(Image.open(again))
    assert pair.shape[0] == 16 + 4 and np.array_equal(pair[2:18, 20:36], np.asarray(face))   # bicubic | upscaled


def test_upscale_refuses_what_it_cannot_use(stages, tmp_path, capsys):
    from ddpm_faces.cli import main

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["upscale", str(text), "--checkpoint", str(stages["sr"]), "--out", str(tmp_path / "o.png")]) == 2
    assert "not an image" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
    assert main(["upscale", str(text), "--checkpoint", str(stages["small"]), "--out", str(tmp_path / "o.png")]) == 2
    assert "not a super-resolution stage" in capsys.readouterr().err
    from PIL import Image

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noise)
    assert main(["upscale", str(noise), "--checkpoint", str(stages["sr"]), "--out", str(tmp_path / "o.png")]) == 2
    assert "no face found" in capsys.readouterr().err and not (tmp_path / "o.png").exists()


def test_sample_draws_a_cascade_with_one_checkpoint_and_strips_both_stages(stages, tmp_path):
    from PIL import Image

    from ddpm_faces.cli import main

    out, strip = tmp_path / "faces.png", tmp_path / "strip.png"
    assert main(["sample", "--checkpoint", str(stages["sr"]), "--num", "2", "--steps", "4", "--nrow", "2",
                 "--out", str(out), "--strip", str(strip), "--no-progress", "--sr-steps", "3"]) == 0
    grid = Image.open(out)
    assert grid.size == (2 * 16 + 3 * 2, 16 + 2 * 2) and "--sr-steps 3" in grid.text["ddpm-faces command"]
    picture = np.asarray(Image.open(strip))
    assert picture.shape[:2] == (2 * 18 + 2, 7 * 18 + 2)        # 4 frames of stage 1 (enlarged) + 3 of stage 2


def test_weights_from_before_a_setting_existed_load_only_at_its_default(stages, tmp_path):
    """Exports record their model section; a key added since (lowres_channels) is fine at its default, and a
    config that sets it is refused: those weights have no low-resolution input."""
    import json

    from safetensors.torch import load_file, save_file

    from ddpm_faces.runs import find_model

    files = find_model(stages["latent"])
    folder = tmp_path / "old-export"
    folder.mkdir()
    with __import__("safetensors").safe_open(files.weights, "pt") as f:
        metadata = f.metadata()
    model = json.loads(metadata["model"])
    del model["lowres_channels"]
    save_file(load_file(files.weights), folder / "model.safetensors", metadata={**metadata, "model": json.dumps(model)})
    (folder / "autoencoder.safetensors").write_bytes((files.folder / "autoencoder.safetensors").read_bytes())
    cfg = yaml.safe_load(files.config.read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert load_pipeline(folder).net.cfg.lowres_channels == 0
    cfg["model"]["lowres_channels"] = 3
    cfg["lowres"].update(train_max_level=10, sample_level=2)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="another model config"):
        load_pipeline(folder)


def test_a_cascade_edits_at_its_stage_one_and_upscales_the_edit(stages, tmp_path):
    """The edit (a plan on stage 1) is what stage 1 alone makes of the photo; stage 2 upscales exactly that."""
    from ddpm_faces.pipeline import EditPlan, EditRequest

    cascade = load_pipeline(stages["sr"])
    first = cascade.stages[0]
    photo = torch.rand(1, 3, 8, 8) * 2 - 1
    request = SamplingRequest(num=2, seed=3, steps=6, precision="fp32")
    edited = generate(cascade, request, plan=EditPlan(first, photo, EditRequest(strength=0.5)), progress=False)
    small = generate(first, request, plan=EditPlan(first, photo, EditRequest(strength=0.5)), progress=False)
    upscaled = generate(load_pipeline(stages["sr"], stage1=False), request,
                        lowres=torch.from_numpy(small).permute(0, 3, 1, 2).float() / 127.5 - 1, progress=False)
    assert edited.shape == (2, 16, 16, 3) and np.abs(edited.astype(int) - upscaled.astype(int)).max() <= 1
