"""The "Edit a photo" tab as a unit, plain Python: PhotoEditor, built on the FaceApp it belongs to (whose
request checks, pipelines, jobs and folders it uses), with its inputs and outputs by name. The photo is put
on the painting canvas, and the edit itself, one SamplingRequest and one EditRequest (pipeline/) run as a Job
like Generate's (worker thread, stop flag, live previews, "Stopped." on Cancel, the same concurrency limit).

    canvas = app.editor.canvas(photo)                 # {"edit_canvas": the photo to paint on}
    *_, last = app.editor.edit(model, photo, layers, 0.8, "dpmpp-2m", 20, 4, 0, 1.0, "fp32", False, True, "any")
    last["edit_gallery"], last["edit_files"], last["edit_command"]

`photo` is the photo input's value (Gradio's FileData dict, or from Python a path); `layers` the painted
layers (FileData dicts, the PNG bytes the browser's editor sent ahead, or paths; None or [] for no mask).
A pixel is redrawn where a layer, laid over black, is at least half white: the canvas's white brush, or a
black-and-white mask like `ddpm-faces edit --mask`.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

from ..images import to_model_range
from ..errors import UserError
from ..evaluation.attributes import keep_photo_attributes
from ..photos.framing import MAX_BYTES, MAX_PIXELS, Framing, frame_mask, frame_photo, open_photo
from ..images import EDITED, enlarge, make_grid, provenance, save_image
from ..pipeline import EditPlan, EditRequest, generate, stage_steps
from ..io import trim_oldest
from ..runs import model_name
from . import outputs as out
from .inputs import check_bool, check_number, open_upload, quote, upload_name, upload_source
from .job import Cancelled, Job

if TYPE_CHECKING:
    from .handlers import FaceApp

CANVAS_PX = 512                  # the painting canvas's longer side (the strokes are stretched to the photo's)
MAX_SCRATCH_BYTES = 256 * 2**20          # the server's uploads and pictures kept at once (oldest go first)
MAX_LAYERS = 4                   # painted layers one request may send
FRAMED = "photo (framed)"        # the caption of the framed photo, first in the gallery
MASK_FILE = "mask.png"           # the painted mask (the photo's size) as --mask takes it, offered beside the picture
LOST_CANVAS = object()           # what the page hands over for a canvas the browser named but never sent


@dataclass
class Photo:
    image: Image.Image           # RGB, EXIF rotation applied
    name: str                    # the client's file name, as the command line names it


def read_photo(value) -> Photo:
    """The uploaded photo, checked (bytes, format, pixels) before it is decoded."""
    if value is None:
        raise UserError(f"upload a photo first (JPEG, PNG or WebP, up to {MAX_BYTES // 2**20} MB and "
                        f"{MAX_PIXELS // 10**6} megapixels)")
    name = upload_name(value)
    source = upload_source(value, "the photo")
    if isinstance(source, bytes):
        raise UserError(f"the photo must be an uploaded file, got {quote(source)}")
    open_upload(source, f"the photo {name!r}").close()
    return Photo(open_photo(source, name=name), name)


def painted_mask(layers, photo_size: tuple[int, int]) -> np.ndarray | None:
    """Where the layers are painted, (H, W) bool at the photo's size, or None when nothing is."""
    if layers is None:
        return None
    if layers is LOST_CANVAS:
        raise UserError("the painted canvas did not reach the server (was the photo still loading onto it?): "
                        "click Edit again")
    if not isinstance(layers, (list, tuple)) or len(layers) > MAX_LAYERS:
        raise UserError(f"the painted mask must be a list of at most {MAX_LAYERS} layers, got {quote(layers)}")
    pw, ph = photo_size
    painted = np.zeros((ph, pw), dtype=bool)
    for i, layer in enumerate(layers):
        what = f"the painted mask (layer {i})"
        with open_upload(upload_source(layer, what), what) as img:
            if abs(img.width * ph - img.height * pw) > max(pw, ph):
                raise UserError(f"{what} is {img.width}x{img.height} but the photo is {pw}x{ph}: paint on the "
                                "photo itself")
            try:
                rgba = ImageOps.exif_transpose(img).convert("RGBA")
            except (OSError, ValueError, SyntaxError):
                raise UserError(f"{what} cannot be decoded (a damaged or cut-off file?)") from None
        over_black = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L")
        white = over_black.point(lambda v: 255 if v >= 128 else 0).resize(photo_size, Image.NEAREST)
        painted |= np.asarray(white) > 127
    return painted if painted.any() else None


def framed_mask(painted: np.ndarray | None, framing: Framing, size: int) -> torch.Tensor | None:
    """The painted region taken down to the photo's framing as `ddpm-faces edit --mask` takes it (the crop
    box, a nearest resize to the model's size): (1, 1, S, S) of 0/1, or None when nothing is painted."""
    if painted is None:
        return None
    mask = torch.from_numpy(frame_mask(painted, framing, size))[None, None]
    if not mask.any():
        raise UserError("the painted region lies outside the face's square (the part of the photo that is "
                        "edited): paint on the face")
    return mask


def edit_command(entry, photo: Photo, edit: EditRequest, detect: bool, request, scale: int) -> str:
    """The `ddpm-faces edit` line that writes the same picture (the framed photo, then the edits); its last
    word is the picture's file name."""
    flags = " ".join(f for f in (f"--checkpoint {entry.cli_checkpoint}" if entry.cli_checkpoint else "",
                                 f"--image {shlex.quote(photo.name)}", edit.cli_flags(MASK_FILE),
                                 "" if detect else "--no-detect", request.cli_flags()) if f)
    return f"ddpm-faces edit {flags} --compare --upscale {scale} --out edited-seed{request.seed}.png"


def edit_status(request, strength: float, steps_run: int, invert: bool, mask: bool, faces: int, seconds: float,
                conditional: bool, kept: dict | None = None) -> str:
    r, kept = request, kept or {}
    how = ([f"strength {strength:g}: {steps_run} of {r.steps} {r.sampler} steps"]
           + (["DDIM inversion"] if invert else []) + (["inpainting the painted region"] if mask else [])
           + [f"{k} {v}" + (" (the photo's, kept)" if k in kept else "") for k, v in r.attributes.items()]
           + ([f"guidance {r.guidance:g}"] if conditional else [])
           + [r.precision])
    found = f"; {faces} faces found, the largest edited" if faces > 1 else ""
    return f"{r.num} edit{'s' if r.num > 1 else ''} of the photo in {seconds:.2f} s ({', '.join(how)}){found}"


@dataclass
class PhotoEdit:
    """One edit of the tab, prepared: what it runs and what its outputs show."""
    entry: object
    pipe: object
    request: object
    edit: EditRequest
    plan: EditPlan
    picture: Photo
    framing: Framing
    painted: np.ndarray | None
    detect: bool
    kept: dict
    steps_run: int

    @property
    def size(self) -> int:
        return self.pipe.codec.image_size

    @property
    def scale(self) -> int:
        return out.display_scale(self.size)

    @property
    def framed(self) -> np.ndarray:
        """The framed photo at the output's size."""
        return enlarge(self.framing.image[None], self.size)[0]

    @property
    def before(self) -> tuple:
        return out.enlarge(self.framed, self.scale), FRAMED


class PhotoEditor:
    """The "Edit a photo" tab: `edit` reads the components INPUTS names, in that order (then the attribute
    dropdowns and the session's job token), and yields the outputs OUTPUTS names; `canvas` puts an uploaded
    photo on the painting canvas."""

    kind = "edit"                     # its API name, job kind and request checks (FaceApp.request)
    INPUTS = ("model", "edit_photo", "edit_canvas", "edit_strength", "edit_sampler", "edit_steps", "edit_num",
              "edit_seed", "guidance", "precision", "edit_invert", "edit_detect")
    OUTPUTS = out.EDIT_OUTPUTS

    def __init__(self, app: FaceApp):
        self.app = app

    def canvas(self, photo) -> dict:
        """The photo on the painting canvas (EXIF rotation applied, its longer side CANVAS_PX), or an empty
        canvas when the photo is cleared."""
        if photo is None:
            return {"edit_canvas": None}
        image = read_photo(photo).image
        scale = CANVAS_PX / max(image.size)
        canvas = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                              Image.BICUBIC)
        path = str(save_image(np.asarray(canvas), out.new_folder(self.app.out_dir) / "photo.png"))
        return {"edit_canvas": {"background": path, "layers": [], "composite": path}}

    def edit(self, model, photo, layers, strength, sampler, steps, num, seed, guidance=1.0, precision="auto",
             invert=False, detect=True, *attributes, token: str | None = None):
        """Yields outputs by name (out.EDIT_OUTPUTS): the framed photo at once, the current estimates every
        few steps, then the framed photo and the edits side by side, the PNG of them (with the command, the
        model and "edited" in its text chunks; and the mask PNG when a region was painted), the command
        line and the status."""
        app, started = self.app, []
        if app.scratch is not None:               # uploads accumulate there: the oldest go beyond the bound
            trim_oldest(app.scratch, MAX_SCRATCH_BYTES)

        def stop_inverting():                     # Cancel also stops the DDIM inversion, between its steps
            if started and started[0].stop.is_set():
                raise Cancelled()

        e = self.prepare(model, photo, layers, strength, sampler, steps, num, seed, guidance, precision, invert,
                         detect, attributes, stop_inverting)
        yield {"edit_preview": None, "edit_gallery": [e.before], "edit_files": None, "edit_command": "",
               "edit_status": f"Inverting the photo ({e.steps_run} DDIM steps) ..." if e.edit.invert and e.steps_run
               else "Editing ..."}

        def show(event) -> dict:
            return {"edit_preview": out.enlarge(make_grid(enlarge(event.images, e.size)), e.scale),
                    "edit_status": out.preview_status(event.step, e.steps_run)}

        def work(callback):
            done = [0]

            def counted(i, t, x_i, x0):                 # one count over every stage's steps
                callback(done[0] % max(e.steps_run, 1), t, x_i, x0)
                done[0] += 1
            return generate(e.pipe, e.request, plan=e.plan, callback=counted, progress=False)

        start = time.perf_counter()
        started.append(app.jobs.start(Job(self.kind, e.steps_run, work, threads=app.threads), token))
        images = yield from app.follow(started[0], show, "edit_status")
        if images is not None:
            yield self.results(e, images, time.perf_counter() - start)

    def prepare(self, model, photo, layers, strength, sampler, steps, num, seed, guidance, precision, invert, detect,
                attributes, stop_inverting) -> PhotoEdit:
        """The inputs checked, the photo read and framed, the painted mask taken down to the framing, and the
        request, the EditRequest and its plan (the photo's own attributes kept for those not asked for)."""
        entry, pipe, request = self.app.request(model, sampler, steps, num, seed, guidance, precision, attributes,
                                                kind=self.kind)
        strength = round(check_number(strength, "strength", 0, 1, " (0 = the photo back, 1 = a fresh sample)"), 4)
        invert = check_bool(invert, "keep the person (DDIM inversion)")
        detect = check_bool(detect, "find the face")
        picture = read_photo(photo)
        first = pipe.stages[0]              # a cascade edits at its stage 1; the later stages upscale the edit
        framing = frame_photo(picture.image, first.codec.image_size, detect=detect)   # errors worded by page.FIXES
        painted = painted_mask(layers, picture.image.size)
        edit = EditRequest(strength=strength, invert=invert, mask=framed_mask(painted, framing, first.codec.image_size))
        plan = EditPlan(first, to_model_range(torch.from_numpy(framing.image.copy())[None]), edit,
                        seed=request.seed, between_steps=stop_inverting)
        request, kept = keep_photo_attributes(request.replace(unasked="photo"), first.cfg.model.vocab, framing.image)
        if edit.one_face(request):                 # every seed gives the same face: draw it once
            request = request.replace(num=1)
        steps_run = len(plan.timesteps(request.steps, request.timestep_spacing)) + sum(stage_steps(pipe, request)[1:])
        return PhotoEdit(entry, pipe, request, edit, plan, picture, framing, painted, detect, kept, steps_run)

    def results(self, e: PhotoEdit, images, seconds: float) -> dict:
        """The last outputs: the photo and its edits in one PNG (and the painted mask), the gallery, the command
        that writes the same picture, and the status."""
        masked = e.edit.mask is not None
        command = edit_command(e.entry, e.picture, e.edit, e.detect, e.request, e.scale)
        folder, both = out.new_folder(self.app.out_dir), np.concatenate([e.framed[None], images])
        path = save_image(make_grid(both, nrow=len(both)), folder / command.rsplit(" ", 1)[1], upscale=e.scale,
                          text=provenance(command, model_name(e.pipe.source), e.pipe.step, note=EDITED))
        files = [path] + ([save_image(e.painted.astype(np.uint8) * 255, folder / MASK_FILE)] if masked else [])
        return {"edit_preview": str(path), "edit_files": [str(f) for f in files],
                "edit_gallery": [e.before] + [(out.enlarge(img, e.scale), f"seed {e.request.seed} · edit {i}")
                                              for i, img in enumerate(images)],
                "edit_command": f"This picture again: `{command}`"
                                + (f"  \n(`{MASK_FILE}` is the painted mask, offered beside the picture)" if masked
                                   else ""),
                "edit_status": edit_status(e.request, e.edit.strength, e.steps_run, e.edit.invert, masked,
                                           e.framing.faces, seconds, e.pipe.conditional, e.kept)}
