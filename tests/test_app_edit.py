"""The web app's "Edit a photo" tab: the handlers without a server (the painted mask, the canvas, Cancel), then
a real server on a free localhost port driven by gradio_client and plain HTTP: edited faces come back after
the framed photo, the picture's PNG says what made it and the printed `ddpm-faces edit` line writes the same
picture, an inpainting request keeps the unpainted part of the face's square exactly, and bad uploads get
one-line errors."""
from __future__ import annotations

import http.client
import io
import json
import shlex
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import SHARED_DATA, draw_face
from ddpm_faces.app import MAX_IMAGES, FaceApp
from ddpm_faces.app.edit import CANVAS_PX, FRAMED, LOST_CANVAS, painted_mask
from ddpm_faces.app.guard import RequestGuard
from ddpm_faces.app.outputs import STOPPED
from ddpm_faces.app.page import KEEP_CANVASES, keep_newest, layer_index_ok, painted_layers
from ddpm_faces.cli import main
from ddpm_faces.errors import UserError
from ddpm_faces.photos.framing import frame_photo, open_photo
from ddpm_faces.images import EDITED

pytestmark = pytest.mark.slow          # the integration tier (real servers and edits through them): `make test-fast` leaves it out

MODEL = "faces32 (bundled)"              # how the page names the bundled 32 px model
LATENT = "latent128 (bundled)"           # and the bundled 128 px latent one
SCALE = 4                        # the bundled model's 32 px faces are shown 4x
REAL_FACE = SHARED_DATA / "faces" / "fairface_train-1.jpg"


def edit_args(photo, mask=None, *, strength=0.6, sampler="ddim", steps=10, num=2, seed=5, guidance=1.0,
              precision="fp32", invert=False, detect=False, attributes=("any", "any", "any"), model=MODEL) -> list:
    """The edit endpoint's inputs, in the page's order."""
    return [model, photo, mask, strength, sampler, steps, num, seed, guidance, precision, invert, detect,
            *attributes]


def layer(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> Path:
    """A painted layer like the canvas sends: transparent, white where `box` (left, top, right, bottom) is."""
    pixels = np.zeros((size[1], size[0], 4), np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 255
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Pictures the tests draw: a face-like blob at 96 px, a wide one, a file that is no image, a PNG of too many
    pixels (small in bytes)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    Image.fromarray(draw_face(rng, 96)).save(root / "face.png")
    Image.fromarray(np.concatenate([draw_face(rng, 96), draw_face(rng, 96)], axis=1)).save(root / "wide.png")
    (root / "notes.png").write_text("not a picture\n")
    Image.new("1", (8000, 5001)).save(root / "huge.png")
    return {p.stem: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def app():
    with tempfile.TemporaryDirectory() as no_runs:
        app = FaceApp.from_paths(None, runs_dir=no_runs, threads=1)
    yield app
    app.close()


def outputs(stream) -> list[dict]:
    return [out for out in stream if out]


def unscaled(image: np.ndarray) -> np.ndarray:
    return image[::SCALE, ::SCALE]


# ---------------------------------------------------------------------------------------------------
# without a server
# ---------------------------------------------------------------------------------------------------
def test_painted_mask_is_white_over_black_at_the_photos_size(tmp_path):
    strokes = layer(tmp_path / "strokes.png", (48, 24), (0, 0, 12, 24))            # half the photo's size
    assert painted_mask([str(strokes)], (96, 48)).sum() == 24 * 48                  # stretched to the photo
    Image.fromarray(np.full((48, 96, 4), (0, 0, 0, 255), np.uint8)).save(tmp_path / "black.png")
    assert painted_mask([str(tmp_path / "black.png")], (96, 48)) is None            # opaque black: keep
    faint = np.zeros((48, 96, 4), np.uint8)
    faint[:, :10] = (255, 255, 255, 100)                                            # under half white: keep
    faint[:, 10:20] = (255, 255, 255, 200)
    Image.fromarray(faint).save(tmp_path / "faint.png")
    assert painted_mask([str(tmp_path / "faint.png")], (96, 48)).sum() == 10 * 48
    plain = np.zeros((48, 96), np.uint8)                                            # a black-and-white mask
    plain[:, 90:] = 255
    Image.fromarray(plain).save(tmp_path / "plain.png")
    assert painted_mask([str(tmp_path / "plain.png"), str(strokes)], (96, 48)).sum() == (6 + 24) * 48
    assert painted_mask([], (96, 48)) is None and painted_mask(None, (96, 48)) is None


def test_canvas_holds_the_photo_upright_at_canvas_size(app, tmp_path):
    sideways = Image.fromarray(draw_face(np.random.default_rng(0), 100)).resize((200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6                                                                # "rotate 90° to view"
    sideways.save(tmp_path / "phone.jpg", exif=exif)
    canvas = app.editor.canvas(str(tmp_path / "phone.jpg"))["edit_canvas"]
    assert Image.open(canvas["background"]).size == (CANVAS_PX // 2, CANVAS_PX) and canvas["layers"] == []
    assert app.editor.canvas(None) == {"edit_canvas": None}


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_canvas_the_browser_sent_ahead_is_taken_once(app, photos):
    """The browser sends the canvas's pictures ahead and names them by an id: the page takes them out of the
    component's store (a stand-in here) and hands the layers' PNG bytes to the handler."""
    strokes = np.zeros((CANVAS_PX, CANVAS_PX, 4), np.uint8)
    strokes[:, : CANVAS_PX // 2] = 255                                              # the left half
    sent = SimpleNamespace(background=b"photo", composite=b"both", layers=[png_bytes(strokes), None])
    canvas = SimpleNamespace(blob_storage={"mine": sent})
    layers = painted_layers(canvas, {"id": "mine", "background": None, "layers": [], "composite": None})
    assert layers == [sent.layers[0]] and painted_layers(canvas, {"id": "mine"}) is LOST_CANVAS
    final = outputs(app.editor.edit(*edit_args(str(photos["face"]), layers, strength=1.0, num=1)))[-1]
    framed, edit = (unscaled(face) for face, _ in final["edit_gallery"])
    assert np.array_equal(edit[:, 16:], framed[:, 16:]) and not np.array_equal(edit[:, :16], framed[:, :16])
    with pytest.raises(UserError, match="upload a photo first"):                    # the photo's error first
        next(app.editor.edit(*edit_args(None, LOST_CANVAS)))
    with pytest.raises(UserError, match="the painted canvas did not reach the server"):
        next(app.editor.edit(*edit_args(str(photos["face"]), LOST_CANVAS)))
    api = {"background": None, "layers": [{"path": "a.png"}], "composite": None}
    assert painted_layers(canvas, api) == [{"path": "a.png"}] and painted_layers(canvas, None) is None


def test_the_store_of_canvases_sent_ahead_stays_small():
    store = {f"page{i}": i for i in range(KEEP_CANVASES + 5)}
    keep_newest(store, KEEP_CANVASES)
    assert list(store) == [f"page{i}" for i in range(5, KEEP_CANVASES + 5)]
    assert layer_index_ok("layer", "0") and layer_index_ok("background", "null") and layer_index_ok("layer", None)
    assert not layer_index_ok("layer", "4") and not layer_index_ok("layer", "1000000000")
    assert not any(layer_index_ok("layer", index) for index in ("-1", "1e9", "²", "0" * 5000))


def test_strength_zero_gives_the_framed_photo_back(app, photos):
    final = outputs(app.editor.edit(*edit_args(str(photos["face"]), strength=0.0, num=1)))[-1]
    (framed, caption), (edit, _) = final["edit_gallery"]
    framing = frame_photo(open_photo(photos["face"]), 32, detect=False)
    assert caption == FRAMED and np.array_equal(unscaled(framed), framing.image)
    assert np.array_equal(edit, framed) and "0 of 10 ddim steps" in final["edit_status"]


def test_the_latent_model_edits_at_128_px_and_keeps_the_unpainted_part(app, photos, tmp_path):
    strokes = layer(tmp_path / "strokes.png", (96, 96), (0, 0, 48, 96))               # the left half
    final = outputs(app.editor.edit(*edit_args(str(photos["face"]), [str(strokes)], strength=1.0, num=1, model=LATENT)))[-1]
    (framed, caption), (edited, _) = final["edit_gallery"]
    framing = frame_photo(open_photo(photos["face"]), 128, detect=False)
    assert caption == FRAMED and framed.shape == (128, 128, 3) and np.array_equal(framed, framing.image)
    assert np.array_equal(edited[:, 64:], framed[:, 64:]) and not np.array_equal(edited[:, :64], framed[:, :64])
    assert "--checkpoint latent128" in final["edit_command"]


def test_cancel_ends_the_edit_with_stopped(app, photos):
    token = app.arm()
    stream = app.editor.edit(*edit_args(str(photos["face"]), strength=1.0, sampler="ddpm", steps=1000, num=MAX_IMAGES),
                      token=token)
    first = next(out for out in stream if out)
    assert first["edit_gallery"][0][1] == FRAMED and first["edit_status"] == "Editing ..."
    next(out for out in stream if "Denoising" in out.get("edit_status", ""))
    app.cancel(token)
    assert outputs(stream)[-1] == {"edit_status": STOPPED}
    assert app.runs[-1].kind == "edit" and app.runs[-1].outcome == "cancelled" and app.runs[-1].steps_done < 1000


# ---------------------------------------------------------------------------------------------------
# the real server
# ---------------------------------------------------------------------------------------------------


def edit(client, photo, mask=None, **settings):
    """(preview, gallery, files, command, status) of one edit through the HTTP API."""
    layers = None if mask is None else {"background": None, "layers": [handle_file(mask)], "composite": None}
    return client.predict(*edit_args(handle_file(photo), layers, **settings), api_name="/edit")


def reproduce(command_text: str, photo: Path, out: Path, mask: str | None = None) -> np.ndarray:
    """Run the printed `ddpm-faces edit` line on the local files; the picture it wrote."""
    args = shlex.split(command_text.split("`")[1])[1:]
    args[args.index("--image") + 1] = str(photo)
    args[args.index("--out") + 1] = str(out)
    if mask is not None:
        args[args.index("--mask") + 1] = mask
    assert main(args + ["--no-progress"]) == 0
    return np.asarray(Image.open(out))


def test_edit_shares_the_sampling_queue(server, app):
    demo, client = server
    sampling = [fn for fn in demo.fns.values() if fn.api_name in ("generate", "interpolate", "edit")]
    assert len(sampling) == 3 and {fn.concurrency_id for fn in sampling} == {"sampling"}
    assert "/edit" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]


def test_server_edits_a_photo_and_the_printed_line_writes_the_same_picture(server, photos, tmp_path):
    _, client = server
    preview, gallery, files, command, status = edit(client, photos["face"], num=3, guidance=2.0,
                                                    attributes=("60-69", "any", "any"))
    assert [item["caption"] for item in gallery] == [FRAMED] + [f"seed 5 · edit {i}" for i in range(3)]
    faces = [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]
    assert all(face.shape == (32 * SCALE, 32 * SCALE, 3) for face in faces)
    framing = frame_photo(open_photo(photos["face"]), 32, detect=False)
    assert np.array_equal(unscaled(faces[0]), framing.image) and not np.array_equal(faces[1], faces[0])
    assert status.startswith("3 edits of the photo in") and "age 60-69" in status and "guidance 2" in status
    assert len(files) == 1 and Path(files[0]).name == "edited-seed5.png" and Path(preview).name == "edited-seed5.png"
    png = Image.open(files[0])
    line = command.split("`")[1]
    assert line.startswith("ddpm-faces edit --checkpoint faces32 --image face.png --strength 0.6 --no-detect --seed 5 "
                           "--num 3")                          # faces32 is no longer the default model
    assert "--age '60-69'" in line and "--guidance 2" in line and line.endswith("--compare --upscale 4 --out "
                                                                                "edited-seed5.png")
    assert png.text["Description"] == EDITED and png.text["ddpm-faces command"] == line
    assert png.text["ddpm-faces step"] == "9000" and "faces32" in png.text["ddpm-faces model"]
    picture = np.asarray(png)
    assert picture.shape == ((32 + 4) * SCALE, (4 * 34 + 2) * SCALE, 3)            # the photo, then 3 edits
    assert np.array_equal(reproduce(command, photos["face"], tmp_path / "again.png"), picture)


def test_inpainting_keeps_the_unpainted_part_of_the_faces_square(server, photos, tmp_path):
    """The wide photo's centre square is edited (no detection); the left half of that square is painted."""
    _, client = server
    mask = layer(tmp_path / "strokes.png", (192, 96), (48, 0, 96, 96))
    _, gallery, files, command, status = edit(client, photos["wide"], mask, strength=1.0, num=2, invert=True)
    faces = [unscaled(np.asarray(Image.open(item["image"]).convert("RGB"))) for item in gallery]
    framed, edits = faces[0], faces[1:]
    for face in edits:
        assert np.array_equal(face[:, 16:], framed[:, 16:])                         # kept exactly
        assert not np.array_equal(face[:, :16], framed[:, :16])                     # redrawn
    assert "DDIM inversion, inpainting the painted region" in status
    painted = np.asarray(Image.open(files[1]))
    assert Path(files[1]).name == "mask.png" and painted.shape == (96, 192)         # the photo's size, 0/255
    assert set(np.unique(painted)) == {0, 255} and painted[:, 48:96].all() and not painted[:, 96:].any()
    line = command.split("`")[1]
    assert "--strength 1 --invert --mask mask.png --no-detect" in line
    again = reproduce(command, photos["wide"], tmp_path / "again.png", mask=files[1])
    assert np.array_equal(again, np.asarray(Image.open(files[0])))


@pytest.mark.skipif(not REAL_FACE.is_file(), reason=f"{REAL_FACE} is not here")
def test_server_finds_the_face_in_a_photo(server, tmp_path):
    _, client = server
    photo = Image.new("RGB", (400, 300), (90, 110, 130))
    photo.paste(Image.open(REAL_FACE).convert("RGB"), (220, 60))                   # a face off-centre
    photo.save(tmp_path / "portrait.jpg", quality=95)
    _, gallery, _, command, status = edit(client, tmp_path / "portrait.jpg", detect=True, num=1)
    framing = frame_photo(open_photo(tmp_path / "portrait.jpg"), 32)
    assert framing.faces == 1 and 200 <= framing.box[0] <= 240
    assert np.array_equal(unscaled(np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))), framing.image)
    assert status.startswith("1 edit of the photo") and "--no-detect" not in command


def send_ahead(demo, canvas_id: str, picture: bytes, index: str = "0") -> httpx.Response:
    """What the browser's canvas does before an edit: post a painted layer to the component's accept_blobs."""
    config = httpx.get(demo.local_url + "config", timeout=30).json()
    component = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "edit-canvas")
    return httpx.post(demo.local_url + "gradio_api/component_server/", timeout=30,
                      data={"id": canvas_id, "type": "layer", "index": index, "component_id": str(component),
                            "session_hash": "test", "fn_name": "accept_blobs"},
                      files={"file": ("layer_0.png", picture, "image/png")})


def test_server_takes_a_canvas_sent_ahead_as_the_browser_sends_it(server, photos):
    demo, client = server
    strokes = np.zeros((CANVAS_PX, CANVAS_PX, 4), np.uint8)
    strokes[: CANVAS_PX // 2] = 255                                                 # the top half
    assert send_ahead(demo, "page-a", png_bytes(strokes)).status_code == 200
    *_, status = client.predict(*edit_args(handle_file(photos["face"]), {"id": "page-a"}, num=1), api_name="/edit")
    assert "inpainting the painted region" in status
    assert send_ahead(demo, "page-b", png_bytes(strokes), index="1000000000").status_code == 200    # ignored
    assert "did not reach the server" in one_line_error(client, edit_args(handle_file(photos["face"]),
                                                                         {"id": "page-b"}))
    for i in range(KEEP_CANVASES + 1):                          # pages that never ask for an edit
        send_ahead(demo, f"idle{i}", png_bytes(strokes[:8, :8]))
    assert "did not reach the server" in one_line_error(client, edit_args(handle_file(photos["face"]),
                                                                         {"id": "idle0"}))


def one_line_error(client, args) -> str:
    with pytest.raises(AppError) as err:
        client.predict(*args, api_name="/edit")
    text = str(err.value)
    assert "\n" not in text and len(text) < 400, text
    return text


@pytest.mark.parametrize("photo, mask, changes, words", [
    ("notes", None, {}, "the photo 'notes.png' is not an image of a known kind: give a JPEG, PNG, WebP"),
    ("huge", None, {}, "the photo 'huge.png' has 8000x5001 pixels, more than 40,000,000: resize it first"),
    ("face", None, {"detect": True}, "no face found in the photo: use a photo with a frontal face, or untick "
                                     "'Find the face'"),
    (None, None, {}, "upload a photo first"),
    ("face", (48, 96), {}, "the painted mask (layer 0) is 48x96 but the photo is 96x96: paint on the photo itself"),
    ("wide", (192, 96), {}, "the painted region lies outside the face's square"),
    ("face", "notes", {}, "the painted mask (layer 0) is not an image of a known kind"),
    ("face", None, {"strength": 1.5}, "strength must be a number from 0 to 1"),
    ("face", None, {"invert": "yes"}, "keep the person (DDIM inversion) must be true or false, got 'yes'"),
    ("face", None, {"num": 17}, "number of faces must be from 1 to 16, got 17"),
])
def test_server_refuses_bad_edits_in_one_line(server, photos, tmp_path, photo, mask, changes, words):
    _, client = server
    if isinstance(mask, tuple):                                  # painted outside the wide photo's centre square
        mask = layer(tmp_path / "strokes.png", mask, (0, 0, 40, 96))
    elif mask is not None:
        mask = photos[mask]
    layers = None if mask is None else {"background": None, "layers": [handle_file(mask)], "composite": None}
    text = one_line_error(client, edit_args(None if photo is None else handle_file(photos[photo]), layers, **changes))
    assert words in text, text


def call(demo, data) -> httpx.Response:
    return httpx.post(demo.local_url + "gradio_api/call/edit", json={"data": data}, timeout=30)


@pytest.mark.parametrize("photo, words", [
    ("/etc/hostname", "Photo: expected an uploaded file (a FileData object), got '/etc/hostname'"),
    ({"path": "https://example.com/me.png", "meta": {"_type": "gradio.FileData"}},
     "Photo: a file must be uploaded first (POST gradio_api/upload), not named by 'https://example.com/me.png'"),
    ({"path": ["x"], "meta": {"_type": "gradio.FileData"}}, "Photo: expected an uploaded file"),
])
def test_server_refuses_files_that_were_not_uploaded(server, photo, words):
    demo, _ = server
    reply = call(demo, edit_args(photo))
    assert reply.status_code == 422 and reply.json()["detail"].startswith(words)


def test_a_path_on_the_server_is_not_read(server):
    demo, _ = server
    reply = call(demo, edit_args({"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}))
    assert reply.status_code == 422                             # refused before Gradio reads (or logs) anything
    assert "must be uploaded first" in reply.json()["detail"] and "/etc/hostname" in reply.json()["detail"]
    assert Path("/etc/hostname").read_text().strip() not in reply.text.replace("/etc/hostname", "")


def test_an_upload_over_the_photo_limit_is_refused_before_it_is_sent(server):
    demo, _ = server
    most = RequestGuard(None).limit("/gradio_api/upload")
    assert most > 50 * 2**20                                    # a photo as large as the command line takes
    port = int(demo.local_url.rstrip("/").rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("POST", "/gradio_api/upload")                        # the headers, and no body
        connection.putheader("Content-Type", "multipart/form-data; boundary=B")
        connection.putheader("Content-Length", str(most + 1))
        connection.endheaders()
        reply = connection.getresponse()
        assert reply.status == 413 and json.loads(reply.read())["detail"].endswith(f"at most {most} bytes")
    finally:
        connection.close()


def test_server_streams_the_edit_and_a_client_cancel_stops_it(server, app, photos):
    _, client = server
    done = len(app.runs)
    job = client.submit(*edit_args(handle_file(photos["face"]), strength=1.0, sampler="ddpm", steps=1000,
                                   num=MAX_IMAGES), api_name="/edit")
    end = time.monotonic() + 60

    def previewed():
        return any(isinstance(out[-1], str) and out[-1].startswith("Denoising") for out in job.outputs())
    while not previewed() and time.monotonic() < end:
        time.sleep(0.05)
    assert previewed(), "no preview was streamed"
    job.cancel()
    while (app.active or len(app.runs) == done) and time.monotonic() < end:
        time.sleep(0.05)
    assert app.runs[-1].kind == "edit" and app.runs[-1].outcome == "cancelled" and app.runs[-1].steps_done < 1000
