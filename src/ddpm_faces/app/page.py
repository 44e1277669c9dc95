"""The page of `ddpm-faces serve`: the gr.Blocks layout and its event wiring.

`gradio_handler` is the one place where a handler's outputs by name become Gradio's positional tuple and a
UserError becomes a Gradio error ("Invalid input"). Sampling events run with preprocess=False: the handlers
check every input themselves, so the HTTP API gets the same one-line errors as the page.

Cancel: each Generate (or Interpolate) click first arms the tab's job token (kept in the session's gr.State),
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

from ..diffusion import SAMPLERS
from ..errors import UserError
from ..pipeline import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLING_PRECISIONS
from . import outputs as out
from .handlers import FaceApp
from .inputs import ANY, MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_STEPS, one_line

DEFAULT_NUM = 4
GALLERY_COLUMNS = 4
INTERPOLATION_SAMPLER = "ddim"   # deterministic: the row changes smoothly from one face to the other
THEME_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]   # local fonts: the page needs no network
CSS = "#faces .grid-wrap { min-height: 0 !important; height: auto !important; }"   # the gallery fits its faces


def gradio_error(err: Exception) -> gr.Error:
    """The Gradio error a client sees, one short line: "Invalid input" for a UserError; for anything else
    (a fault, whose traceback goes to the server's log) its type and message."""
    if isinstance(err, UserError):
        return gr.Error(one_line(str(err)), title="Invalid input", print_exception=False)
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
    c["guidance"] = gr.Slider(0, MAX_GUIDANCE, value=1.0, step=0.5, label="Guidance scale",
                              info="1 = plain conditional; larger = attributes more strongly",
                              visible=bool(m.attributes), elem_id="guidance")
    c["precision"] = gr.Dropdown(list(SAMPLING_PRECISIONS), value="fp32", label="Precision",
                                 info="bf16: the network under bf16 autocast, about 2x faster on CPUs with bf16 "
                                      "units (AMX, AVX512-bf16)", elem_id="precision")
    for name in app.attribute_names:
        values = m.vocab[name] if name in m.attributes else []
        c[f"attribute_{name}"] = gr.Dropdown([ANY, *values], value=ANY, label=name.capitalize(),
                                             visible=name in m.attributes, elem_id=f"attr-{name}")
    with gr.Accordion("Model card", open=True):
        c["card"] = gr.Markdown(app.card(app.default), elem_id="model-card")


def _generate_tab(c: dict, most: int) -> None:
    with gr.Row():
        c["sampler"] = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
        c["steps"] = gr.Slider(1, most, value=min(DEFAULT_STEPS, most), step=1, label="Steps", elem_id="steps")
        c["num"] = gr.Slider(1, MAX_IMAGES, value=DEFAULT_NUM, step=1, label="Number of images")
    with gr.Row():
        c["seed"] = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
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
        c["seed_a"] = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed A")
        c["seed_b"] = gr.Number(1, precision=0, minimum=0, maximum=MAX_SEED, label="Seed B")
        c["randomize_both"] = gr.Button("Random seeds", scale=0)
    with gr.Row():
        c["interpolate_run"] = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
        c["interpolate_cancel"] = gr.Button("Cancel", variant="stop", elem_id="interpolate-cancel")
    c["interpolate_status"] = gr.Markdown(elem_id="interpolate-status")
    c["row"] = gr.Image(label="Interpolation", format="png", interactive=False, elem_id="row")


def _layout(app: FaceApp) -> dict:
    """Every component of the page, by name (the names the handlers' outputs use)."""
    most = min(MAX_STEPS, app.models[app.default].max_steps)
    c: dict = {"generate_job": gr.State(None), "interpolate_job": gr.State(None)}
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
    gr.Markdown(app.limits())
    return c


def _sampling_event(app: FaceApp, c: dict, kind: str, inputs: list[str], names: tuple[str, ...]) -> None:
    """Run button -> arm the tab's job token (a gr.State) -> the handler with it; Cancel -> that token's stop."""
    run, cancel, token = (c["run"], c["cancel"], c["generate_job"]) if kind == "generate" else \
        (c["interpolate_run"], c["interpolate_cancel"], c["interpolate_job"])
    attributes = [f"attribute_{name}" for name in app.attribute_names]
    handler = gradio_handler(getattr(app, kind), names, token_last=True)
    run.click(app.arm, token, token, queue=False, api_visibility="private").then(
        handler, [c[n] for n in inputs + attributes] + [token], [c[n] for n in names], api_name=kind,
        preprocess=False, concurrency_id="sampling", concurrency_limit=app.concurrency_limit)
    cancel.click(gradio_handler(app.cancel, ()), token, None, queue=False, api_visibility="private",
                 api_name="cancel" if kind == "generate" else "cancel_interpolation")


def _wire(app: FaceApp, c: dict) -> None:
    changed = out.model_outputs(app.attribute_names)
    c["model"].change(gradio_handler(app.model_changed, changed), c["model"], [c[n] for n in changed],
                      preprocess=False, api_name="model_changed")
    c["randomize"].click(app.random_seed, None, c["seed"], api_name="random_seed", queue=False)
    c["randomize_both"].click(app.random_seeds, None, [c["seed_a"], c["seed_b"]], api_name="random_seeds",
                              queue=False)
    _sampling_event(app, c, "generate", ["model", "sampler", "steps", "num", "seed", "guidance", "precision"],
                    out.GENERATE_OUTPUTS)
    _sampling_event(app, c, "interpolate", ["model", "interpolate_sampler", "interpolate_steps", "interpolate_num",
                                            "seed_a", "seed_b", "guidance", "precision"], out.INTERPOLATE_OUTPUTS)


def build_page(app: FaceApp) -> gr.Blocks:
    """The page, with its queue (one concurrency limit shared by both kinds of sampling)."""
    with gr.Blocks(title="ddpm-faces", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        _wire(app, _layout(app))
    demo.queue(default_concurrency_limit=app.concurrency_limit, max_size=app.max_queue)
    return demo
