"""The web app: model discovery and card, the handlers (validation, streaming, reproducibility, cancel), the
one place where outputs and errors meet Gradio, the real server on a free localhost port driven by
gradio_client and plain HTTP, and `ddpm-faces serve` in its own process (its output, SIGTERM, its temporary
files)."""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import free_port, tiny_model
from ddpm_faces.app import MAX_IMAGES, FaceApp, discover_models
from ddpm_faces.app.guard import RequestGuard
from ddpm_faces.app.models import bundled_models
from ddpm_faces.app.outputs import GENERATE_OUTPUTS, STOPPED
from ddpm_faces.app.page import gradio_handler
from ddpm_faces.cli import build_parser, main
from ddpm_faces.diffusion import SAMPLERS
from ddpm_faces.errors import UserError
from ddpm_faces.images import make_grid
from ddpm_faces.pipeline.generate import drawn_labels
from ddpm_faces.pipeline import SamplingRequest, generate
from ddpm_faces.runs import BUNDLED_DIR, DEFAULT_MODEL, export_model

pytestmark = pytest.mark.slow          # the integration tier (real servers): `make test-fast` leaves it out

BUNDLED = str(BUNDLED_DIR / "faces32")
VOCAB = {"age": ["0-2", "20-29"], "gender": ["Female", "Male"]}


def tiny_export(folder: Path, seed: int, **conditioning) -> str:
    """A tiny 16 px model (100 timesteps) exported to `folder`."""
    return str(export_model(*tiny_model("diffusion.timesteps=100", seed=seed, **conditioning), folder))


@pytest.fixture(scope="module")
def conditional_export(tmp_path_factory):
    """A tiny conditional model with a metrics.json beside it."""
    folder = tiny_export(tmp_path_factory.mktemp("conditional") / "export", 0, attributes=["age", "gender"],
                         vocab=VOCAB)
    (Path(folder) / "metrics.json").write_text('{"fid": 123.456, "face_rate": 0.5, "sampler": "ddim"}')
    return folder


@pytest.fixture(scope="module")
def unconditional_export(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("unconditional") / "export", 1)


@pytest.fixture(scope="module")
def app(conditional_export, unconditional_export):
    app = FaceApp.from_paths([BUNDLED, conditional_export, unconditional_export], threads=1)
    yield app
    app.close()


def outputs(handler_output) -> list[dict]:
    """The handler's yields without the keep-alive ticks (empty dicts)."""
    return [out for out in handler_output if out]


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
    codec = runs / "ae" / "export"                                          # an autoencoder: it does not sample
    codec.mkdir(parents=True)
    (codec / "config.yaml").write_text("name: ae\ntask: autoencoder\ndata:\n  resolution: 128\n")
    (codec / "model.safetensors").write_bytes(b"not read")
    models = discover_models(None, runs)
    labels = list(models)
    bundled = [f"{folder.name} (bundled)" for folder in bundled_models()]
    assert "faces32 (bundled)" in bundled and labels[0] == f"{DEFAULT_MODEL} (bundled)"
    assert models[labels[0]].cli_checkpoint is None and all(models[b].cli_checkpoint for b in bundled[1:])
    assert labels[:len(bundled)] == bundled and labels[len(bundled):] == [str(runs / "cond")]
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
    shown = app.model_changed(conditional_export)
    assert shown["guidance"]["visible"] and shown["attribute_age"]["visible"] and not shown["attribute_race"]["visible"]
    assert shown["attribute_age"]["choices"] == ["any", "0-2", "20-29"] and shown["attribute_gender"]["value"] == "any"
    assert shown["steps"]["maximum"] == 100                                 # the model's timesteps
    hidden = app.model_changed(unconditional_export)
    assert not any(hidden[k]["visible"] for k in ("guidance", "attribute_age", "attribute_gender", "attribute_race"))
    bundled = app.model_changed(BUNDLED)
    assert bundled["guidance"]["visible"] and "Black" in bundled["attribute_race"]["choices"]
    assert bundled["steps"]["maximum"] == 1000 and "32 × 32 px" in bundled["card"]
    assert 0 <= app.random_seed() < 2**31


# ---------------------------------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------------------------------
def reproduce(seeds: str, out: Path) -> np.ndarray:
    """Run the `ddpm-faces sample` line the seeds text prints, writing to `out`; the picture it wrote."""
    command = seeds.split("This grid again: `")[1].split("`")[0]
    args = shlex.split(command)[1:]
    args[args.index("--out") + 1] = str(out)
    assert main(args + ["--no-progress"]) == 0
    return np.asarray(Image.open(out))


def test_generate_streams_previews_then_faces_the_cli_reproduces(app, tmp_path):
    yields = outputs(app.generator.generate(BUNDLED, "ddpm", 10, 3, 5, 1.0, "fp32", "any", "any"))
    previews, final = yields[:-1], yields[-1]
    assert previews and all(p["status"].startswith("Denoising: step") for p in previews)
    assert previews[0]["gallery"] is None and all("gallery" not in p for p in previews[1:])   # cleared once
    picture = previews[0]["preview"]                                       # the 3 estimates as one picture
    assert picture.shape == ((2 * 34 + 2) * 4, (2 * 34 + 2) * 4, 3)
    assert set(final) == set(GENERATE_OUTPUTS) and final["preview"] == final["grid_file"]
    assert [caption for _, caption in final["gallery"]] == [f"seed 5 · image {i}" for i in range(3)]
    assert final["gallery"][0][0].shape == (128, 128, 3)                    # 32 px shown 4x, nearest
    assert final["strip"].shape == ((32 + 4) * 4, (8 * 34 + 2) * 4, 3)      # one face, 8 columns
    assert final["status"].startswith("3 faces in")
    # the grid is what the sampler makes, and the printed command writes the same picture
    images = generate(app.pipeline(app.models[BUNDLED]), SamplingRequest(num=3, seed=5, sampler="ddpm", steps=10,
                                                                         precision="fp32", guidance=1.0),
                      progress=False)
    grid = np.asarray(Image.open(final["grid_file"]))
    assert np.array_equal(grid[::4, ::4], make_grid(images))
    assert np.array_equal(reproduce(final["seeds"], tmp_path / "again.png"), grid)


def test_generate_with_attributes_guidance_and_bf16(app, conditional_export, tmp_path):
    *_, final = outputs(app.generator.generate(conditional_export, "ddim", 3, 2, 0, 2.0, "bf16", "20-29", "any"))
    assert len(final["gallery"]) == 2
    assert "age 20-29" in final["status"] and "guidance 2" in final["status"] and "bf16" in final["status"]
    command = final["seeds"].split("This grid again: `")[1]
    assert f"--checkpoint {conditional_export}" in command
    assert "--guidance 2" in command and "--precision bf16" in command and "--age '20-29'" in command
    assert np.array_equal(reproduce(final["seeds"], tmp_path / "again.png"),
                          np.asarray(Image.open(final["grid_file"])))


GOOD = (BUNDLED, "ddpm", 10, 2, 0, 1.0, "fp32", "any", "any")
HUGE_NAME = "m" * 500_000


@pytest.mark.parametrize("position, value, message", [
    (0, "nope", "unknown model 'nope'"),
    (0, HUGE_NAME, "unknown model 'mmmm"),
    (1, "euler", f"unknown sampler 'euler': choose one of {', '.join(SAMPLERS)}"),
    (2, 0, "steps must be from 1 to 1000, got 0"),
    (2, 1001, "steps must be from 1 to 1000, got 1001"),
    (2, 2.5, "steps must be a whole number"),
    (2, "10", "steps must be a whole number"),
    (3, 0, "number of images must be from 1 to 16, got 0"),
    (3, 17, "number of images must be from 1 to 16, got 17"),
    (4, -1, "seed must be from 0 to"),
    (4, 1.5, "seed must be a whole number"),
    (4, None, "seed must be a whole number"),
    (4, 10**400, "seed must be from 0 to 2147483647, got a number of about 400 digits"),
    (4, 1e300, "seed must be from 0 to 2147483647"),
    (4, math.inf, "seed must be a whole number"),
    (5, -0.5, "guidance scale must be a number from 0 to 20"),
    (5, 21, "guidance scale must be a number from 0 to 20"),
    (5, 10**400, "guidance scale must be a number from 0 to 20"),
    (5, math.nan, "guidance scale must be a number from 0 to 20"),
    (5, "lots", "guidance scale must be a number from 0 to 20"),
    (6, "fp8", "unknown precision 'fp8': choose one of auto, fp32, bf16, fp16"),
    (6, "fp16", "fp16 needs a CUDA GPU"),
    (7, "200-300", "unknown age '200-300': choose one of any, 0-2, 3-9"),
    (7, ["a list"], "unknown age ['a list']"),
])
def test_generate_rejects_bad_input_with_a_short_clear_message(app, position, value, message):
    args = list(GOOD)
    args[position] = value
    with pytest.raises(UserError) as err:
        next(app.generator.generate(*args))
    text = str(err.value)
    assert text.startswith(message) or message in text, text
    assert "\n" not in text and len(text) < 300                             # a 500 kB name is not echoed back


def test_attributes_for_an_unconditional_model_are_refused(app, unconditional_export):
    with pytest.raises(UserError, match="is not conditioned on age"):
        next(app.generator.generate(unconditional_export, "ddpm", 10, 2, 0, 1.0, "fp32", "20-29", "any"))
    with pytest.raises(UserError, match="at most 3 attribute values"):
        next(app.generator.generate(unconditional_export, "ddpm", 10, 2, 0, 1.0, "fp32", "any", "any", "any", "any"))


def test_model_specific_limits(app, conditional_export):
    with pytest.raises(UserError, match="steps must be from 1 to 100, got 101"):
        next(app.generator.generate(conditional_export, "ddpm", 101, 1, 0, 1.0))
    with pytest.raises(UserError, match="unknown age '99': choose one of any, 0-2, 20-29"):
        next(app.generator.generate(conditional_export, "ddpm", 5, 1, 0, 1.0, "fp32", "99", "any"))
    with pytest.raises(UserError, match="number of faces must be from 2 to 16, got 1"):
        next(app.interpolator.interpolate(BUNDLED, "ddim", 5, 1, 0, 1, 1.0))
    with pytest.raises(UserError, match="seed B must be from 0 to"):
        next(app.interpolator.interpolate(BUNDLED, "ddim", 5, 2, 0, -1, 1.0))


def first_preview(stream) -> dict:
    for out in stream:
        if "step" in str(out.get("status", out.get("interpolate_status", ""))):
            return out
    raise AssertionError("no preview")


def test_closing_the_handler_stops_the_sampling_loop(app):
    stream = app.generator.generate(BUNDLED, "ddpm", 1000, MAX_IMAGES, 0, 1.0)
    first_preview(stream)
    stream.close()                                      # what a client's cancel (or a lost client) does
    wait_idle(app)
    assert app.runs[-1].outcome == "cancelled" and app.runs[-1].steps_done < 1000


@pytest.mark.parametrize("kind", ["generate", "interpolate"])
def test_cancel_by_token_ends_the_handler_with_stopped(app, kind):
    token = app.arm()
    args = (BUNDLED, "ddpm", 1000, 4, 0, 1.0) if kind == "generate" else (BUNDLED, "ddpm", 1000, 4, 0, 1, 1.0)
    stream = next(tab.handler for tab in app.tabs if tab.kind == kind)(*args, token=token)
    first_preview(stream)
    app.cancel(token)                                   # what the page's Cancel button does
    rest = outputs(stream)                              # the generator ends by itself, without an error
    status = "status" if kind == "generate" else "interpolate_status"
    assert rest[-1] == {status: STOPPED}
    assert app.runs[-1].outcome == "cancelled" and app.runs[-1].steps_done < 1000
    queued = outputs(app.generator.generate(*GOOD, token=token))  # started after the cancel, before a new click: stopped
    assert queued == [{"status": STOPPED}]
    assert outputs(app.generator.generate(*GOOD, token=app.arm(token)))[-1]["status"].startswith("2 faces in")


def test_interpolation_row_runs_from_seed_a_to_seed_b(app):
    final = outputs(app.interpolator.interpolate(BUNDLED, "ddim", 6, 4, 3, 8, 1.0))[-1]
    faces = final["row"][::4, ::4]                      # undo the display enlargement: a 4-face grid
    assert faces.shape == (36, 4 * 34 + 2, 3) and "from seed 3 to seed 8" in final["interpolate_status"]
    pipe = app.pipeline(app.models[BUNDLED])
    row_request = SamplingRequest(num=1, seed=3, sampler="ddim", steps=6, guidance=1.0)
    labels = drawn_labels(pipe, row_request.validate(pipe))          # the row keeps image 0's drawn attributes
    ends = [generate(pipe, row_request.replace(seed=s), labels=labels, progress=False)[0] for s in (3, 8)]
    for face, expected in ((faces[2:34, 2:34], ends[0]), (faces[2:34, -34:-2], ends[1])):
        assert np.abs(face.astype(int) - expected).max() <= 3    # batch size changes only float rounding
    assert not np.array_equal(faces[2:34, 36:68], faces[2:34, 2:34])


def test_the_gradio_side_turns_names_into_positions_and_input_errors_into_one_line():
    def stream(n):
        if n > 3:
            raise UserError("n must be at most 3,\nplease")
        yield {"status": "working"}
        yield {}
        yield {"preview": "grid.png", "status": "done"}

    handler = gradio_handler(stream, ("preview", "status"))
    first, tick, last = handler(1)
    assert first == (gr.skip(), "working") and tick == (gr.skip(), gr.skip()) and last == ("grid.png", "done")
    with pytest.raises(gr.Error) as err:
        next(handler(9))
    assert err.value.title == "Invalid input" and err.value.message == "n must be at most 3,\\nplease"
    assert gradio_handler(lambda: {"card": "text"}, ("card",))() == "text"
    with pytest.raises(gr.Error, match="KeyError: .*nope") as err:     # a fault: one line too, not an input error
        gradio_handler(lambda: {"nope": "x" * 10_000}, ("card",))()
    assert err.value.title != "Invalid input" and len(err.value.message) < 500


# ---------------------------------------------------------------------------------------------------
# the real server, driven over HTTP
# ---------------------------------------------------------------------------------------------------


def test_server_listens_on_localhost_with_one_sampling_queue_and_no_share_link(server, app):
    demo, client = server
    assert demo.local_url.startswith("http://127.0.0.1:") and demo.share_url is None
    sampling = [fn for fn in demo.fns.values() if fn.api_name in ("generate", "interpolate")]
    assert len(sampling) == 2 and {fn.concurrency_id for fn in sampling} == {"sampling"}
    assert all(fn.concurrency_limit == app.concurrency_limit == 1 for fn in sampling)
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/interpolate", "/model_changed"} <= endpoints


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
    (2, 5000, "steps must be from 1 to 1000, got 5000"),
    (1, "euler", "unknown sampler 'euler'"),
    (4, -5, "seed must be from 0 to"),
    (4, 10**400, "seed must be from 0 to 2147483647, got a number of about 400 digits"),
    (5, 50, "guidance scale must be a number from 0 to 20"),
    (6, "int8", "unknown precision 'int8'"),
    (7, "200-300", "unknown age '200-300'"),
    (0, "../../etc", "unknown model '../../etc'"),
    (0, HUGE_NAME, "unknown model 'mmm"),
])
def test_server_refuses_bad_requests_in_one_short_line(server, position, value, message):
    _, client = server
    args = list(GOOD)
    args[position] = value
    with pytest.raises(AppError) as err:
        client.predict(*args, api_name="/generate")
    text = str(err.value)
    assert message in text and "\n" not in text and len(text) < 400


def post(demo, path: str, body, **headers) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(demo.local_url + "gradio_api/" + path, content=content, timeout=30,
                      headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("path, body, status, words", [
    ("call/nope", {"data": []}, 404, "unknown endpoint: 'nope'"),
    ("run/nope", {"data": [], "session_hash": "s"}, 404, "unknown endpoint"),
    ("queue/join", {"data": [], "fn_index": 999, "session_hash": "s"}, 404, "unknown endpoint: fn_index 999"),
    ("queue/join", {"data": [], "fn_index": "x" * 10_000, "session_hash": "s"}, 404, "unknown endpoint"),
    ("run/predict", {"data": [], "fn_index": -1, "session_hash": "s"}, 404, "unknown endpoint"),
    ("call/generate", {"data": ["x"] * 40}, 422, "generate takes 10 or 11 input values, got 40"),
    ("call/generate", {"data": "x" * 10_000}, 422, "data must be a list"),
    ("call/generate", "{not json", 400, "not JSON"),
    ("call/generate", b"[" * 100_000, 400, "not JSON"),
    ("call/generate", {"data": ["x" * (2 << 20)]}, 413, "request body too large"),
])
def test_server_answers_malformed_calls_with_a_short_client_error(server, path, body, status, words):
    demo, _ = server
    reply = post(demo, path, body)
    assert reply.status_code == status and words in reply.json()["detail"] and len(reply.content) < 300


@pytest.mark.parametrize("path, content_type, most", [
    ("call/generate", "application/json", 1 << 20),
    ("upload", "multipart/form-data; boundary=B", 50 * 2**20 + 2**16),      # a photo of up to 50 MB and its form
    ("component_server/", "multipart/form-data; boundary=B", 4 << 20),    # the mask canvas's pictures
])
def test_server_refuses_a_streamed_body_over_the_limit(server, path, content_type, most):
    demo, _ = server
    assert RequestGuard(None).limit("/gradio_api/" + path) == most

    def chunks():                                       # no Content-Length: the guard counts as it arrives
        yield b'--B\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        for _ in range(most // 65536 + 4):
            yield b"x" * 65536
    reply = httpx.post(demo.local_url + "gradio_api/" + path, content=chunks(), timeout=30,
                       headers={"content-type": content_type})
    # Gradio's own max_file_size (50 MB of file data, plain text) may trip before the guard's body limit (50 MB +
    # the form's 64 KB): which answers first depends on how fast its parser keeps up with the stream
    ours = reply.headers.get("content-type", "").startswith("application/json") and \
        f"too large: at most {most} bytes" in reply.json()["detail"]
    gradios = path == "upload" and "exceeded maximum allowed size" in reply.text
    assert reply.status_code == 413 and (ours or gradios) and len(reply.content) < 300, reply.text[:300]


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
# ddpm-faces serve, in its own process
# ---------------------------------------------------------------------------------------------------
def wait_for_line(process, prefix: str, timeout: float = 180.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return line
        assert line or process.poll() is None, f"the server exited: {process.stderr.read()}"
    raise AssertionError(f"no line starting {prefix!r}")


@pytest.mark.slow
def test_serve_says_where_once_logs_no_requests_and_cleans_up_on_sigterm(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    process = subprocess.Popen([sys.executable, "-m", "ddpm_faces", "serve", "--port", str(port), "--threads", "1"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = wait_for_line(process, "serving on ")
        assert line.strip() == f"serving on http://127.0.0.1:{port}/ (no public link; --share makes one)"
        assert any(scratch.iterdir())                                       # its files are there while it runs
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert client.predict("faces32 (bundled)", "ddpm", 3, 2, 7, api_name="/generate")[-1].startswith("2 faces")
        assert httpx.get(f"http://127.0.0.1:{port}/gradio_api/info").status_code == 200
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert out == "", out                                  # nothing after the address: no line per request
    assert "share=True" not in err and "HTTP" not in err and "Traceback" not in err, err
    assert list(scratch.iterdir()) == []                   # the grid PNGs and Gradio's cache are gone


def test_serve_flags_default_to_localhost_without_share():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    args = build_parser().parse_args(["serve", "--share", "--port", "8000"])
    assert (args.port, args.share) == (8000, True)


@pytest.mark.parametrize("args, words", [
    (["serve", "--checkpoint", "/no/such/run"], "/no/such/run"),
    (["serve", "--port", "70000"], "--port must be from 1 to 65535"),
])
def test_serve_bad_input_is_one_line(capsys, args, words):
    threads = torch.get_num_threads()
    try:
        assert main(args) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_help_lists_serve_without_importing_gradio():
    code = ("import sys; from ddpm_faces.cli import build_parser; parser = build_parser(); "
            "print('gradio' in sys.modules); parser.parse_args(['serve', '--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    first, help_text = out.stdout.split("\n", 1)
    assert first == "False" and out.returncode == 0
    assert "--checkpoint" in help_text and "--share" in help_text and "127.0.0.1" in help_text


def test_stale_server_folders_are_removed_and_uploads_are_bounded(tmp_path):
    """A server killed with kill -9 leaves its scratch folder (uploads included): the next server removes it;
    the uploads a running server keeps are bounded, the oldest going first."""
    import os
    import subprocess
    import sys
    from ddpm_faces.app.serve import SCRATCH_PREFIX, remove_stale_scratch
    from ddpm_faces.io import trim_oldest
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f"{SCRATCH_PREFIX}{dead.pid}-x1", tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-x2"
    for folder in (stale, live):
        (folder / "gradio").mkdir(parents=True)
        (folder / "gradio" / "upload.png").write_bytes(b"x" * 100)
    assert remove_stale_scratch(tmp_path) == [stale] and not stale.exists() and live.exists()
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for i in range(5):
        path = uploads / f"u{i}.png"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1000 + i, 1000 + i))
    assert trim_oldest(uploads, 2500) == 3000
    assert sorted(p.name for p in uploads.iterdir()) == ["u3.png", "u4.png"]


def test_each_tab_is_a_unit_whose_inputs_match_its_handler_and_name_page_components(app):
    import inspect

    import gradio as gr

    from ddpm_faces.app.page import _layout

    with gr.Blocks():
        components = _layout(app)
    kinds = [tab.kind for tab in app.tabs]
    assert kinds == ["generate", "interpolate", "edit"]
    for tab in app.tabs:
        params = inspect.signature(tab.handler).parameters.values()
        positional = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert len(positional) == len(tab.inputs), (tab.kind, [p.name for p in positional], tab.inputs)
        assert any(p.kind == p.VAR_POSITIONAL for p in params) and "token" in inspect.signature(tab.handler).parameters
        missing = [name for name in (*tab.inputs, *tab.outputs) if name not in components]
        assert not missing, (tab.kind, missing)


def test_the_gradio_internals_the_page_relies_on_exist_in_the_installed_gradio(app):
    """The two places the app reaches past Gradio's public API are wrapped (serve.quiet_queue, page.mask_canvas);
    this fails when the installed Gradio no longer has what they set, rather than the settings silently
    doing nothing."""
    import gradio as gr

    from ddpm_faces.app.page import build_page
    from ddpm_faces.app.serve import QUEUE_POLL, quiet_queue

    demo = build_page(app)
    quiet_queue(demo)
    assert demo._queue.sleep_when_free == QUEUE_POLL and demo._queue.progress_update_sleep_when_free >= 0.1
    with gr.Blocks():
        editor = gr.ImageEditor()
    assert isinstance(editor.blob_storage, dict) and callable(editor.accept_blobs)
