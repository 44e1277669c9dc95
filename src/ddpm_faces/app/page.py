"""The page of `ddpm-faces serve`: the gr.Blocks layout and its event wiring.

`gradio_handler` is the one place where a handler's outputs by name become Gradio's positional tuple and a
UserError becomes a Gradio error ("Invalid input"). Sampling events run with preprocess=False: the handlers
check every input themselves, so the HTTP API gets the same one-line errors as the page.

Cancel: each Generate (Interpolate, Edit) click first arms the tab's job token (kept in the session's gr.State),
then runs the handler with it; the Cancel button hands that token to `FaceApp.cancel`, which sets the stop
flag of the job running under it (or of one still queued, which then stops before its first step). The
handler's generator then ends normally with the status "Stopped." (Gradio's `cancels=` is not used: it ends
the generator from outside, and the page could show an error instead).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import traceback
from typing import Callable

import gradio as gr
from gradio.components.base import server

from ..diffusion import SAMPLERS
from .. import errors
from ..errors import UserError
from ..pipeline import DEFAULT_STRENGTH
from ..pipeline import DEFAULT_EDIT_STEPS, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLING_PRECISIONS, SamplingRequest
from . import outputs as out
from .edit import LOST_CANVAS, MAX_LAYERS
from .handlers import FaceApp, Tab
from .inputs import ANY_CHOICE, MAX_GUIDANCE, MAX_IMAGES, MAX_PAGE_SEED, MAX_STEPS, one_line

DEFAULT_NUM = 4
EDIT_HEIGHT = 360                # px: the photo and the canvas to paint on
KEEP_CANVASES = 64               # canvases sent ahead and kept until their edit runs (more than the queue holds)
GALLERY_COLUMNS = 4
INTERPOLATION_SAMPLER = "ddim"   # deterministic: the row changes smoothly from one face to the other
THEME_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]   # local fonts: the page needs no network
CSS = "#faces .grid-wrap, #edits .grid-wrap { min-height: 0 !important; height: auto !important; }"  # fit the faces


# The library names a remedy (errors.py); the web page words it in its own controls, with the error's facts
FIXES = {
    errors.CENTRE_SQUARE: ", or untick 'Find the face' to take its centre square as it is",
    errors.WITHOUT_DETECTOR: ", or untick 'Find the face' to take the photo's centre square",
    errors.OTHER_MODEL: ", or choose another model",
}


def gradio_error(err: Exception) -> gr.Error:
    """The Gradio error a client sees, one short line: "Invalid input" for a UserError (its fix worded for the
    page: FIXES); for anything else (a fault, whose traceback goes to the server's log) its type and message."""
    if isinstance(err, UserError):
        return gr.Error(one_line(err.worded(FIXES)), title="Invalid input", print_exception=False)
    traceback.print_exception(err)
    return gr.Error(one_line(f"{type(err).__name__}: {err}"), print_exception=False)


def positional(outputs: dict, names: tuple[str, ...]) -> tuple | object:
    """A handler's outputs by name as Gradio's tuple in the order of `names`; a name left out: gr.skip()."""
    unknown = set(outputs) - set(names)
    if unknown:
        raise KeyError(f"outputs {sorted(unknown)} are not among {names}")
    values = tuple(outputs[name] if name in outputs else gr.skip() for name in names)
    return values[0] if len(values) == 1 else values or None


def gradio_handler(fn: Callable, names: tuple[str, ...], *, token_last: bool = False) -> Callable:
    """`fn` as Gradio calls it: outputs by name -> positional, UserError (or a fault) -> one-line gr.Error.
    With `token_last`, the last input (the session's job token, a gr.State) is passed as `token=`."""
    def split(args):
        return (args[:-1], {"token": args[-1]}) if token_last else (args, {})

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args):
            args, kwargs = split(args)
            try:
                with contextlib.closing(fn(*args, **kwargs)) as outputs:   # closed by Gradio: the job stops
                    for value in outputs:
                        yield positional(value, names)
            except gr.Error:
                raise
            except Exception as err:
                raise gradio_error(err) from None
        return stream

    @functools.wraps(fn)
    def call(*args):
        args, kwargs = split(args)
        try:
            return positional(fn(*args, **kwargs), names)
        except gr.Error:
            raise
        except Exception as err:
            raise gradio_error(err) from None
    return call


def _controls(app: FaceApp, c: dict) -> None:
    """The left column: model, guidance, precision, attributes, model card."""
    m = app.models[app.default].cfg.model
    c["model"] = gr.Dropdown(list(app.models), value=app.default, label="Model", elem_id="model")
    c["guidance"] = gr.Slider(0, MAX_GUIDANCE, value=SamplingRequest().guidance, step=0.5, label="Guidance scale",
                              info="1 = plain conditional; larger = attributes more strongly. Attributes left at "
                                   "'any' are drawn for each face from the training data's frequencies",
                              visible=bool(m.attributes), elem_id="guidance")
    c["precision"] = gr.Dropdown(list(SAMPLING_PRECISIONS), value="auto", label="Precision",
                                 info="auto: bf16 where the CPU or GPU has bf16 units (AMX, AVX512-BF16), else "
                                      "fp32; bf16 without them is many times slower", elem_id="precision")
    for name in app.attribute_names:
        values = m.vocab[name] if name in m.attributes else []
        c[f"attribute_{name}"] = gr.Dropdown([ANY_CHOICE, *values], value=ANY_CHOICE, label=name.capitalize(),
                                             visible=name in m.attributes, elem_id=f"attr-{name}")
    with gr.Accordion("Model card", open=True):
        c["card"] = gr.Markdown(app.card(app.default), elem_id="model-card")


def _generate_tab(c: dict, most: int) -> None:
    with gr.Row():
        c["sampler"] = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
        c["steps"] = gr.Slider(1, most, value=min(DEFAULT_STEPS, most), step=1, label="Steps", elem_id="steps")
        c["num"] = gr.Slider(1, MAX_IMAGES, value=DEFAULT_NUM, step=1, label="Number of images")
    with gr.Row():
        c["seed"] = gr.Number(0, precision=0, minimum=0, maximum=MAX_PAGE_SEED, label="Seed")
        c["randomize"] = gr.Button("Random seed", scale=0)
    with gr.Row():
        c["run"] = gr.Button("Generate", variant="primary", elem_id="generate")
        c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="cancel")
    c["status"] = gr.Markdown(elem_id="status")
    with gr.Row():
        c["preview"] = gr.Image(label="Live preview", format="png", interactive=False, scale=1, elem_id="preview")
        c["gallery"] = gr.Gallery(label="Faces", columns=GALLERY_COLUMNS, height="auto", format="png",
                                  object_fit="contain", scale=3, elem_id="faces")
    c["strip"] = gr.Image(label="Denoising strip: face 0 from noise to image", format="png", interactive=False,
                          height=150, elem_id="strip")
    with gr.Row():
        c["grid_file"] = gr.File(label="Grid PNG", scale=1, elem_id="grid-file")
        c["seeds"] = gr.Markdown(elem_id="seeds")


def _interpolate_tab(c: dict, most: int) -> None:
    gr.Markdown("Faces along the path between the starting noise of two seeds (spherical interpolation); a "
                "deterministic sampler makes the row change smoothly.")
    with gr.Row():
        c["interpolate_sampler"] = gr.Dropdown(list(SAMPLERS), value=INTERPOLATION_SAMPLER, label="Sampler")
        c["interpolate_steps"] = gr.Slider(1, most, value=min(DEFAULT_STEPS, most), step=1, label="Steps",
                                           elem_id="interpolate-steps")
        c["interpolate_num"] = gr.Slider(2, MAX_IMAGES, value=8, step=1, label="Number of faces")
    with gr.Row():
        c["seed_a"] = gr.Number(0, precision=0, minimum=0, maximum=MAX_PAGE_SEED, label="Seed A")
        c["seed_b"] = gr.Number(1, precision=0, minimum=0, maximum=MAX_PAGE_SEED, label="Seed B")
        c["randomize_both"] = gr.Button("Random seeds", scale=0)
    with gr.Row():
        c["interpolate_run"] = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
        c["interpolate_cancel"] = gr.Button("Cancel", variant="stop", elem_id="interpolate-cancel")
    c["interpolate_status"] = gr.Markdown(elem_id="interpolate-status")
    c["row"] = gr.Image(label="Interpolation", format="png", interactive=False, elem_id="row")


def _edit_tab(c: dict, most: int) -> None:
    gr.Markdown("Edit a real photo: its largest face is framed like the training faces (or its centre square "
                "taken), noised to the step the strength picks and denoised with the attributes and guidance on the "
                "left. Paint over the photo (white) to redraw only there; the rest is kept exactly.")
    with gr.Row():
        c["edit_photo"] = gr.Image(sources=["upload", "webcam"], type="filepath", label="Photo", height=EDIT_HEIGHT,
                                   elem_id="edit-photo")
        c["edit_canvas"] = mask_canvas(label="Region to redraw (optional): paint it white", sources=[],
                                        transforms=[], layers=False, height=EDIT_HEIGHT, format="png",
                                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="edit-canvas")
    with gr.Row():
        c["edit_strength"] = gr.Slider(0, 1, value=DEFAULT_STRENGTH, step=0.05, label="Strength",
                                       info="how much of the photo is replaced by noise before the model redraws "
                                            "it: 0 = the photo back, 0.5 = small changes, 0.8 = the asked age or "
                                            "gender shows, 1 = a new face", elem_id="edit-strength")
        c["edit_sampler"] = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
        c["edit_steps"] = gr.Slider(1, most, value=min(DEFAULT_EDIT_STEPS, most), step=1, label="Steps",
                                    info="the sampler's steps below the strength's start run", elem_id="edit-steps")
        c["edit_num"] = gr.Slider(1, MAX_IMAGES, value=DEFAULT_NUM, step=1, label="Number of faces")
    with gr.Row():
        c["edit_seed"] = gr.Number(0, precision=0, minimum=0, maximum=MAX_PAGE_SEED, label="Seed")
        c["edit_invert"] = gr.Checkbox(False, label="Keep the person (DDIM inversion)",
                                       info="start from the photo's inversion instead of fresh noise")
        c["edit_detect"] = gr.Checkbox(True, label="Find the face", info="off: the photo's centre square")
    with gr.Row():
        c["edit_run"] = gr.Button("Edit", variant="primary", elem_id="edit")
        c["edit_cancel"] = gr.Button("Cancel", variant="stop", elem_id="edit-cancel")
    c["edit_status"] = gr.Markdown(elem_id="edit-status")
    with gr.Row():
        c["edit_preview"] = gr.Image(label="Live preview", format="png", interactive=False, scale=1,
                                     elem_id="edit-preview")
        c["edit_gallery"] = gr.Gallery(label="Before and after: the framed photo, then the edits",
                                       columns=GALLERY_COLUMNS + 1, height="auto", format="png", object_fit="contain",
                                       scale=3, elem_id="edits")
    with gr.Row():
        c["edit_files"] = gr.File(label="Result PNG (and the painted mask)", file_count="multiple", scale=1,
                                  interactive=False, elem_id="edit-files")
        c["edit_command"] = gr.Markdown(elem_id="edit-command")


def _layout(app: FaceApp) -> dict:
    """Every component of the page, by name (the names the handlers' outputs use)."""
    most = min(MAX_STEPS, app.models[app.default].max_sampling_steps)
    c: dict = {"generate_job": gr.State(None), "interpolate_job": gr.State(None), "edit_job": gr.State(None)}
    gr.Markdown("## ddpm-faces\nFaces drawn by a denoising diffusion model, on this machine. "
                "Each face is reproducible from its seed.")
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            _controls(app, c)
        with gr.Column(scale=3):
            with gr.Tab("Generate"):
                _generate_tab(c, most)
            with gr.Tab("Interpolate"):
                _interpolate_tab(c, most)
            with gr.Tab("Edit a photo", elem_id="edit-tab"):
                _edit_tab(c, most)
    gr.Markdown(app.limits())
    return c


SAMPLING = {"generate": ("run", "cancel", "generate_job", "cancel"),              # button, Cancel, token, API
            "interpolate": ("interpolate_run", "interpolate_cancel", "interpolate_job", "cancel_interpolation"),
            "edit": ("edit_run", "edit_cancel", "edit_job", "cancel_edit")}


def mask_canvas(**options) -> gr.ImageEditor:
    """The canvas to paint the region to redraw on: Gradio's image editor, which keeps the pictures a browser
    sends ahead of an event (its accept_blobs) by the id the event will name. Here that store holds the
    newest KEEP_CANVASES canvases only, and a layer index past MAX_LAYERS is ignored, so that pictures sent
    without an edit, or one huge index, cannot fill the memory. (The editor's own accept_blobs is wrapped on
    this one component: a subclass would make Gradio write a .pyi stub beside this module.)"""
    canvas = gr.ImageEditor(**options)
    accept = canvas.accept_blobs

    @server
    def accept_blobs(data):
        if layer_index_ok(data.data.get("type"), data.data.get("index")):
            accept(data)
            keep_newest(canvas.blob_storage, KEEP_CANVASES)
    canvas.accept_blobs = accept_blobs
    return canvas


def layer_index_ok(kind, index) -> bool:
    """Whether a picture sent ahead for the canvas names a layer it may have (the browser sends "null" for
    the background and the composite)."""
    if kind != "layer" or index in (None, "", "null"):
        return True
    index = str(index)
    return index.isdecimal() and len(index) < 4 and int(index) < MAX_LAYERS


def keep_newest(storage: dict, keep: int) -> None:
    """Drop all but the `keep` newest entries of a dict (the oldest were sent by pages that never asked for an
    edit)."""
    for stale in list(storage)[:-keep]:
        storage.pop(stale, None)


def painted_layers(canvas: gr.ImageEditor, value):
    """The layers painted on the mask canvas, for `FaceApp.edit`: the browser sends the canvas's pictures
    ahead and names them by an id, an API client sends uploaded files; PNG bytes or FileData dicts
    (LOST_CANVAS when the id names nothing). The handler checks them."""
    if not isinstance(value, dict):
        return value
    if value.get("id") is None:
        return value.get("layers")
    blobs = canvas.blob_storage.pop(value["id"], None)
    return [layer for layer in blobs.layers if layer] if blobs is not None else LOST_CANVAS


def _with_canvas(handler: Callable, canvas: gr.ImageEditor) -> Callable:
    """The edit handler with the canvas's value turned into its painted layers (painted_layers)."""
    def edit(model, photo, painted, *rest, token=None):
        yield from handler(model, photo, painted_layers(canvas, painted), *rest, token=token)
    return edit


def _sampling_event(app: FaceApp, c: dict, tab: Tab) -> None:
    """Run button -> arm the tab's job token (a gr.State) -> the tab's handler with it; Cancel -> that token's
    stop. The handler reads the components its tab names, then the attribute dropdowns, then the token."""
    button, stop, state, cancel_name = SAMPLING[tab.kind]
    run, cancel, token = c[button], c[stop], c[state]
    attributes = [f"attribute_{name}" for name in app.attribute_names]
    fn = _with_canvas(tab.handler, c["edit_canvas"]) if "edit_canvas" in tab.inputs else tab.handler
    run.click(app.arm, token, token, queue=False, api_visibility="private").then(
        gradio_handler(fn, tab.outputs, token_last=True), [c[n] for n in (*tab.inputs, *attributes)] + [token],
        [c[n] for n in tab.outputs], api_name=tab.kind, preprocess=False, concurrency_id="sampling",
        concurrency_limit=app.concurrency_limit)
    cancel.click(gradio_handler(app.cancel, ()), token, None, queue=False, api_visibility="private",
                 api_name=cancel_name)


def _wire(app: FaceApp, c: dict) -> None:
    changed = out.model_outputs(app.attribute_names)
    c["model"].change(gradio_handler(app.model_changed, changed), c["model"], [c[n] for n in changed],
                      preprocess=False, api_name="model_changed")
    c["randomize"].click(app.random_seed, None, c["seed"], api_name="random_seed", queue=False)
    c["randomize_both"].click(app.random_seeds, None, [c["seed_a"], c["seed_b"]], api_name="random_seeds",
                              queue=False)
    for tab in app.tabs:
        _sampling_event(app, c, tab)
    c["edit_photo"].change(gradio_handler(app.editor.canvas, out.CANVAS_OUTPUTS), c["edit_photo"], c["edit_canvas"],
                           preprocess=False, api_visibility="private")


def build_page(app: FaceApp) -> gr.Blocks:
    """The page, with its queue (one concurrency limit shared by every kind of sampling)."""
    with gr.Blocks(title="ddpm-faces", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        _wire(app, _layout(app))
    demo.queue(default_concurrency_limit=app.concurrency_limit, max_size=app.max_queue)
    return demo
