"""The web app: model discovery and card, the handlers (validation, streaming, reproducibility, cancel), the
real server on a free localhost port driven by gradio_client, and the `serve` command."""
from __future__ import annotations

import math
import shlex
import shutil
import socket
import subprocess
import sys
import time

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from ddpm_faces.app import MAX_IMAGES, FaceApp, discover_models, launch
from ddpm_faces.cli import main
from ddpm_faces.config import load_config
from ddpm_faces.errors import UserError
from ddpm_faces.images import make_grid
from ddpm_faces.models import UNet, UNetConfig
from ddpm_faces.pipeline import WEIGHTS_DIR, export_model, generate

BUNDLED = str(WEIGHTS_DIR / "faces32")
VOCAB = {"age": ["0-2", "20-29"], "gender": ["Female", "Male"]}


@pytest.fixture(scope="module")
def conditional_export(tmp_path_factory):
    """A tiny 16 px conditional model (100 timesteps) exported with a metrics.json beside it."""
    torch.manual_seed(0)
    unet_cfg = UNetConfig(resolution=16, base_channels=8, channel_mults=[1, 2], blocks_per_level=1,
                          attn_resolutions=[8], head_channels=8, dropout=0.0, groups=4, attributes=["age", "gender"],
                          vocab=VOCAB)
    cfg = load_config("quickstart", ["model.resolution=16", "data.resolution=16", "diffusion.timesteps=100"])
    cfg.model = unet_cfg
    folder = export_model(UNet(unet_cfg), cfg, tmp_path_factory.mktemp("conditional") / "export")
    (folder / "metrics.json").write_text('{"fid": 123.456, "face_rate": 0.5, "sampler": "ddim"}')
    return str(folder)


@pytest.fixture(scope="module")
def unconditional_export(tmp_path_factory):
    """A tiny 16 px unconditional model."""
    torch.manual_seed(1)
    unet_cfg = UNetConfig(resolution=16, base_channels=8, channel_mults=[1, 2], blocks_per_level=1,
                          attn_resolutions=[8], head_channels=8, dropout=0.0, groups=4)
    cfg = load_config("quickstart", ["model.resolution=16", "data.resolution=16", "diffusion.timesteps=100"])
    cfg.model = unet_cfg
    return str(export_model(UNet(unet_cfg), cfg, tmp_path_factory.mktemp("unconditional") / "export"))


@pytest.fixture(scope="module")
def app(conditional_export, unconditional_export):
    return FaceApp.from_paths([BUNDLED, conditional_export, unconditional_export], threads=1)


def outputs(handler_output) -> list[tuple]:
    """The handler's yields without the keep-alive ticks (tuples of gr.skip())."""
    return [out for out in handler_output if out[-1] != gr.skip()]


def wait_idle(app: FaceApp, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while app.active and time.monotonic() < end:
        time.sleep(0.02)
    assert app.active == 0, "the sampling thread did not stop"


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
def test_discovery_offers_the_bundled_model_first_then_exported_runs(tmp_path, conditional_export):
    runs = tmp_path / "runs"
    shutil.copytree(conditional_export, runs / "cond" / "export")
    (runs / "unfinished" / "checkpoints").mkdir(parents=True)                # no export yet: not listed
    models = discover_models(None, runs)
    labels = list(models)
    assert labels[0] == "faces32 (bundled)" and models[labels[0]].cli_checkpoint is None
    assert labels[1:] == [str(runs / "cond")]
    assert all("attributes32" not in label for label in labels)            # the attribute classifier is no model
    only = discover_models([conditional_export], runs)
    assert list(only) == [conditional_export]
    with pytest.raises(UserError, match="/no/such/run"):
        discover_models(["/no/such/run"])


def test_model_card_shows_parameters_resolution_training_and_metrics(app, conditional_export):
    card = app.card(conditional_export)
    assert "parameters" in card and "16 × 16 px" in card and "training steps" in card
    assert "fid**: 123.5" in card and "face_rate**: 0.5" in card
    assert "age: 0-2, 20-29" in card
    bundled = app.card(BUNDLED)
    assert "3.92 M" in bundled and "32 × 32 px" in bundled and "9,000 (of 9,000 configured)" in bundled
    assert "metric: fid" in bundled and "race: Asian" in bundled


def test_conditional_controls_show_only_for_conditional_models(app, conditional_export, unconditional_export):
    assert app.attribute_names == ["age", "gender", "race"]
    card, guidance, age, gender, race, steps, i_steps = app.model_changed(conditional_export)
    assert guidance["visible"] and age["visible"] and gender["visible"] and not race["visible"]
    assert age["choices"] == ["any", "0-2", "20-29"] and gender["value"] == "any"
    assert steps["maximum"] == 100                                          # the model's timesteps
    card, guidance, age, gender, race, steps, i_steps = app.model_changed(unconditional_export)
    assert not guidance["visible"] and not age["visible"] and not gender["visible"] and not race["visible"]
    card, guidance, age, gender, race, steps, i_steps = app.model_changed(BUNDLED)
    assert guidance["visible"] and race["visible"] and "Black" in race["choices"]
    assert steps["maximum"] == 1000
    assert 0 <= app.random_seed() < 2**31


# ---------------------------------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------------------------------
def test_generate_streams_previews_then_faces_the_cli_reproduces(app, tmp_path):
    yields = outputs(app.generate(BUNDLED, "ddpm", 10, 3, 5, 1.0, "fp32", "any", "any"))
    previews, final = yields[:-1], yields[-1]
    assert previews and all(p[-1].startswith("Denoising: step") for p in previews)
    picture = previews[0][0]                                                # the 3 estimates as one picture
    assert picture.shape == ((2 * 34 + 2) * 4, (2 * 34 + 2) * 4, 3) and previews[0][1] is None
    preview, gallery, grid_path, seeds, strip, status = final
    assert preview == grid_path
    assert [caption for _, caption in gallery] == ["seed 5 · image 0", "seed 5 · image 1", "seed 5 · image 2"]
    assert gallery[0][0].shape == (128, 128, 3)                              # 32 px shown 4x, nearest
    assert strip.shape == ((32 + 4) * 4, (8 * 34 + 2) * 4, 3)                # one face, 8 columns
    assert status.startswith("3 faces in")
    # the grid is what the sampler makes, and the printed command writes the same picture
    images = generate(app.pipeline(app.models[BUNDLED]), 3, seed=5, sampler="ddpm", steps=10, progress=False)
    grid = np.asarray(Image.open(grid_path))
    assert np.array_equal(grid[::4, ::4], make_grid(images))
    command = seeds.split("This grid again: `")[1].split("`")[0]
    args = shlex.split(command)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "again.png")
    assert main(args + ["--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), grid)


def test_generate_with_attributes_guidance_and_bf16(app, conditional_export, tmp_path):
    *_, final = outputs(app.generate(conditional_export, "ddim", 3, 2, 0, 3.0, "bf16", "20-29", "any"))
    preview, gallery, grid_path, seeds, strip, status = final
    assert len(gallery) == 2 and "age 20-29" in status and "guidance 3" in status and "bf16" in status
    command = seeds.split("This grid again: `")[1].split("`")[0]
    assert f"--checkpoint {conditional_export}" in command
    assert "--age '20-29' --guidance 3 --precision bf16" in command
    args = shlex.split(command)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "again.png")
    assert main(args + ["--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(grid_path)))


GOOD = (BUNDLED, "ddpm", 10, 2, 0, 1.0, "fp32", "any", "any")


@pytest.mark.parametrize("position, value, message", [
    (0, "nope", "unknown model 'nope'"),
    (1, "euler", "unknown sampler 'euler': choose one of ddpm, ddim, dpmpp-2m, heun"),
    (2, 0, "steps must be from 1 to 1000, got 0"),
    (2, 1001, "steps must be from 1 to 1000, got 1001"),
    (2, 2.5, "steps must be a whole number"),
    (3, 0, "number of images must be from 1 to 16, got 0"),
    (3, 17, "number of images must be from 1 to 16, got 17"),
    (4, -1, "seed must be from 0 to"),
    (4, 1.5, "seed must be a whole number"),
    (4, None, "seed must be a whole number"),
    (5, -0.5, "guidance scale must be a number from 0 to 20"),
    (5, 21, "guidance scale must be a number from 0 to 20"),
    (5, math.nan, "guidance scale must be a number from 0 to 20"),
    (5, "lots", "guidance scale must be a number from 0 to 20"),
    (6, "fp16", "unknown precision 'fp16': choose one of fp32, bf16"),
    (7, "200-300", "unknown age '200-300': choose one of any, 0-2, 3-9"),
])
def test_generate_rejects_bad_input_with_a_clear_message(app, position, value, message):
    args = list(GOOD)
    args[position] = value
    with pytest.raises(gr.Error, match=message.replace("(", r"\(")):
        next(app.generate(*args))


def test_attributes_for_an_unconditional_model_are_refused(app, unconditional_export):
    with pytest.raises(gr.Error, match="is not conditioned on age"):
        next(app.generate(unconditional_export, "ddpm", 10, 2, 0, 1.0, "fp32", "20-29", "any"))


def test_model_specific_limits(app, conditional_export):
    with pytest.raises(gr.Error, match="steps must be from 1 to 100, got 101"):
        next(app.generate(conditional_export, "ddpm", 101, 1, 0, 1.0))
    with pytest.raises(gr.Error, match="unknown age '99': choose one of any, 0-2, 20-29"):
        next(app.generate(conditional_export, "ddpm", 5, 1, 0, 1.0, "fp32", "99", "any"))
    with pytest.raises(gr.Error, match="number of faces must be from 2 to 16, got 1"):
        next(app.interpolate(BUNDLED, "ddim", 5, 1, 0, 1, 1.0))


def test_closing_the_handler_stops_the_sampling_loop(app):
    stream = app.generate(BUNDLED, "ddpm", 1000, MAX_IMAGES, 0, 1.0)
    while "step" not in str(next(stream)[-1]):          # wait for the first preview
        pass
    stream.close()                                      # what a cancel does
    wait_idle(app)
    run = app.runs[-1]
    assert run.outcome == "cancelled" and run.steps_done < 1000


def test_interpolation_row_runs_from_seed_a_to_seed_b(app):
    *_, (row, status) = outputs(app.interpolate(BUNDLED, "ddim", 6, 4, 3, 8, 1.0))
    faces = row[::4, ::4]                              # undo the display enlargement: a 4-face grid
    assert faces.shape == (36, 4 * 34 + 2, 3) and "from seed 3 to seed 8" in status
    pipe = app.pipeline(app.models[BUNDLED])
    ends = [generate(pipe, 1, seed=s, sampler="ddim", steps=6, progress=False)[0] for s in (3, 8)]
    for face, expected in ((faces[2:34, 2:34], ends[0]), (faces[2:34, -34:-2], ends[1])):
        assert np.abs(face.astype(int) - expected).max() <= 3    # batch size changes only float rounding
    assert not np.array_equal(faces[2:34, 36:68], faces[2:34, 2:34])


# ---------------------------------------------------------------------------------------------------
# the real server, driven over HTTP
# ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    demo = app.blocks()
    launch(demo, port=free_port(), block=False, quiet=True)
    try:
        yield demo, Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def test_server_listens_on_localhost_with_a_limited_queue_and_no_share_link(server, app):
    demo, _ = server
    assert demo.local_url.startswith("http://127.0.0.1:") and not demo.share and demo.share_url is None
    assert demo._queue.default_concurrency_limit == app.concurrency_limit == 1
    assert demo._queue.max_size == app.max_queue
    sampling = [fn for fn in demo.fns.values() if fn.api_name in ("generate", "interpolate")]
    assert len(sampling) == 2 and {fn.concurrency_id for fn in sampling} == {"sampling"}
    assert all(fn.concurrency_limit == 1 for fn in sampling)


def test_server_generates_faces_for_gradio_client(server, conditional_export):
    _, client = server
    preview, gallery, grid_path, seeds, strip, status = client.predict(BUNDLED, "ddpm", 6, 2, 7, 1.0, "fp32",
                                                                       "any", "any", api_name="/generate")
    assert Image.open(preview).size == Image.open(grid_path).size
    assert [item["caption"] for item in gallery] == ["seed 7 · image 0", "seed 7 · image 1"]
    assert Image.open(gallery[0]["image"]).size == (128, 128)
    assert Image.open(grid_path).format == "PNG" and "--seed 7 --num 2" in seeds
    assert status.startswith("2 faces in")
    row, status = client.predict(conditional_export, "ddim", 3, 3, 1, 2, 2.0, "fp32", "any", "Male",
                                 api_name="/interpolate")
    assert Image.open(row).size == ((3 * 18 + 2) * 8, 20 * 8) and "from seed 1 to seed 2" in status
    card = client.predict(conditional_export, api_name="/model_changed")[0]
    assert "16 × 16 px" in card


@pytest.mark.parametrize("position, value, message", [
    (3, 17, "number of images must be from 1 to 16, got 17"),
    (3, 0, "number of images must be from 1 to 16, got 0"),
    (2, 5000, "steps must be from 1 to 1000, got 5000"),
    (1, "euler", "unknown sampler 'euler'"),
    (4, -5, "seed must be from 0 to"),
    (5, 50, "guidance scale must be a number from 0 to 20"),
    (6, "int8", "unknown precision 'int8'"),
    (7, "200-300", "unknown age '200-300'"),
    (0, "../../etc", "unknown model '../../etc'"),
])
def test_server_rejects_out_of_range_requests(server, position, value, message):
    _, client = server
    args = list(GOOD)
    args[position] = value
    with pytest.raises(AppError, match=message.replace("(", r"\(")):
        client.predict(*args, api_name="/generate")


def test_server_cancel_stops_a_running_generation(server, app):
    _, client = server
    done = len(app.runs)
    job = client.submit(BUNDLED, "ddpm", 1000, MAX_IMAGES, 1, 1.0, "fp32", "any", "any", api_name="/generate")
    end = time.monotonic() + 30
    def previewed():
        return any(isinstance(out[-1], str) and out[-1].startswith("Denoising") for out in job.outputs())
    while not previewed() and time.monotonic() < end:         # wait for the first streamed preview
        time.sleep(0.05)
    assert previewed(), "no preview was streamed"
    job.cancel()
    wait_idle(app)
    assert len(app.runs) == done + 1
    assert app.runs[-1].outcome == "cancelled" and app.runs[-1].steps_done < 1000


# ---------------------------------------------------------------------------------------------------
# ddpm-faces serve
# ---------------------------------------------------------------------------------------------------
def test_serve_defaults_to_localhost_without_share(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("ddpm_faces.app.launch",
                        lambda demo, host, port, share: seen.update(host=host, port=port, share=share))
    monkeypatch.chdir(tmp_path)                                     # no runs/ here: the bundled model only
    threads = torch.get_num_threads()
    try:
        assert main(["serve", "--threads", "1"]) == 0
        assert (seen["host"], seen["port"], seen["share"]) == ("127.0.0.1", 7860, False)
        assert main(["serve", "--threads", "1", "--share", "--port", "8000"]) == 0
        assert (seen["port"], seen["share"]) == (8000, True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("args, words", [
    (["serve", "--checkpoint", "/no/such/run"], "/no/such/run"),
    (["serve", "--port", "70000"], "--port must be from 1 to 65535"),
])
def test_serve_bad_input_is_one_line(capsys, args, words):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_help_lists_serve_without_importing_gradio():
    code = ("import sys; from ddpm_faces.cli import build_parser; parser = build_parser(); "
            "print('gradio' in sys.modules); parser.parse_args(['serve', '--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    first, help_text = out.stdout.split("\n", 1)
    assert first == "False" and out.returncode == 0
    assert "--checkpoint" in help_text and "--share" in help_text and "127.0.0.1" in help_text
