"""The web app behind `ddpm-faces serve`: a Gradio page that generates faces with a live preview.

    from ddpm_faces.app import FaceApp, launch
    app = FaceApp.from_paths(None)              # the bundled model(s) and the exports under runs/
    launch(app.blocks(), port=7860)             # http://127.0.0.1:7860, no public link

The handlers (`FaceApp.generate`, `.interpolate`, `.model_changed`, `.card`) are plain Python functions:
they validate every input themselves (the HTTP API reaches them unchecked: the events run with
`preprocess=False`) and raise `gr.Error` with a one-line message. Sampling runs in a worker thread whose
step callback checks a stop flag, so closing a handler's generator (the Cancel button, or a client's
cancel) stops the sampling loop at its next step.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import json
import math
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr
import numpy as np

from .config import Config, config_from_dict, read_yaml
from .diffusion import DEFAULT_SPACING, SAMPLERS, network_evaluations, sampling_timesteps
from .errors import UserError
from .images import DenoisingStrip, make_grid, save_image, to_uint8
from .models import count_parameters
from .pipeline import (DEFAULT_MODEL, DEFAULT_SAMPLER, DEFAULT_STEPS, PRECISIONS, WEIGHTS_DIR, Pipeline, _resolve,
                       build_schedule, generate, interpolate, load_pipeline)

MAX_IMAGES = 16
MAX_STEPS = 1000
MAX_GUIDANCE = 20.0
MAX_SEED = 2**31 - 1             # a seed the browser's numbers hold exactly
ANY = "any"                      # an attribute left to the model
DEFAULT_NUM = 4
GALLERY_COLUMNS = 4
INTERPOLATION_SAMPLER = "ddim"   # deterministic: the row changes smoothly from one face to the other
PREVIEWS = 10                    # live previews per generation (every steps / PREVIEWS steps)
TICK = 0.25                      # seconds: the longest a handler waits on the sampler before it yields
QUEUE_POLL = 0.02                # seconds between Gradio's looks for queued work (see quiet_queue)
DISPLAY_PX = 128                 # faces are enlarged (nearest) to about this size for the page and the PNGs
THEME_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]   # local fonts: the page needs no network
CSS = "#faces .grid-wrap { min-height: 0 !important; height: auto !important; }"   # the gallery fits its faces


# ---------------------------------------------------------------------------------------------------
# Models: discovery and model card
# ---------------------------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    label: str                   # what the model picker shows
    source: str                  # what load_pipeline takes
    cfg: Config
    folder: Path                 # where the weights are
    cli_checkpoint: str | None   # the --checkpoint that names it on the command line (None: the default)


def _read_config(config_file: Path) -> Config:
    try:
        return config_from_dict(read_yaml(config_file))
    except UserError:
        raise
    except Exception as err:     # a YAML or type error in a foreign file
        raise UserError(f"{config_file} is not a ddpm-faces config ({type(err).__name__}: {err})") from None


def bundled_models() -> list[Path]:
    """Folders under the package's weights/ that hold a diffusion model (the default one first)."""
    found = []
    for folder in sorted(WEIGHTS_DIR.iterdir()) if WEIGHTS_DIR.is_dir() else []:
        if (folder / "model.safetensors").is_file() and (folder / "config.yaml").is_file():
            try:
                _read_config(folder / "config.yaml")
            except UserError:                       # another kind of network (e.g. an attribute classifier)
                continue
            found.append(folder)
    return sorted(found, key=lambda f: f.name != DEFAULT_MODEL)


def discover_models(checkpoints: list[str] | None = None, runs_dir: str | Path = "runs") -> dict[str, ModelEntry]:
    """The models the page offers, by label, the default first: the given checkpoints (any form
    `load_pipeline` takes), or else the bundled model(s) and every exported run under `runs_dir`."""
    entries: list[ModelEntry] = []
    if checkpoints:
        for path in checkpoints:
            weights, config_file = _resolve(path)                 # UserError for a path that holds no model
            if not config_file.is_file():
                raise UserError(f"{config_file} is missing: the model's config must sit beside its weights")
            entries.append(ModelEntry(str(path), str(path), _read_config(config_file), weights.parent, str(path)))
    else:
        for folder in bundled_models():
            entries.append(ModelEntry(f"{folder.name} (bundled)", str(folder), _read_config(folder / "config.yaml"),
                                      folder, None if folder.name == DEFAULT_MODEL else folder.name))
        runs = Path(runs_dir)
        for export in sorted(runs.glob("*/export")) if runs.is_dir() else []:
            if not ((export / "model.safetensors").is_file() and (export / "config.yaml").is_file()):
                continue
            try:
                cfg = _read_config(export / "config.yaml")
            except UserError:
                continue
            label = f"{runs_dir}/{export.parent.name}" if not runs.is_absolute() else str(export.parent)
            entries.append(ModelEntry(label, str(export), cfg, export, label))
    if not entries:
        raise UserError(f"no model to serve: the bundled weights are missing from {WEIGHTS_DIR} and {runs_dir}/ "
                        "has no exported run; pass --checkpoint runs/<name>")
    models: dict[str, ModelEntry] = {}
    for entry in entries:
        models.setdefault(entry.label, entry)
    return models


def read_metrics(folder: Path) -> dict | None:
    """metrics.json beside the weights (or in the run folder above an export/), if there is one."""
    for candidate in (folder / "metrics.json", folder.parent / "metrics.json" if folder.name == "export" else None):
        if candidate is not None and candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    return None


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_format_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def _latest_checkpoint_step(folder: Path) -> int | None:
    from .training.checkpoint import checkpoint_step, list_checkpoints

    run = folder.parent if folder.name == "export" else None
    ckpts = list_checkpoints(run) if run is not None else []
    return checkpoint_step(ckpts[-1]) if ckpts else None


def _where(folder: Path) -> str:
    """A short name for a weights folder: inside the package, under the working folder, or in full."""
    for root, prefix in ((WEIGHTS_DIR.parent, "the package's "), (Path.cwd(), "")):
        try:
            return f"{prefix}{folder.resolve().relative_to(root.resolve())}/"
        except ValueError:
            continue
    return str(folder)


def model_card(entry: ModelEntry, pipe: Pipeline) -> str:
    """Markdown: what the model is, how it was trained and how well it does (when measured)."""
    m, d, t = entry.cfg.model, entry.cfg.diffusion, entry.cfg.train
    params = count_parameters(pipe.net)
    if pipe.step is not None:
        trained = f"{pipe.step:,} (of {t.max_steps:,} configured)"
    else:
        trained = f"{t.max_steps:,} configured (train.max_steps)"
        latest = _latest_checkpoint_step(entry.folder)
        if latest is not None:
            trained += f"; the run's newest checkpoint: step {latest:,}"
    if m.attributes:
        attributes = "; ".join(f"{a}: {', '.join(m.vocab[a])}" for a in m.attributes)
    else:
        attributes = "none (unconditional)"
    rows = [
        ("parameters", f"{params / 1e6:.2f} M ({params:,})"),
        ("resolution", f"{m.resolution} × {m.resolution} px"),
        ("training steps", trained),
        ("diffusion", f"{d.prediction}-prediction, {d.schedule} schedule, {d.timesteps} timesteps"),
        ("attributes", attributes),
        ("default sampler", f"{DEFAULT_SAMPLER}, {DEFAULT_STEPS} steps "
                            f"({network_evaluations(DEFAULT_SAMPLER, DEFAULT_STEPS)} network calls per image)"),
        ("weights", _where(entry.folder)),
    ]
    metrics = read_metrics(entry.folder)
    if metrics:
        rows += [(f"metric: {k}", _format_value(v)) for k, v in metrics.items()]
    else:
        rows.append(("metrics", "not recorded here (no metrics.json beside the weights)"))
    return f"**{entry.label}**\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in rows) + "\n"


# ---------------------------------------------------------------------------------------------------
# Input validation: every handler checks its own inputs (the HTTP API can send anything)
# ---------------------------------------------------------------------------------------------------
def input_error(message: str) -> gr.Error:
    """The error a handler raises for bad input: shown to the user (and to API clients), not logged as a fault."""
    return gr.Error(message, title="Invalid input", print_exception=False)


def check_int(value, name: str, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi], or gr.Error naming the input and its range."""
    if isinstance(value, bool) or value is None:
        raise input_error(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise input_error(f"{name} must be a whole number from {lo} to {hi}, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise input_error(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    if not lo <= int(number) <= hi:
        raise input_error(f"{name} must be from {lo} to {hi}, got {int(number)}")
    return int(number)


def check_guidance(value) -> float:
    if isinstance(value, bool) or value is None:
        raise input_error(f"guidance scale must be a number from 0 to {MAX_GUIDANCE:g}, got {value!r}")
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise input_error(f"guidance scale must be a number from 0 to {MAX_GUIDANCE:g}, got {value!r}") from None
    if not math.isfinite(w) or not 0 <= w <= MAX_GUIDANCE:
        raise input_error(f"guidance scale must be a number from 0 to {MAX_GUIDANCE:g} (1 = no guidance), "
                          f"got {value!r}")
    return w


def check_choice(value, choices, name: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise input_error(f"unknown {name} {value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def check_steps(entry: ModelEntry, sampler: str, steps) -> int:
    """Steps in 1..1000 that the sampler's timestep spacing can lay out on this model's schedule."""
    steps = check_int(steps, "steps", 1, min(MAX_STEPS, entry.cfg.diffusion.timesteps))
    try:
        sampling_timesteps(build_schedule(entry.cfg), steps, DEFAULT_SPACING[sampler])
    except UserError as err:
        raise input_error(f"{steps} steps do not work with the {sampler} sampler on this model: {err}") from None
    return steps


def check_attributes(entry: ModelEntry, names: list[str], values) -> dict[str, str]:
    """The attribute values asked for (those not left at 'any'), each in the model's vocabulary; values
    for `names` in order, missing ones taken as 'any'."""
    if len(values) > len(names):
        raise input_error(f"expected at most {len(names)} attribute values ({', '.join(names) or 'none'}), "
                       f"got {len(values)}")
    m = entry.cfg.model
    wanted = {}
    for name, value in zip(names, values):
        if value in (None, "", ANY):
            continue
        if name not in m.attributes:
            known = ", ".join(m.attributes) if m.attributes else "no attributes (an unconditional model)"
            raise input_error(f"{entry.label} is not conditioned on {name} (it knows {known}): leave {name} at 'any'")
        check_choice(value, [ANY, *m.vocab[name]], name)
        wanted[name] = value
    return wanted


# ---------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------
def display_scale(resolution: int) -> int:
    """The nearest-neighbour enlargement that shows a face at about DISPLAY_PX pixels."""
    return max(1, DISPLAY_PX // resolution)


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    return image if scale == 1 else image.repeat(scale, axis=-3).repeat(scale, axis=-2)


def reproduce_command(entry: ModelEntry, *, seed: int, num: int, sampler: str, steps: int, scale: int,
                      guidance: float, precision: str, attributes: dict[str, str]) -> str:
    """The `ddpm-faces sample` line that writes the same grid."""
    parts = ["ddpm-faces sample"]
    if entry.cli_checkpoint:
        parts.append(f"--checkpoint {entry.cli_checkpoint}")
    parts.append(f"--seed {seed} --num {num} --sampler {sampler} --steps {steps}")
    parts += [f"--{k} '{v}'" for k, v in attributes.items()]
    if entry.cfg.model.attributes and guidance != 1.0:
        parts.append(f"--guidance {guidance:g}")
    if precision != "fp32":
        parts.append(f"--precision {precision}")
    parts.append(f"--upscale {scale} --out faces.png")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------
class Cancelled(Exception):
    """Raised inside the sampler's step callback to stop a generation."""


@dataclass
class RunRecord:
    """One sampling run, kept in FaceApp.runs: how far it got and how it ended."""
    kind: str
    steps: int
    steps_done: int = 0
    outcome: str = "running"     # done, cancelled, error
    seconds: float = 0.0


class FaceApp:
    """The page's state (models, loaded pipelines, running jobs) and its handlers."""

    def __init__(self, models: dict[str, ModelEntry], *, concurrency_limit: int = 1, max_queue: int = 32,
                 threads: int | None = None, device: str = "cpu"):
        if not models:
            raise UserError("no model to serve")
        if concurrency_limit < 1:
            raise UserError(f"the concurrency limit must be at least 1, got {concurrency_limit}")
        self.models = models
        self.default = next(iter(models))
        self.concurrency_limit, self.max_queue = concurrency_limit, max_queue
        self.threads, self.device = threads, device
        names: list[str] = []
        for entry in models.values():
            names += [a for a in entry.cfg.model.attributes if a not in names]
        self.attribute_names = names                         # one dropdown each, shown when the model has it
        self._pipes: dict[str, Pipeline] = {}
        self._lock = threading.Lock()
        self.runs: collections.deque[RunRecord] = collections.deque(maxlen=1000)   # the newest last
        self.active = 0                                      # sampling threads still running
        self._running: dict[threading.Thread, threading.Event] = {}
        atexit.register(self.stop_all)
        self.out_dir = Path(tempfile.mkdtemp(prefix="ddpm-faces-app-"))
        atexit.register(shutil.rmtree, self.out_dir, True)

    @classmethod
    def from_paths(cls, checkpoints: list[str] | None = None, runs_dir: str | Path = "runs", **kwargs) -> FaceApp:
        return cls(discover_models(checkpoints, runs_dir), **kwargs)

    # -- models ---------------------------------------------------------------------------------------
    def entry(self, label) -> ModelEntry:
        return self.models[check_choice(label, list(self.models), "model")]

    def pipeline(self, entry: ModelEntry) -> Pipeline:
        with self._lock:
            if entry.label not in self._pipes:
                try:
                    self._pipes[entry.label] = load_pipeline(entry.source, device=self.device)
                except UserError as err:
                    raise gr.Error(f"cannot load {entry.label}: {err}") from None
            return self._pipes[entry.label]

    def card(self, model) -> str:
        entry = self.entry(model)
        return model_card(entry, self.pipeline(entry))

    def model_changed(self, model) -> tuple:
        """The model card, and the conditional controls shown (with the model's values) or hidden;
        the steps sliders limited to the model's timesteps."""
        entry = self.entry(model)
        m = entry.cfg.model
        updates = [self.card(model), gr.update(visible=bool(m.attributes), value=1.0)]
        for name in self.attribute_names:
            known = name in m.attributes
            updates.append(gr.update(visible=known, value=ANY, choices=[ANY, *(m.vocab[name] if known else [])]))
        most = min(MAX_STEPS, entry.cfg.diffusion.timesteps)
        updates += [gr.update(maximum=most), gr.update(maximum=most)]
        return tuple(updates)

    @staticmethod
    def random_seed() -> int:
        return random.SystemRandom().randint(0, MAX_SEED)

    def random_seeds(self) -> tuple[int, int]:
        return self.random_seed(), self.random_seed()

    # -- sampling in a worker thread --------------------------------------------------------------------
    def _stream(self, kind: str, steps: int, work: Callable) -> Iterator[tuple[str, object]]:
        """Run `work(callback)` in a thread; yield ("preview", (step, x0 uint8)) every few steps, ("tick", None)
        every TICK seconds without news, then ("done", result). Closing this generator sets the stop flag;
        the callback then raises Cancelled. (Gradio cancels a generator between two of its items: the ticks
        keep that wait short however long a step takes.)"""
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        every = max(1, round(steps / PREVIEWS))
        record = RunRecord(kind, steps)

        def callback(i, t, x_i, x0):
            if stop.is_set():
                raise Cancelled()
            record.steps_done = i + 1
            if i % every == 0 and i < steps - 1:               # the last estimate is the result itself
                events.put(("preview", (i + 1, to_uint8(x0))))

        def target():
            if self.threads:
                import torch
                torch.set_num_threads(self.threads)
            start = time.perf_counter()
            try:
                result = work(callback)
                record.outcome = "done"
                events.put(("done", result))
            except Cancelled:
                record.outcome = "cancelled"
                events.put(("cancelled", None))
            except BaseException as err:                        # handed to the generator, which raises it
                record.outcome = "error"
                events.put(("error", err))
            finally:
                record.seconds = time.perf_counter() - start
                with self._lock:
                    self.runs.append(record)
                    self.active -= 1
                    self._running.pop(threading.current_thread(), None)

        thread = threading.Thread(target=target, name=f"ddpm-faces-{kind}", daemon=True)
        with self._lock:
            self.active += 1
            self._running[thread] = stop
        thread.start()
        try:
            while True:
                try:
                    what, payload = events.get(timeout=TICK)
                except queue.Empty:          # hand control back now and then, so that a cancel can close us
                    yield "tick", None
                    continue
                while what == "preview" and not events.empty():     # behind: show only the newest estimate
                    what, payload = events.get()
                if what == "preview":
                    yield what, payload
                elif what == "done":
                    yield what, payload
                    return
                elif what == "cancelled":
                    raise gr.Error("stopped: the generation was cancelled", title="Stopped", print_exception=False)
                elif isinstance(payload, UserError):
                    raise input_error(str(payload)) from None
                else:
                    raise payload
        finally:
            stop.set()                 # closed early (cancel, client gone): the sampler stops at its next step

    # -- handlers ----------------------------------------------------------------------------------------
    def _common(self, model, sampler, steps, guidance, precision, attributes) -> tuple:
        """The inputs both tabs share, checked; then the model's pipeline (loaded once)."""
        entry = self.entry(model)
        sampler = check_choice(sampler, SAMPLERS, "sampler")
        steps = check_steps(entry, sampler, steps)
        guidance = check_guidance(guidance)
        precision = check_choice(precision, PRECISIONS, "precision")
        wanted = check_attributes(entry, self.attribute_names, attributes)
        pipe = self.pipeline(entry)
        if not pipe.conditional:
            guidance = 1.0                       # the hidden slider's value means nothing to this model
        return entry, sampler, steps, guidance, precision, wanted, pipe

    def generate(self, model, sampler, steps, num, seed, guidance=1.0, precision="fp32",
                 *attributes) -> Iterator[tuple]:
        """Yields (preview, gallery, grid PNG path, seeds markdown, denoising strip, status): every few steps
        the preview shows the current clean-image estimates as one picture (one file per step for the page to
        fetch, not one per face); at the end it shows the grid, and the gallery the faces with their seeds.
        `attributes`: one value per name in `attribute_names` ('any' or left out: not asked for)."""
        entry, sampler, steps, guidance, precision, wanted, pipe = self._common(model, sampler, steps, guidance,
                                                                                precision, attributes)
        num = check_int(num, "number of images", 1, MAX_IMAGES)
        seed = check_int(seed, "seed", 0, MAX_SEED)
        scale = display_scale(entry.cfg.model.resolution)
        strip = DenoisingStrip(steps, 1)

        def work(callback):
            def both(i, t, x_i, x0):
                callback(i, t, x_i, x0)
                strip(i, t, x_i[:1], x0[:1])
            return generate(pipe, num, seed=seed, sampler=sampler, steps=steps, batch_size=MAX_IMAGES, progress=False,
                            callback=both, attributes=wanted or None, guidance=guidance, precision=precision)

        start = time.perf_counter()
        images, cleared = None, False
        with contextlib.closing(self._stream("generate", steps, work)) as stream:
            for what, payload in stream:
                if what == "tick":
                    yield (gr.skip(),) * 6
                elif what == "preview":
                    step, x0 = payload
                    status = f"Denoising: step {step} of {steps} (the current estimate of each face)"
                    picture = enlarge(make_grid(x0), scale)
                    if cleared:             # the last run's outputs were cleared at the first preview
                        yield picture, gr.skip(), gr.skip(), gr.skip(), gr.skip(), status
                    else:
                        yield picture, None, None, "", None, status
                        cleared = True
                else:
                    images = payload
        seconds = time.perf_counter() - start
        folder = Path(tempfile.mkdtemp(dir=self.out_dir))
        grid = save_image(make_grid(images), folder / f"faces-seed{seed}.png", upscale=scale)
        gallery = [(enlarge(img, scale), f"seed {seed} · image {i}") for i, img in enumerate(images)]
        command = reproduce_command(entry, seed=seed, num=num, sampler=sampler, steps=steps, scale=scale,
                                    guidance=guidance, precision=precision, attributes=wanted)
        seeds = (f"**Seeds.** Face *i* is image *i* of seed {seed}, whatever the number of faces asked for: "
                 + "; ".join(f"face {i} = seed {seed} image {i}" for i in range(num)) + ".\n\n"
                 f"This grid again: `{command}`  \n"
                 f"Each face on its own: add `--save-individual faces/`, and face *i* is written to "
                 f"`faces/seed{seed}-{num - 1:04d}.png` for *i* = {num - 1} (`--num i+1` is enough for face *i*).")
        asked = ", ".join(f"{k} {v}" for k, v in wanted.items())
        status = (f"{num} face{'s' if num > 1 else ''} in {seconds:.2f} s ({sampler}, {steps} steps"
                  + (f", {asked}" if asked else "") + (f", guidance {guidance:g}" if pipe.conditional else "")
                  + (f", {precision}" if precision != "fp32" else "") + ")")
        yield str(grid), gallery, str(grid), seeds, enlarge(strip.picture(), scale), status

    def interpolate(self, model, sampler, steps, num, seed_a, seed_b, guidance=1.0, precision="fp32",
                    *attributes) -> Iterator[tuple]:
        """Yields (row picture, status): faces along the spherical path between the starting noise of two seeds."""
        entry, sampler, steps, guidance, precision, wanted, pipe = self._common(model, sampler, steps, guidance,
                                                                                precision, attributes)
        num = check_int(num, "number of faces", 2, MAX_IMAGES)
        seed_a = check_int(seed_a, "seed A", 0, MAX_SEED)
        seed_b = check_int(seed_b, "seed B", 0, MAX_SEED)
        scale = display_scale(entry.cfg.model.resolution)

        def work(callback):
            return interpolate(pipe, seed_a, seed_b, num, sampler=sampler, steps=steps, batch_size=MAX_IMAGES,
                               progress=False, callback=callback, attributes=wanted or None, guidance=guidance,
                               precision=precision)

        start = time.perf_counter()
        images = None
        with contextlib.closing(self._stream("interpolate", steps, work)) as stream:
            for what, payload in stream:
                if what == "tick":
                    yield gr.skip(), gr.skip()
                elif what == "preview":
                    step, x0 = payload
                    yield enlarge(make_grid(x0, nrow=num), scale), f"Denoising: step {step} of {steps}"
                else:
                    images = payload
        seconds = time.perf_counter() - start
        status = (f"{num} faces from seed {seed_a} to seed {seed_b} in {seconds:.2f} s ({sampler}, {steps} steps; "
                  f"spherical interpolation of the starting noise of image 0 of each seed)")
        yield enlarge(make_grid(images, nrow=num), scale), status

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every sampling thread and wait for them (at exit: a thread inside torch must not outlive
        the interpreter)."""
        with self._lock:
            running = list(self._running.items())
        for _, stop in running:
            stop.set()
        for thread, _ in running:
            thread.join(timeout)

    @staticmethod
    def cancelled() -> str:
        return "Stopped."

    # -- the page ------------------------------------------------------------------------------------------
    def blocks(self) -> gr.Blocks:
        """The page, with its queue (a concurrency limit shared by both kinds of sampling)."""
        default = self.models[self.default]
        m = default.cfg.model
        most = min(MAX_STEPS, default.cfg.diffusion.timesteps)
        sampling = dict(preprocess=False, concurrency_id="sampling", concurrency_limit=self.concurrency_limit)
        with gr.Blocks(title="ddpm-faces", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
            gr.Markdown("## ddpm-faces\nFaces drawn by a denoising diffusion model, on this machine. "
                        "Each face is reproducible from its seed.")
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    model = gr.Dropdown(list(self.models), value=self.default, label="Model", elem_id="model")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=1.0, step=0.5, label="Guidance scale",
                                         info="1 = plain conditional; larger = attributes more strongly",
                                         visible=bool(m.attributes), elem_id="guidance")
                    precision = gr.Dropdown(list(PRECISIONS), value="fp32", label="Precision",
                                            info="bf16: the network under bf16 autocast, about 2x faster on "
                                                 "CPUs with bf16 units (AMX, AVX512-bf16)",
                                            elem_id="precision")
                    attributes = []
                    for name in self.attribute_names:
                        values = m.vocab[name] if name in m.attributes else []
                        attributes.append(gr.Dropdown([ANY, *values], value=ANY, label=name.capitalize(),
                                                      visible=name in m.attributes, elem_id=f"attr-{name}"))
                    with gr.Accordion("Model card", open=True):
                        card = gr.Markdown(self.card(self.default), elem_id="model-card")
                with gr.Column(scale=3):
                    with gr.Tab("Generate"):
                        with gr.Row():
                            sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
                            steps = gr.Slider(1, most, value=min(DEFAULT_STEPS, most), step=1, label="Steps",
                                              elem_id="steps")
                            num = gr.Slider(1, MAX_IMAGES, value=DEFAULT_NUM, step=1, label="Number of images")
                        with gr.Row():
                            seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                            randomize = gr.Button("Random seed", scale=0)
                        with gr.Row():
                            run = gr.Button("Generate", variant="primary", elem_id="generate")
                            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                        status = gr.Markdown(elem_id="status")
                        with gr.Row():
                            preview = gr.Image(label="Live preview", format="png",
                                               interactive=False, scale=1, elem_id="preview")
                            gallery = gr.Gallery(label="Faces", columns=GALLERY_COLUMNS, height="auto", format="png",
                                                 object_fit="contain", scale=3, elem_id="faces")
                        strip = gr.Image(label="Denoising strip: face 0 from noise to image", format="png",
                                         interactive=False, height=150, elem_id="strip")
                        with gr.Row():
                            grid_file = gr.File(label="Grid PNG", scale=1, elem_id="grid-file")
                            seeds = gr.Markdown(elem_id="seeds")
                    with gr.Tab("Interpolate"):
                        gr.Markdown("Faces along the path between the starting noise of two seeds (spherical "
                                    "interpolation); a deterministic sampler makes the row change smoothly.")
                        with gr.Row():
                            i_sampler = gr.Dropdown(list(SAMPLERS), value=INTERPOLATION_SAMPLER, label="Sampler")
                            i_steps = gr.Slider(1, most, value=min(DEFAULT_STEPS, most), step=1, label="Steps",
                                                elem_id="interpolate-steps")
                            i_num = gr.Slider(2, MAX_IMAGES, value=8, step=1, label="Number of faces")
                        with gr.Row():
                            seed_a = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed A")
                            seed_b = gr.Number(1, precision=0, minimum=0, maximum=MAX_SEED, label="Seed B")
                            i_randomize = gr.Button("Random seeds", scale=0)
                        with gr.Row():
                            i_run = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
                            i_cancel = gr.Button("Cancel", variant="stop", elem_id="interpolate-cancel")
                        i_status = gr.Markdown()
                        row = gr.Image(label="Interpolation", format="png", interactive=False, elem_id="row")

            model.change(self.model_changed, model, [card, guidance, *attributes, steps, i_steps], preprocess=False,
                         api_name="model_changed")
            randomize.click(self.random_seed, None, seed, api_name="random_seed", queue=False)
            i_randomize.click(self.random_seeds, None, [seed_a, seed_b], api_name="random_seeds", queue=False)
            generating = run.click(self.generate, [model, sampler, steps, num, seed, guidance, precision, *attributes],
                                   [preview, gallery, grid_file, seeds, strip, status], api_name="generate",
                                   **sampling)
            interpolating = i_run.click(self.interpolate,
                                        [model, i_sampler, i_steps, i_num, seed_a, seed_b, guidance, precision,
                                         *attributes],
                                        [row, i_status], api_name="interpolate", **sampling)
            cancel.click(self.cancelled, None, status, cancels=[generating], queue=False, api_name="cancel")
            i_cancel.click(self.cancelled, None, i_status, cancels=[interpolating], queue=False,
                           api_name="cancel_interpolation")
            gr.Markdown(f"Limits: 1 to {MAX_IMAGES} images, 1 to {MAX_STEPS} steps, guidance 0 to {MAX_GUIDANCE:g}; "
                        f"{self.concurrency_limit} generation(s) at a time, the others wait in a queue.")
        demo.queue(default_concurrency_limit=self.concurrency_limit, max_size=self.max_queue)
        quiet_queue(demo)
        return demo


# ---------------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------------
def quiet_queue(demo: gr.Blocks) -> None:
    """Make Gradio's queue look for work every QUEUE_POLL seconds instead of every millisecond (and for
    progress every 0.1 s instead of 0.01 s). Its polling wakes the interpreter often enough to slow the
    sampling thread by about a third on a 2-core machine with a training run on the other core (GIL
    handoffs); the cost is at most QUEUE_POLL seconds before a queued request starts. A Gradio without
    these attributes is left as it is."""
    q = getattr(demo, "_queue", None)
    if q is not None and isinstance(getattr(q, "sleep_when_free", None), (int, float)):
        q.sleep_when_free = max(q.sleep_when_free, QUEUE_POLL)
    if q is not None and isinstance(getattr(q, "progress_update_sleep_when_free", None), (int, float)):
        q.progress_update_sleep_when_free = max(q.progress_update_sleep_when_free, 0.1)


def default_threads() -> int:
    """All cores but one (at least one): the web server and other jobs keep a core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True,
           quiet: bool = False):
    """Start the server; a public share link only when `share` is True."""
    theme = gr.themes.Default(font=THEME_FONTS, font_mono=["ui-monospace", "monospace"])
    return demo.launch(server_name=host, server_port=port, share=bool(share), prevent_thread_lock=not block,
                       show_error=True, quiet=quiet, theme=theme, css=CSS)


def serve(checkpoints: list[str] | None = None, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          threads: int | None = None, runs_dir: str | Path = "runs", concurrency_limit: int = 1) -> None:
    """`ddpm-faces serve`: discover the models, build the page, serve it until interrupted."""
    import torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    app = FaceApp.from_paths(checkpoints, runs_dir, threads=threads, concurrency_limit=concurrency_limit)
    print(f"models: {', '.join(app.models)} (default {app.default}); {threads} torch thread(s)")
    demo = app.blocks()
    try:
        launch(demo, host, port, share)
    except OSError as err:
        raise UserError(f"cannot serve on {host}:{port} ({err}): pick another --port") from None
