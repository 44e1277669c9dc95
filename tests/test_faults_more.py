"""More faults, each through its real mechanism: files named by a server path (a real `ddpm-faces serve` and its
log), a model folder whose name is not UTF-8, the server's output pipe closed by its reader (`serve | head -1`),
an address the server cannot listen on, output names longer than a file system allows, and latent builds cut
short (an exception, Ctrl-C, kill -9)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port, stop_process
from ddpm_faces.cli import main

pytestmark = pytest.mark.slow          # the integration tier (real servers, pipes and killed builders): `make test-fast` leaves it out

PYTHON = sys.executable
FILE = {"_type": "gradio.FileData"}


def server_env(tmp_path: Path) -> dict:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    return env


def wait_until_serving(process: subprocess.Popen, port: int, log: Path, timeout: float = 120) -> None:
    """Until the server's page answers (its address line may have gone nowhere)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert process.poll() is None, f"the server exited ({process.returncode}): {log.read_text()[-2000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not come up: {log.read_text()[-2000:]}")


stop = stop_process


# ---------------------------------------------------------------------------------------------------
# a file named by a path on the server
# ---------------------------------------------------------------------------------------------------
def server_file(path: str) -> dict:
    return {"path": path, "meta": FILE}


def face_photo(path: Path) -> Path:
    pixels = np.full((32, 32, 3), 128, np.uint8)
    pixels[8:24, 8:24] = (200, 160, 140)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.slow
def test_files_named_by_a_server_path_are_refused_in_one_line_and_log_no_traceback(tmp_path, unconditional_model):
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as err:
        process = subprocess.Popen([PYTHON, "-m", "ddpm_faces", "serve", "--port", str(port), "--threads", "1",
                                    "--checkpoint", str(unconditional_model)], cwd=tmp_path, env=server_env(tmp_path),
                                   stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until_serving(process, port, log)
        api = f"http://127.0.0.1:{port}/gradio_api/"
        endpoints = httpx.get(api + "info").json()["named_endpoints"]
        edit = [p.get("parameter_default") for p in endpoints["/edit"]["parameters"]]
        generate = [p.get("parameter_default") for p in endpoints["/generate"]["parameters"]]
        edit[0] = generate[0] = str(unconditional_model)
        edit[5:7], edit[11] = [1, 1], False                          # 1 step, 1 face, the photo's centre square
        config = httpx.get(f"http://127.0.0.1:{port}/config").json()
        edit_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "edit")
        with open(face_photo(tmp_path / "face.png"), "rb") as photo:
            (uploaded,) = httpx.post(api + "upload", files={"files": ("face.png", photo, "image/png")}).json()
        escape = str(Path(uploaded).parent) + "/.." * 12 + "/etc/passwd"           # inside the uploads, then out

        def edit_of(path):
            return [*edit[:1], server_file(path), *edit[2:]]
        refusals = [
            ("call/edit", {"data": edit_of("/etc/passwd")}),
            ("call/edit", {"data": edit_of(escape)}),
            ("queue/join", {"data": edit_of("/etc/hostname"), "fn_index": edit_index, "session_hash": "s1"}),
            ("call/generate", {"data": [server_file("/etc/passwd"), *generate[1:]]}),   # not even a file input
        ]
        for route, body in refusals:
            reply = httpx.post(api + route, json=body, timeout=30)
            assert reply.status_code == 422, (route, reply.text)
            assert "a file must be uploaded first (POST gradio_api/upload), not named by" in reply.json()["detail"]
            assert len(reply.content) < 300

        reply = httpx.post(api + "call/edit", json={"data": edit_of(uploaded)}, timeout=30)    # an upload: taken
        assert reply.status_code == 200, reply.text
        events = httpx.get(api + f"call/edit/{reply.json()['event_id']}", timeout=120).text
        assert "event: complete" in events and "uploaded" not in events, events[-500:]
    finally:
        assert stop(process) == 0, log.read_text()[-2000:]
    lines = log.read_text().splitlines()
    assert not any("Traceback" in line for line in lines), "\n".join(lines[-40:])
    assert len([line for line in lines if "passwd" in line or "hostname" in line]) <= len(refusals)


def test_a_path_outside_the_uploads_is_refused_by_the_guard_itself(tmp_path, monkeypatch):
    """The guard's rule, on its own: inside the upload folder (links followed) and a file; dotfiles under the
    working folder are Gradio's refusal too, so they are the guard's."""
    from ddpm_faces.app.guard import Refused, check_uploaded

    uploads = tmp_path / "gradio"
    (uploads / "abc").mkdir(parents=True)
    good = uploads / "abc" / "face.png"
    good.write_bytes(b"png")
    (uploads / "abc" / "out").symlink_to("/etc")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    monkeypatch.chdir(tmp_path)
    check_uploaded(None, {"photo": server_file(str(good)), "other": [1, "x"]})
    for path, words in [("/etc/passwd", "must be uploaded first"),
                        (str(uploads / "abc" / "out" / "passwd"), "must be uploaded first"),    # a link out
                        (str(uploads / "abc/../../x.png"), "must be uploaded first"),
                        (str(uploads), "must be uploaded first"),
                        ("a\x00b", "must be uploaded first"),
                        (7, "must be uploaded first"),
                        (str(uploads / "abc" / "gone.png"), "is no longer on the server: upload it again")]:
        with pytest.raises(Refused) as refused:
            check_uploaded(None, [None, {"nested": server_file(path)}])
        assert refused.value.status == 422 and words in str(refused.value), path
    hidden = uploads / "abc" / ".face.png"
    hidden.write_bytes(b"png")
    with pytest.raises(Refused):
        check_uploaded(None, server_file(str(hidden)))


# ---------------------------------------------------------------------------------------------------
# a model folder whose name is not UTF-8
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def foreign_model(tmp_path, unconditional_model) -> str:
    """A copy of the tiny export in a folder named with a byte that is not UTF-8 (as another system might)."""
    folder = os.fsdecode(os.fsencode(str(tmp_path)) + b"/model-\xff")
    shutil.copytree(unconditional_model, folder)
    return folder


def test_a_model_folder_whose_name_is_not_utf8_samples_and_the_png_records_its_bytes(tmp_path, foreign_model):
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/faces-\xfe.png")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"}   # a terminal's strict stdout
    result = subprocess.run([PYTHON, "-m", "ddpm_faces", "sample", "--checkpoint", foreign_model, "--num", "1",
                             "--steps", "2", "--threads", "1", "--no-progress", "--out", out], cwd=tmp_path, env=env,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    assert result.stdout.decode() == f"wrote 1 faces to {tmp_path}/faces-\\xfe.png\n"
    text = Image.open(out).text
    assert text["ddpm-faces model"] == "model-\\xff"
    assert f"--checkpoint {tmp_path}/model-\\udcff " in text["ddpm-faces command"]      # as test_cli spells it


def test_a_model_folder_whose_name_is_not_utf8_is_offered_by_the_web_page(tmp_path, foreign_model, monkeypatch):
    from gradio.routes import ORJSONResponse

    from ddpm_faces.app import FaceApp, build_page
    from ddpm_faces.app.models import model_card
    from ddpm_faces.pipeline import load_pipeline

    monkeypatch.chdir(tmp_path)
    app = FaceApp.from_paths([foreign_model], threads=1)
    try:
        (label,) = app.models
        entry = app.models[label]
        assert label == f"{tmp_path}/model-\\xff" and entry.source == foreign_model
        assert "- **weights**: model-\\xff/" in model_card(entry, load_pipeline(entry.source))
        page = ORJSONResponse._render(build_page(app).get_config_file())    # as the server sends the page
        assert b"model-\\\\xff" in page
    finally:
        app.close()


def test_weights_in_a_folder_whose_name_is_not_utf8_that_cannot_be_read_name_the_reason(foreign_model):
    from ddpm_faces.errors import UserError
    from ddpm_faces.runs import read_codec

    weights = Path(foreign_model) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100])                                    # cut short
    with pytest.raises(UserError, match="model-.*/model.safetensors is not a readable safetensors file"):
        read_codec(weights)
    weights.unlink()
    weights.mkdir()                                                    # a folder where the file should be
    with pytest.raises(UserError, match="cannot read .*/model.safetensors: Is a directory"):
        read_codec(weights)


# ---------------------------------------------------------------------------------------------------
# the server's output closed by its reader; an address it cannot listen on
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("how", ["command", "library"])
def test_serve_keeps_serving_when_the_reader_of_its_output_goes_away(tmp_path, unconditional_model, how):
    """`ddpm-faces serve | head -1`: head reads the first line and exits; the server neither stops nor blames
    the port. `library` is serve() called by a program, without the command line's guarded streams."""
    port, log = free_port(), tmp_path / "server.log"
    command = {"command": ["-m", "ddpm_faces", "serve", "--port", str(port), "--threads", "1", "--checkpoint",
                           str(unconditional_model)],
               "library": ["-c", f"from ddpm_faces.app import serve; "
                                 f"serve([{str(unconditional_model)!r}], port={port}, threads=1)"]}[how]
    with open(log, "w") as err:
        process = subprocess.Popen([PYTHON, *command], cwd=tmp_path, env=server_env(tmp_path),
                                   stdout=subprocess.PIPE, stderr=err)
    try:
        assert process.stdout.readline().startswith(b"models: ")
        process.stdout.close()                                         # the reader is gone
        wait_until_serving(process, port, log)                         # its address line went nowhere: still up
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        code = stop(process)
    text = log.read_text()
    assert code == 0 and "--port" not in text and "Traceback" not in text and "Broken pipe" not in text, text


@pytest.mark.parametrize("host, words", [
    ("127.0.0.1", "port {port} is in use by another program: pick another --port"),
    ("192.0.2.1", "192.0.2.1 is not an address of this machine: pick another --host"),
    ("no-such-host.invalid", "'no-such-host.invalid' is not an address or a known host name"),
])
def test_an_address_the_server_cannot_listen_on_is_named_before_any_model_loads(capsys, host, words,
                                                                                monkeypatch):
    import ddpm_faces.app.handlers as handlers

    monkeypatch.setattr(handlers.FaceApp, "from_paths", classmethod(lambda *a, **k: pytest.fail("loaded models")))
    threads = torch.get_num_threads()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        try:
            assert main(["serve", "--host", host, "--port", str(port)]) == 2
        finally:
            torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot serve on {host}:{port}: ") and words.format(port=port) in err
    assert err.count("\n") == 1 and "Cannot find empty port" not in err and time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------------
# output names longer than a file system allows
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model is loaded (the work a refusal must come before)."""
    import ddpm_faces.pipeline as pipeline

    def loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")
    monkeypatch.setattr(pipeline, "load_pipeline", loading)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("flag, args", [
    ("--save-individual", ["sample", "--out", "{tmp}/grid.png", "--save-individual", "{tmp}/faces/{long}"]),
    ("--json", ["eval", "--json", "{tmp}/{long}.json"]),
    ("--json", ["eval", "--json", "{tmp}/{long}/results.json"]),
    ("--checkpoint", ["sample", "--checkpoint", "{tmp}/{long}", "--out", "{tmp}/grid.png"]),
    ("--strip", ["sample", "--strip", "{tmp}/{long}.png", "--out", "{tmp}/grid.png"]),
    ("--out", ["export", "--checkpoint", "faces32", "--out", "{tmp}/{long}"]),
    ("the source", ["data", "{tmp}/{long}"]),
    ("--cache-dir", ["data", "{tmp}", "--cache-dir", "{tmp}/{long}"]),
    ("--image", ["edit", "--image", "{tmp}/{long}.png"]),
])
def test_an_output_name_too_long_is_refused_before_any_work(tmp_path, capsys, no_loading, threads, flag, args):
    long = "é" * 150                                                   # 150 characters, 300 bytes
    argv = [a.format(tmp=tmp_path, long=long) for a in args]
    start = time.monotonic()
    assert main(argv + (["--num", "1", "--threads", "1"] if argv[0] in ("sample", "eval") else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: a file or folder name in {flag} is 30") and err.count("\n") == 1
    assert "bytes long, more than the 255 a file system allows: use a shorter name" in err
    assert time.monotonic() - start < 2 and not (tmp_path / "faces").exists()


def test_save_individual_into_a_file_is_refused_before_any_work(tmp_path, capsys, no_loading, threads):
    (tmp_path / "taken").write_text("")
    assert main(["sample", "--out", str(tmp_path / "grid.png"), "--save-individual", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == (f"error: cannot write into {tmp_path}/taken: it is a file, not a folder; "
                                       "choose another --save-individual\n")


def test_names_of_up_to_255_bytes_are_written_whole(tmp_path, capsys, unconditional_model, threads):
    """The work files beside an output (a temporary name, then renamed) must not be longer than the output's name
    itself: a legal name of 250 bytes is written, not refused after the sampling."""
    from ddpm_faces.io import atomic_folder, recover_folder
    from ddpm_faces.runs import export_model, find_model
    from conftest import tiny_model

    grid, folder = tmp_path / ("g" * 251 + ".png"), tmp_path / ("f" * 255)
    assert main(["sample", "--checkpoint", str(unconditional_model), "--num", "2", "--steps", "2", "--threads", "1",
                 "--no-progress", "--out", str(grid), "--save-individual", str(folder)]) == 0, capsys.readouterr().err
    assert Image.open(grid).size[0] > 16 and sorted(p.name for p in folder.iterdir()) == [
        "seed0-0000.png", "seed0-0001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([grid.name, folder.name])   # nothing left beside

    export = tmp_path / ("e" * 254)                            # an export replaced: .tmp, then .old, all bounded
    export_model(*tiny_model(), export)
    export_model(*tiny_model(seed=1), export)
    assert find_model(export).weights.is_file() and len(list(tmp_path.iterdir())) == 3
    with pytest.raises(RuntimeError):
        with atomic_folder(export) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("cut short")
    assert len(list(tmp_path.iterdir())) == 3 and not recover_folder(export)


def test_a_json_name_of_255_bytes_passes_the_check_before_an_evaluation(tmp_path):
    from ddpm_faces.cli import check_json_path

    out = tmp_path / ("j" * 250 + ".json")                     # 255 bytes: legal, and the probe must be too
    check_json_path(str(out))
    assert list(tmp_path.iterdir()) == []                      # the probe is gone, and the file is not made yet


# ---------------------------------------------------------------------------------------------------
# latent builds cut short
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def prepared(tmp_path, face_folder):
    from ddpm_faces.data import prepare_dataset

    return prepare_dataset(face_folder, 16, cache_dir=tmp_path / "cache", progress=False)


def pool(x):
    """A stand-in codec: 2x2 average pooling."""
    return torch.nn.functional.avg_pool2d(x, 2)


@pytest.mark.parametrize("stop_with", [RuntimeError("the disk went away"), KeyboardInterrupt()])
def test_a_latent_build_cut_short_leaves_no_work_folder(tmp_path, prepared, stop_with):
    from ddpm_faces.data.latents import encode_latents, latent_folder

    calls = []

    def encode(x):
        calls.append(len(x))
        if len(calls) > 3:                                     # a shape probe and a batch, then the cut
            assert list(latent_folder(prepared, "k" * 16, tmp_path / "cache").parent.glob("*.tmp")), \
                "no work folder while encoding"
            raise stop_with
        return pool(x)
    with pytest.raises(type(stop_with)):
        encode_latents(prepared, encode, "k" * 16, cache_dir=tmp_path / "cache", batch_size=4, progress=False)
    root = tmp_path / "cache" / "latents"
    assert sorted(p.suffix for p in root.iterdir()) == [".lock"]             # no .tmp, no half-built folder
    again = encode_latents(prepared, pool, "k" * 16, cache_dir=tmp_path / "cache", batch_size=4, progress=False)
    assert again.latents.shape[1] == len(prepared)


BUILDER = """
import sys, time, torch
from ddpm_faces.data import prepare_dataset
from ddpm_faces.data.latents import encode_latents
data = prepare_dataset(sys.argv[1], 16, cache_dir=sys.argv[2], progress=False)
calls = []
def encode(x):
    calls.append(1)
    if len(calls) > 2:
        time.sleep(600)                                    # stuck mid-build, its work folder half written
    return torch.nn.functional.avg_pool2d(x, 2)
encode_latents(data, encode, "a" * 16, cache_dir=sys.argv[2], batch_size=4, progress=False)
"""


def test_the_work_folder_of_a_killed_latent_build_is_removed_by_the_next_build(tmp_path, face_folder, prepared,
                                                                               caplog):
    """kill -9 mid-build leaves `<name>.tmp` (what held 363 MB for a real data set): a later build in the same
    cache removes it, even for another autoencoder's key; while its builder lives, it is left alone."""
    from ddpm_faces.data.latents import encode_latents

    cache, root = tmp_path / "cache", tmp_path / "cache" / "latents"
    builder = subprocess.Popen([PYTHON, "-c", BUILDER, str(face_folder), str(cache)], stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (root.is_dir() and list(root.glob("*.tmp"))):
            assert builder.poll() is None, builder.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the builder made no work folder"
            time.sleep(0.1)
        (work,) = root.glob("*.tmp")
        assert work.name.endswith("-" + "a" * 16 + ".tmp")
        encode_latents(prepared, pool, "b" * 16, cache_dir=cache, progress=False)    # another key, builder alive
        assert work.is_dir()
        builder.send_signal(signal.SIGKILL)
        builder.wait(timeout=30)
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait()
    assert work.is_dir()                                                # kill -9: nothing cleaned up
    with caplog.at_level("INFO", logger="ddpm_faces.data"):
        built = encode_latents(prepared, pool, "c" * 16, cache_dir=cache, progress=False)
    assert not work.exists() and built.latents.shape[1] == len(prepared)
    assert not list(root.glob("*.tmp")) and not list(root.glob("*.old"))
    assert any(work.name in r.getMessage() for r in caplog.records)


def test_a_latent_replacement_cut_between_its_renames_is_finished_not_thrown_away(tmp_path, prepared):
    """A build killed after its work folder was complete and the old folder moved aside (`.old`, no final
    folder): the next build in the cache puts the complete one in place instead of deleting both."""
    from ddpm_faces.data.latents import encode_latents, latent_folder

    cache = tmp_path / "cache"
    first = encode_latents(prepared, pool, "d" * 16, cache_dir=cache, progress=False)
    folder = latent_folder(prepared, "d" * 16, cache)
    expected = np.array(first.latents)
    del first
    shutil.copytree(folder, folder.with_name(folder.name + ".tmp"))
    os.rename(folder, folder.with_name(folder.name + ".old"))          # the kill came between the two renames
    encode_latents(prepared, pool, "e" * 16, cache_dir=cache, progress=False)     # any build in the cache
    assert folder.is_dir() and np.array_equal(np.load(folder / "latents.npy"), expected)
    assert not folder.with_name(folder.name + ".tmp").exists() and not folder.with_name(folder.name + ".old").exists()
    assert json.loads((folder / "meta.json").read_text())["key"] == "d" * 16

    shutil.copytree(folder, folder.with_name(folder.name + ".tmp"))    # the same cut, found by its own key's build
    os.rename(folder, folder.with_name(folder.name + ".old"))

    def encode(x):                                     # the shape probe (one image) only
        assert len(x) == 1, "encoded again instead of finishing the cut replacement"
        return pool(x)
    again = encode_latents(prepared, encode, "d" * 16, cache_dir=cache, progress=False)
    assert np.array_equal(np.array(again.latents), expected) and sorted(p.name for p in folder.parent.iterdir()) == \
        sorted([folder.name, folder.name + ".lock", f"{prepared.root.name}-{'e' * 16}",
                f"{prepared.root.name}-{'e' * 16}.lock"])
