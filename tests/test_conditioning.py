"""Attribute conditioning and classifier-free guidance: label dropout, the unspecified path, the guidance
formula, vocabularies through export and load, and the errors users see."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_config, tiny_model, tiny_overrides
from ddpm_faces.config import config_from_dict, load_config
from ddpm_faces.data import prepare_dataset
from ddpm_faces.diffusion import Denoiser, NoiseSchedule
from ddpm_faces.diffusion.schedules import cosine_betas
from ddpm_faces.errors import UserError
from ddpm_faces.models import UNet
from ddpm_faces.models.conditioning import (UNSPECIFIED, AttributeEmbedding, count_combinations, draw_unasked, drop_labels,
                                           encode_attributes)
from ddpm_faces.pipeline import Pipeline, SamplingRequest, generate, load_pipeline
from ddpm_faces.pipeline.generate import drawn_labels
from ddpm_faces.runs import export_model
from ddpm_faces.training import train

VOCAB = {"age": ["0-2", "20-29", "30-39"], "gender": ["Female", "Male"]}


def conditional_unet(seed: int = 0) -> UNet:
    net = tiny_model(seed=seed, attributes=["age", "gender"], vocab=VOCAB)[0].eval()
    with torch.no_grad():                       # zero-initialised output layers would hide every difference
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return net


def test_label_dropout_rate_is_p_per_attribute_and_independent():
    labels = torch.zeros(200_000, 3, dtype=torch.long)
    dropped = drop_labels(labels, 0.1, torch.Generator().manual_seed(0)) == UNSPECIFIED
    rates = dropped.float().mean(0)
    assert torch.allclose(rates, torch.full((3,), 0.1), atol=0.003)
    both = (dropped[:, 0] & dropped[:, 1]).float().mean()
    assert abs(float(both) - 0.01) < 0.001                                   # independent: p * p
    assert torch.equal(drop_labels(labels, 0.0), labels)
    unknown = torch.full((10, 2), UNSPECIFIED)
    assert torch.equal(drop_labels(unknown, 0.5), unknown)                   # unknown labels stay unknown


def test_all_unspecified_is_the_unconditional_path_and_labels_change_the_output():
    net = conditional_unet()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 900])
    unspecified = torch.full((3, 2), UNSPECIFIED)
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, unspecified))
        female = net(x, t, torch.tensor([[UNSPECIFIED, 0]] * 3))
        male = net(x, t, torch.tensor([[UNSPECIFIED, 1]] * 3))
    assert (female - male).abs().max() > 1e-4


def test_guidance_one_is_the_conditional_prediction_and_w_follows_the_formula():
    net = conditional_unet()
    schedule = NoiseSchedule(cosine_betas(1000))
    x = torch.randn(2, 3, 16, 16)
    cond = torch.tensor([[2, 0], [UNSPECIFIED, 1]])
    t = torch.full((2,), 400)
    with torch.no_grad():
        out_c, out_u = net(x, t, cond), net(x, t)
        plain = Denoiser(net, schedule, "v", guidance=1.0).output(x, t, cond)
        assert torch.equal(plain, out_c)
        for w in (0.0, 2.0, 5.0):
            guided = Denoiser(net, schedule, "v", guidance=w).output(x, t, cond)
            torch.testing.assert_close(guided, out_u + w * (out_c - out_u), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(Denoiser(net, schedule, "v", guidance=0.0).output(x, t, cond), out_u,
                                   atol=1e-5, rtol=1e-4)


def test_guidance_interval_leaves_other_timesteps_unguided():
    net = conditional_unet()
    schedule = NoiseSchedule(cosine_betas(1000))
    d = Denoiser(net, schedule, "eps", guidance=4.0, guidance_interval=(100, 600))
    assert [d.guided_at(t) for t in (50, 100, 600, 601)] == [False, True, True, False]
    x, cond, t = torch.randn(1, 3, 16, 16), torch.tensor([[1, 1]]), torch.tensor([800])
    with torch.no_grad():
        assert torch.equal(d.output(x, t, cond), net(x, t, cond))


def test_embedding_rejects_labels_outside_the_vocabulary():
    emb = AttributeEmbedding([3, 2], 8)
    with pytest.raises(IndexError):
        emb(torch.tensor([[3, 0]]))
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        emb(torch.tensor([[0, 0, 0]]))


def test_encode_attributes_by_name_case_insensitive_and_errors_list_the_values():
    labels = encode_attributes(VOCAB, ["age", "gender"], {"gender": "female"}, 2)
    assert labels.tolist() == [[UNSPECIFIED, 0], [UNSPECIFIED, 0]]
    assert encode_attributes(VOCAB, ["age", "gender"], {"age": "30-39", "gender": "Male"}, 1).tolist() == [[2, 1]]
    with pytest.raises(ValueError, match="choose one of '0-2', '20-29', '30-39'"):
        encode_attributes(VOCAB, ["age", "gender"], {"age": "35"}, 1)
    with pytest.raises(ValueError, match="not conditioned on race"):
        encode_attributes(VOCAB, ["age", "gender"], {"race": "Black"}, 1)


def conditional_config():
    """The config of conditional_unet(), vocabularies filled in as training would."""
    cfg = tiny_config("model.attributes=[age,gender]")
    cfg.model.vocab = VOCAB
    return cfg


def test_vocabularies_survive_export_and_load_and_sampling_follows_them(tmp_path):
    net = conditional_unet()
    cfg = conditional_config()
    export_model(net, cfg, tmp_path / "export")
    pipe = load_pipeline(tmp_path / "export")
    assert pipe.cfg.model.vocab == VOCAB and pipe.cfg.model.attributes == ["age", "gender"]
    for key, value in net.state_dict().items():
        assert torch.equal(pipe.net.state_dict()[key], value)
    asked = SamplingRequest(num=2, steps=4, sampler="ddim", guidance=3.0)
    female = generate(pipe, asked.replace(attributes={"gender": "Female"}), progress=False)
    again = generate(pipe, asked.replace(attributes={"gender": "Female"}), progress=False)
    male = generate(pipe, asked.replace(attributes={"gender": "Male"}), progress=False)
    assert (female == again).all() and (female != male).any()
    with pytest.raises(UserError, match="choose one of 'Female', 'Male'"):
        generate(pipe, asked.replace(attributes={"gender": "robot"}), progress=False)


def test_unconditional_model_refuses_attributes():
    cfg = load_config("quickstart")
    pipe = Pipeline(UNet(cfg.model), cfg, source="somewhere")
    with pytest.raises(UserError, match="unconditional"):
        pipe.labels({"age": "30-39"}, 1)
    assert pipe.labels({"age": None}, 1) is None


def test_training_a_conditional_model_fills_the_vocabulary_from_the_data(tmp_path, face_folder):
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{"model.attributes": "[gender, age]",
                                                                         "train.max_steps": 4}))
    result = train(cfg, progress=False)
    pipe = load_pipeline(result.run_dir)
    assert pipe.cfg.model.vocab == {"gender": ["Female", "Male"], "age": ["0-2", "20-29", "30-39"]}
    assert pipe.net.conditional
    data = prepare_dataset(face_folder, 16, progress=False)
    train_labels = data.labels[data.indices("train")][:, [data.attributes.index("gender"), data.attributes.index("age")]]
    expected = [int(((train_labels[:, 0] == g) & (train_labels[:, 1] == a)).sum()) for g in range(2) for a in range(3)]
    assert pipe.cfg.model.label_counts == expected and sum(expected) > 0
    bad = load_config("quickstart", tiny_overrides(tmp_path, face_folder, name="bad",
                                                   **{"model.attributes": "[race]"}))
    with pytest.raises(UserError, match="does not label; its labels: .*gender"):
        train(bad, progress=False)


@pytest.mark.slow          # the command line in real processes
@pytest.mark.parametrize("flags, words", [
    (["--age", "30-39", "UNCONDITIONAL"], ["unconditional", "age"]),
    (["--grid-by", "race", "UNCONDITIONAL"], ["unconditional"]),
    (["--age", "35"], ["unknown age '35'", "'30-39'"]),                      # the bundled model is conditional
    (["--grid-by", "age", "--age", "30-39"], ["do not also pass --age"]),
    (["--guidance", "nan"], ["guidance"]),
    (["--guidance-interval", "500", "100"], ["guidance interval"]),
])
def test_sample_cli_errors_are_one_line(flags, words, tmp_path, unconditional_model):
    if "UNCONDITIONAL" in flags:
        flags = [f for f in flags if f != "UNCONDITIONAL"] + ["--checkpoint", str(unconditional_model)]
    out = subprocess.run([sys.executable, "-m", "ddpm_faces", "sample", "--steps", "2", "--num", "1",
                          "--out", str(tmp_path / "x.png"), *flags], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and all(w in out.stderr for w in words), out.stderr


def test_interpolation_ends_are_the_seeds_own_faces_and_slerp_keeps_the_norm():
    from ddpm_faces.pipeline import interpolate, slerp

    torch.manual_seed(0)
    a, b = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    mid = slerp(a, b, 0.5)
    assert abs(mid.norm() / a.norm() - 1) < 0.05                  # a straight line would shrink it by ~0.7
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    net = conditional_unet()
    cfg = load_config("quickstart", ["model.resolution=16", "data.resolution=16"])
    cfg.model = net.cfg
    pipe = Pipeline(net, cfg, source="test")
    request = SamplingRequest(num=4, seed=3, sampler="ddim", steps=3)
    row = interpolate(pipe, 7, request, progress=False)
    assert np.array_equal(row[0], generate(pipe, request.replace(num=1), progress=False)[0])
    assert np.array_equal(row[-1], generate(pipe, request.replace(num=1, seed=7), progress=False)[0])


def test_bf16_sampling_stays_close_to_fp32():
    net = conditional_unet()
    cfg = load_config("quickstart", ["model.resolution=16", "data.resolution=16"])
    cfg.model = net.cfg
    pipe = Pipeline(net, cfg, source="test")
    request = SamplingRequest(num=4, sampler="ddim", steps=5, attributes={"gender": "Male"}, guidance=2.0,
                              precision="fp32")
    full, half = generate(pipe, request, progress=False), generate(pipe, request.replace(precision="bf16"), progress=False)
    diff = np.abs(full.astype(int) - half.astype(int))
    assert diff.mean() < 3 and (full != half).any()         # a little rounding, not another image
    with pytest.raises(UserError, match="precision"):
        generate(pipe, request.replace(precision="fp8"), progress=False)


def test_combination_counts_are_row_major_and_skip_rows_with_an_unknown_label():
    labels = torch.tensor([[0, 1], [2, 0], [2, 0], [1, UNSPECIFIED], [0, 1], [0, 1]])
    assert count_combinations(labels, [3, 2]) == [0, 3, 0, 0, 2, 0]     # (age 0, gender 1) x3, (2, 0) x2


def test_unasked_attributes_follow_the_data_given_the_asked_ones():
    counts = [10, 30, 0, 0, 45, 15]                      # ages x genders: 3 x 2, row-major
    generators = [torch.Generator().manual_seed(i) for i in range(6000)]
    free = draw_unasked(counts, [3, 2], torch.tensor([UNSPECIFIED, UNSPECIFIED]), generators)
    seen = np.bincount((free[:, 0] * 2 + free[:, 1]).numpy(), minlength=6) / len(free)
    assert np.abs(seen - np.array(counts) / sum(counts)).max() < 0.02 and seen[2] == seen[3] == 0
    male = draw_unasked(counts, [3, 2], torch.tensor([UNSPECIFIED, 1]), generators)
    assert (male[:, 1] == 1).all()                       # the asked value is kept ...
    share = np.bincount(male[:, 0].numpy(), minlength=3) / len(male)
    assert abs(share[0] - 30 / 45) < 0.02 and share[1] == 0        # ... and the age drawn given it
    unseen = draw_unasked(counts, [3, 2], torch.tensor([1, UNSPECIFIED]), generators[:3])
    assert unseen.tolist() == [[1, UNSPECIFIED]] * 3     # a combination the data never showed: left to the model


def test_sampling_draws_unasked_attributes_per_image_and_reproducibly(tmp_path):
    net = conditional_unet()
    cfg = conditional_config()
    cfg.model.label_counts = [5, 0, 0, 5, 5, 5]
    export_model(net, cfg, tmp_path / "export")
    pipe = load_pipeline(tmp_path / "export")
    assert pipe.cfg.model.label_counts == [5, 0, 0, 5, 5, 5]
    request = SamplingRequest(num=6, steps=3, sampler="ddim", guidance=2.0).validate(pipe)
    labels = drawn_labels(pipe, request)
    assert labels.shape == (6, 2) and (labels >= 0).all() and len({tuple(r) for r in labels.tolist()}) > 1
    assert {(a, g) for a, g in labels.tolist()} <= {(0, 0), (1, 1), (2, 0), (2, 1)}
    assert torch.equal(drawn_labels(pipe, request.replace(num=2), first_index=4), labels[4:])
    assert drawn_labels(pipe, request.replace(unasked="model")) is None
    images = generate(pipe, request, progress=False)
    assert (generate(pipe, request, labels=labels, progress=False) == images).all()
    assert (generate(pipe, request.replace(num=2), first_index=4, progress=False) == images[4:]).all()
    assert (generate(pipe, request.replace(unasked="model"), progress=False) != images).any()
    cfg.model.label_counts = []                          # exported before label counts were recorded
    export_model(net, cfg, tmp_path / "old")
    assert drawn_labels(load_pipeline(tmp_path / "old"), request) is None
    with pytest.raises(UserError, match="unknown unasked 'data2'"):
        request.replace(unasked="data2").validate(pipe)
    cfg.model.label_counts = [1, 2, 3]
    with pytest.raises(UserError, match="invalid model.label_counts: 6 counts"):
        config_from_dict(cfg.to_dict())


def test_guidance_applies_in_the_default_band_unless_an_interval_is_given():
    from ddpm_faces.pipeline.request import GUIDANCE_BAND
    pipe = load_pipeline("faces32")
    lo, hi = SamplingRequest().interval_for(pipe.schedule.T)
    assert (lo, hi) == (GUIDANCE_BAND[0] * 999, GUIDANCE_BAND[1] * 999)
    request = SamplingRequest(num=1, steps=8, attributes={"age": "60-69"}, unasked="model")
    band = generate(pipe, request, progress=False)
    assert (generate(pipe, request.replace(guidance_interval=(lo, hi)), progress=False) == band).all()
    every = generate(pipe, request.replace(guidance_interval=(0.0, 999.0)), progress=False)
    assert (every != band).any()                         # the steps outside the band are guided only there


@pytest.mark.slow          # the command line in real processes
def test_grid_by_rows_are_labelled_with_their_values(tmp_path):
    from PIL import Image

    from ddpm_faces.cli import main

    out = tmp_path / "by-gender.png"
    assert main(["sample", "--checkpoint", "faces32", "--grid-by", "gender", "--num", "2", "--steps", "2",
                 "--no-progress", "--out", str(out)]) == 0
    picture = np.asarray(Image.open(out).convert("L")).astype(int)
    faces = 2 * 32 + 3 * 2                                      # make_grid: two 32 px faces, 2 px borders
    assert picture.shape[0] == 2 * 32 + 3 * 2 and picture.shape[1] > faces
    column = picture[:, :picture.shape[1] - faces]              # the labels, left of the faces
    rows = [column[2:34], column[36:68]]                        # each row's band
    assert all((band < 128).sum() > 10 for band in rows)        # text in both bands
    assert (column[:, :3] == 255).all()                         # on white
    assert not np.array_equal(rows[0] < 128, rows[1] < 128)    # "Female" and "Male" differ
