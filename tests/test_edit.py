"""Editing a real photo: SDEdit, DDIM inversion and inpainting through the codec, the `edit` command, the
photo framing and its one-line errors, and the PNG text chunks that say what made an image."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import yaml
import pytest
import torch
from PIL import Image

from conftest import draw_face
from ddpm_faces.app.models import bundled_models
from ddpm_faces.images import to_model_range
from ddpm_faces.errors import UserError
from ddpm_faces.evaluation.reconstruction import psnr
from ddpm_faces.images import to_uint8
from ddpm_faces.diffusion import SAMPLERS
from ddpm_faces.pipeline import DEFAULT_STRENGTH, MASK_RESAMPLE, EditPlan, EditRequest, SamplingRequest, generate, load_pipeline


# the diffusion models among the weights that edit by themselves; a cascade edits at its stage 1 (bundled too,
# and tested here) and upscales the edit (tests/test_cascade.py)
BUNDLED_MODELS = [folder.name for folder in bundled_models()
                  if not yaml.safe_load((folder / "config.yaml").read_text()).get("model", {}).get("lowres_channels")]


@pytest.fixture(scope="module")
def bundled():
    """The 32 px pixel model (the checks that pin its images)."""
    return load_pipeline("faces32")


@pytest.fixture(scope="module", params=BUNDLED_MODELS)
def each_bundled(request):
    """Every bundled diffusion model: the 32 px pixel one and the 128 px latent one."""
    return load_pipeline(request.param)


def face_photo(size: int):
    """A face-like picture of `size` px as uint8 and as a (1, 3, size, size) tensor in [-1, 1]."""
    image = draw_face(np.random.default_rng(3), size)
    return image, to_model_range(torch.from_numpy(image.copy())[None])


@pytest.fixture(scope="module")
def photo():
    return face_photo(32)


def test_both_bundled_models_are_edited():
    assert {"faces32", "latent128"} <= set(BUNDLED_MODELS)


def run(*args):
    return subprocess.run([sys.executable, "-m", "ddpm_faces", *args], capture_output=True, text=True)


def test_strength_zero_gives_the_photo_back_up_to_the_codec(each_bundled):
    pipe = each_bundled
    image, x = face_photo(pipe.codec.image_size)
    out = generate(pipe, SamplingRequest(num=2, steps=10), plan=EditPlan(pipe, x, EditRequest(strength=0.0)), progress=False)
    with torch.inference_mode():
        round_trip = to_uint8(pipe.codec.decode(pipe.codec.encode(x)))
    # the decoder's float rounding may differ between a batch of 2 and of 1 (at most one level of 255)
    assert np.abs(out.astype(int) - round_trip.astype(int)).max() <= 1
    if pipe.codec.shape[0] == 3:                                         # pixels: the photo itself
        assert (out == image).all()


def test_strength_moves_the_result_away_from_the_photo(bundled, photo):
    image, x = photo
    request = SamplingRequest(num=4, steps=20, sampler="ddim")
    close = [psnr(np.repeat(image[None], 4, 0), generate(bundled, request, plan=EditPlan(bundled, x, EditRequest(strength=s)),
                                                         progress=False)).mean() for s in (0.2, 0.6, 1.0)]
    assert close[0] > close[1] > close[2]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_strength_is_the_noise_share_of_the_start_on_every_schedule(schedule):
    """sqrt(1 - abar(t0)) = strength: the photo's kept signal falls evenly, not with a fraction of the timesteps."""
    from ddpm_faces.diffusion import NoiseSchedule, sampling_timesteps
    from ddpm_faces.pipeline.edit import start_timestep
    sched = NoiseSchedule.from_config(schedule, 1000, 1e-4, 0.02)
    for strength in (0.1, 0.3, 0.5, 0.7, 0.9, 0.97):
        t0 = start_timestep(sched, strength)
        noise = float((1 - sched.alpha_bar_at(torch.tensor([t0]))[0]).sqrt())
        assert abs(noise - strength) < 1e-4 and 0 < t0 < 999, (strength, t0, noise)
        for spacing in ("karras", "trailing", "linspace", "quadratic"):     # the steps spread from t0 down
            steps = sampling_timesteps(sched, max(1, round(strength * 20)), spacing, t_max=t0)
            assert abs(steps[0] - t0) < 1e-6 and all(a > b for a, b in zip(steps, steps[1:])), (spacing, steps)
            assert len(steps) == max(1, round(strength * 20)) and steps[-1] <= t0 / 2 + 1e-9


def test_two_photos_stay_apart_until_strength_one(bundled):
    """Two different faces edited with the same seed: clearly different at 0.8 and 0.9 (the old mapping made
    them one face from about 0.8), the same face only at 1.0."""
    with torch.inference_mode():                                   # two faces the model drew: face-like photos
        faces = generate(bundled, SamplingRequest(num=2, seed=11, steps=8), progress=False)
    request = SamplingRequest(num=1, seed=3, steps=20)
    gap = {}
    for strength in (0.8, 0.9, 1.0):
        a, b = (generate(bundled, request, plan=EditPlan(bundled, to_model_range(torch.from_numpy(f.copy())[None]),
                                                         EditRequest(strength=strength)), progress=False) for f in faces)
        gap[strength] = np.abs(a.astype(float) - b.astype(float)).mean()
    assert gap[0.8] > 8 and gap[0.9] > 4 and gap[1.0] == 0, gap


def test_ddim_inversion_keeps_the_person_where_fresh_noise_does_not(each_bundled):
    pipe = each_bundled
    image, x = face_photo(pipe.codec.image_size)
    request = SamplingRequest(num=1, steps=50, sampler="ddim", guidance=1.0)
    inverted = generate(pipe, request, plan=EditPlan(pipe, x, EditRequest(strength=0.8, invert=True)), progress=False)
    fresh = generate(pipe, request, plan=EditPlan(pipe, x, EditRequest(strength=0.8)), progress=False)
    assert psnr(image[None], inverted)[0] > psnr(image[None], fresh)[0] + 3


def test_the_inversion_can_be_stopped_between_its_steps(bundled, photo):
    _, x = photo
    seen = []

    def stop_after_three():
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt

    plan = EditPlan(bundled, x, EditRequest(strength=0.5, invert=True), between_steps=stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        generate(bundled, SamplingRequest(num=1, steps=20, sampler="ddim"), plan=plan, progress=False)
    assert len(seen) == 3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_keeps_the_black_region_exactly_and_redraws_the_white(each_bundled, sampler):
    pipe, size = each_bundled, each_bundled.codec.image_size
    image, x = face_photo(size)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    out = generate(pipe, SamplingRequest(num=2, steps=6, sampler=sampler),     # resample 1: the sampler's own steps
                   plan=EditPlan(pipe, x, EditRequest(strength=1.0, mask=mask, resample=1)), progress=False)
    keep = ~mask[0, 0].bool().numpy()
    assert (out[:, keep] == image[keep]).all()
    assert (out[:, ~keep] != image[~keep]).any() and (out[0] != out[1]).any()


def test_resampled_inpainting_keeps_the_black_region_and_takes_more_network_calls(bundled, photo):
    image, x = photo
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    calls, outs = [], {}
    hook = bundled.net.register_forward_hook(lambda *_: calls.append(1))
    try:
        for r in (1, 3):
            calls.clear()
            outs[r] = generate(bundled, SamplingRequest(num=1, steps=6, sampler="ddpm"), progress=False,
                               plan=EditPlan(bundled, x, EditRequest(strength=1.0, mask=mask, resample=r)))
            assert len(calls) == (6 if r == 1 else 5 * 3 + 1), r          # the last step is not resampled
    finally:
        hook.remove()
    keep = ~mask[0, 0].bool().numpy()
    assert (outs[3][:, keep] == image[keep]).all() and (outs[1] != outs[3]).any()


def test_edit_inputs_are_checked(bundled, photo):
    _, x = photo
    for bad, words in ((dict(strength=0.5, resample=3), "give a mask"), (dict(strength=0.5, resample=0), "resample"),
                       (dict(strength=1.5), "strength"), (dict(strength=0.5, mask=torch.full((1, 1, 32, 32), 0.5)),
                                                           "black and white"),
                       (dict(strength=0.5, mask=torch.zeros(1, 1, 16, 16)), "mask must be")):
        with pytest.raises(UserError, match=words):
            EditPlan(bundled, x, EditRequest(**bad))
    with pytest.raises(UserError, match="photo must be"):
        EditPlan(bundled, torch.zeros(1, 3, 64, 64), EditRequest(strength=0.5))


@pytest.mark.slow          # the command line in real processes
def test_edit_command_writes_faces_with_their_provenance_and_a_comparison(tmp_path):
    face = Image.fromarray(draw_face(np.random.default_rng(1), 96))
    face.save(tmp_path / "photo.png")
    out = run("edit", "--checkpoint", "faces32", "--image", str(tmp_path / "photo.png"), "--no-detect", "--gender",
              "Female", "--guidance", "2",
              "--strength", "0.5", "--num", "2", "--steps", "6", "--compare", "--out", str(tmp_path / "e.png"),
              "--no-progress")
    assert out.returncode == 0, out.stderr
    picture = Image.open(tmp_path / "e.png")
    assert picture.size == (2 + 3 * 34, 2 + 34)                       # the photo, then the two edits
    text = picture.text
    assert text["ddpm-faces command"].startswith("ddpm-faces edit --checkpoint faces32 --image") and "--gender 'Female'" in \
        text["ddpm-faces command"] and "edited" in text["Description"] and text["ddpm-faces step"] == "9000"


@pytest.mark.slow          # the command line in real processes
def test_one_edit_is_the_face_itself_and_inverting_deterministically_draws_it_once(tmp_path):
    Image.fromarray(draw_face(np.random.default_rng(1), 96)).save(tmp_path / "photo.png")
    common = ["edit", "--checkpoint", "faces32", "--image", str(tmp_path / "photo.png"), "--no-detect",
              "--steps", "6", "--no-progress"]
    out = run(*common, "--num", "1", "--out", str(tmp_path / "one.png"))
    assert out.returncode == 0, out.stderr
    one = Image.open(tmp_path / "one.png")
    assert one.size == (32, 32) and "ddpm-faces command" in one.text          # no grid border, text kept
    out = run(*common, "--num", "3", "--invert", "--out", str(tmp_path / "inv.png"))
    assert out.returncode == 0 and "gives one face whatever the seed" in out.stderr, out.stderr
    assert "wrote 1 edited face" in out.stdout and Image.open(tmp_path / "inv.png").size == (32, 32)
    out = run(*common, "--num", "2", "--invert", "--sampler", "ddpm", "--out", str(tmp_path / "var.png"))
    assert out.returncode == 0 and "wrote 2 edited faces" in out.stdout.replace("face(s)", "faces"), out.stdout
    pair = np.asarray(Image.open(tmp_path / "var.png")).astype(int)
    assert np.abs(pair[1:33, 1:33] - pair[1:33, 35:67]).mean() > 1              # two different faces


@pytest.mark.slow          # the command line in real processes
def test_sample_pngs_say_how_to_make_them_again(tmp_path):
    out = run("sample", "--checkpoint", "faces32", "--num", "2", "--steps", "5", "--seed", "4", "--age", "20-29",
              "--out", str(tmp_path / "a.png"), "--upscale", "2", "--strip", str(tmp_path / "strip.png"),
              "--no-progress")
    assert out.returncode == 0, out.stderr
    text = Image.open(tmp_path / "a.png").text
    assert "synthetic" in text["Description"] and text["ddpm-faces step"] == "9000"
    assert Image.open(tmp_path / "strip.png").text == text                 # the strip says what made it too
    command = text["ddpm-faces command"].replace("'", "").split()[1:]
    assert command[-4:] == ["--out", "a.png", "--strip", "strip.png"] and str(tmp_path) not in " ".join(command)
    again = run(*command[:-4], "--out", str(tmp_path / "b.png"), "--no-progress")         # the same file again
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.slow          # the command line in real processes
def test_bad_photos_and_masks_are_one_line(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("1", (8000, 8000)).save(tmp_path / "huge.png")                 # 64 M pixels, a small file
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "grey.png")   # no face in it
    Image.new("L", (50, 50)).save(tmp_path / "small-mask.png")
    grey_mask = Image.new("L", (64, 64), 128)
    grey_mask.save(tmp_path / "grey-mask.png")
    cases = [(["--image", str(tmp_path / "notes.png")], "not an image"),
             (["--image", str(tmp_path / "huge.png")], "pixels"),
             (["--image", str(tmp_path / "grey.png")], "--no-detect"),
             (["--image", str(tmp_path / "grey.png"), "--no-detect", "--mask", str(tmp_path / "small-mask.png")],
              "50x50"),
             (["--image", str(tmp_path / "grey.png"), "--no-detect", "--mask", str(tmp_path / "grey-mask.png")],
              "black (keep) and white"),
             (["--image", str(tmp_path / "grey.png"), "--no-detect", "--strength", "2"], "strength"),
             (["--image", str(tmp_path / "grey.png"), "--no-detect", "--age", "200"], "unknown age")]
    for args, words in cases:
        out = run("edit", *args, "--out", str(tmp_path / "x.png"), "--steps", "2")
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and words in lines[0], (args, out.stderr)


@pytest.fixture(scope="module")
def drawn_face_photo(bundled):
    """A 128 px face that the 32 px model drew (enlarged): a photo framed like the training faces."""
    from ddpm_faces.images import enlarge
    face = generate(bundled, SamplingRequest(num=1, seed=2, steps=8, attributes={"age": "30-39"}), progress=False)
    return enlarge(face, 128)[0]


def test_a_face_crop_at_the_training_framing_is_used_as_it_is(drawn_face_photo):
    from ddpm_faces.photos.framing import frame_photo
    framed = frame_photo(Image.fromarray(drawn_face_photo), 128)
    assert framed.faces >= 1 and framed.box == (0, 0, 128, 128)
    assert np.abs(framed.image.astype(int) - drawn_face_photo.astype(int)).max() <= 1


def test_a_face_at_the_photo_edge_is_framed_without_black_bands(drawn_face_photo, monkeypatch):
    """The training framing reaches past the photo's corner: what lies outside is the photo mirrored, never
    black (the detector is told where the face is, half outside the photo)."""
    from ddpm_faces.photos import framing
    photo = np.full((150, 150, 3), 170, np.uint8)
    photo[:98, :98] = np.maximum(drawn_face_photo[30:, 30:], 60)          # no pixel of the photo is dark
    monkeypatch.setattr(framing, "_detect", lambda _: [(-30.0, -30.0, 126.0, 126.0)])
    framed = framing.frame_photo(Image.fromarray(photo), 64)
    assert min(framed.box[:2]) < -20                        # the box does reach outside
    assert framed.image.min() > 40                          # so no pixel of the frame comes from a black pad
    inside = framing.crop_square(Image.fromarray(photo), (0, 0, 98, 98))
    assert np.array_equal(np.asarray(inside), photo[:98, :98])              # inside the photo: the photo itself


def test_an_edit_keeps_the_attributes_it_does_not_ask_for(drawn_face_photo, bundled):
    from ddpm_faces.evaluation.attributes import keep_photo_attributes, load_classifier, read_attributes
    clf, vocab = load_classifier(), bundled.cfg.model.vocab
    read = read_attributes(clf, drawn_face_photo, vocab)
    assert set(read) == {"age", "gender", "race"} and all(read[k] in vocab[k] for k in read)
    asked = SamplingRequest(attributes={"age": "60-69"}, unasked="photo")
    request, kept = keep_photo_attributes(asked, vocab, drawn_face_photo, clf)
    assert kept == {"gender": read["gender"], "race": read["race"]}
    assert request.attributes == {"age": "60-69", **kept}                       # the asked age wins
    assert keep_photo_attributes(asked.replace(unasked="model"), vocab, drawn_face_photo, clf) == \
        (asked.replace(unasked="model"), {})


def test_resampling_refuses_an_eta_it_would_ignore(bundled, photo):
    _, x = photo
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:, :] = 1
    plan = EditPlan(bundled, x, EditRequest(strength=1.0, mask=mask, resample=2))
    with pytest.raises(UserError, match="no eta"):
        generate(bundled, SamplingRequest(num=1, steps=2, sampler="ddim", eta=0.5), plan=plan, progress=False)


def test_a_16_bit_greyscale_photo_is_read_as_its_picture_not_white(tmp_path):
    from ddpm_faces.photos.framing import open_photo
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")                  # uint16: mode I;16
    rgb = np.asarray(open_photo(tmp_path / "grey16.png"))
    assert rgb.shape == (64, 64, 3) and rgb.min() <= 1 and rgb.max() >= 254
    assert abs(float(rgb.mean()) - 127.5) < 2                       # the ramp, not a white square


def test_an_edit_request_names_its_flags_once_for_the_command_line_and_the_web_page():
    mask = torch.ones(1, 1, 32, 32)
    assert EditRequest().cli_flags() == f"--strength {DEFAULT_STRENGTH:g}"
    edit = EditRequest(strength=0.5, invert=True, mask=mask, resample=3)
    assert edit.cli_flags("m.png") == "--strength 0.5 --invert --mask m.png --resample 3"
    with pytest.raises(UserError, match="invert must be true or false"):
        EditRequest(invert=1).validate()
    deterministic, stochastic = SamplingRequest(sampler="ddim"), SamplingRequest(sampler="ddpm")
    assert EditRequest(invert=True).one_face(deterministic)
    assert not EditRequest(invert=True).one_face(stochastic)
    assert not EditRequest(invert=True, mask=mask).one_face(deterministic)   # the kept region is re-noised per seed


def test_a_masked_edit_resamples_by_default_unless_told_or_its_sampler_has_an_option_set():
    mask = torch.ones(1, 1, 32, 32)
    assert EditRequest(mask=mask).resample_for({}) == MASK_RESAMPLE > 1
    assert EditRequest(mask=mask).resample_for({"eta": 0.5}) == 1          # RePaint's ancestral steps have no eta
    assert EditRequest(mask=mask, resample=1).resample_for({}) == 1
    assert EditRequest().resample_for({}) == 1                              # nothing to resample without a mask
    assert "--resample" not in EditRequest(mask=mask).cli_flags("m.png")    # the default stays the default


def test_a_default_masked_edit_takes_resample_times_the_network_calls(bundled, photo):
    _, x = photo
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:, :] = 1
    calls = []

    def counted(net):
        def forward(*args, **kwargs):
            calls.append(1)
            return net(*args, **kwargs)
        return forward

    request = SamplingRequest(num=1, steps=4, guidance=1.0)
    counts = {}
    for resample in (None, 1):
        calls.clear()
        plan = EditPlan(bundled, x, EditRequest(strength=1.0, mask=mask, resample=resample))
        real = bundled.net.forward
        bundled.net.forward = counted(real)
        try:
            generate(bundled, request, plan=plan, progress=False)
        finally:
            bundled.net.forward = real
        counts[resample] = len(calls)
    assert counts[None] > 2 * counts[1], counts
