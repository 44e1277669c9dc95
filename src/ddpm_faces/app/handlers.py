"""The app's state (models, loaded pipelines, sampling jobs) and its handlers, plain Python: each handler
checks its inputs, builds one SamplingRequest and validates it against the model, and returns (or yields) a
dict keyed by output name. They raise UserError for bad input; the page turns that into Gradio's error.
Each sampling tab is a unit (Tab: its handler, its inputs and outputs by name); the page composes `app.tabs`.

    app = FaceApp.from_paths(None)               # the bundled model(s) and the exports under runs/
    *_, last = app.generator.generate(app.default, "dpmpp-2m", 20, 4, 0)
    last["gallery"], last["status"]
"""
from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from ..diffusion import SAMPLERS
from ..errors import UserError
from ..photos.framing import MAX_BYTES, MAX_PIXELS
from ..images import DenoisingStrip, enlarge, make_grid
from ..hardware import resolve_precision
from ..pipeline import (RUNTIMES, SAMPLING_PRECISIONS, Pipeline, SamplingRequest, generate, interpolate, load_pipeline,
                        stage_steps)
from . import outputs as out
from .inputs import (ANY_CHOICE, MAX_GUIDANCE, MAX_IMAGES, MAX_PAGE_SEED, MAX_STEPS, check_attributes, check_choice,
                     check_int, check_number)
from .edit import PhotoEditor
from .job import Job, Jobs
from .models import ModelEntry, discover_models, model_card

Outputs = dict
NAMES = {"generate": ("number of images", 1, "seed"), "interpolate": ("number of faces", 2, "seed A"),
         "edit": ("number of faces", 1, "seed")}


def sampling_with_strip(pipe: Pipeline, request: SamplingRequest, strip: DenoisingStrip) -> Callable:
    """A job's work: `generate`, with the denoising strip of image 0 kept as it goes. The job counts the steps
    of every stage of a cascade in one sequence (the strip, each stage's own)."""
    total = sum(strip.stages)

    def work(callback):
        done = [0]

        def both(i, t, x_i, x0):
            callback(done[0] % total, t, x_i, x0)
            done[0] += 1
            strip(i, t, x_i[:1], x0[:1])
        return generate(pipe, request, progress=False, callback=both)
    return work


@dataclass(frozen=True)
class Tab:
    """One sampling tab as a unit: its handler, the page components it reads by name in the handler's
    positional order (the attribute dropdowns and the session's job token follow), and those it writes."""
    kind: str                          # its API name and job kind
    handler: Callable                  # yields outputs by name
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


GENERATE_INPUTS = ("model", "sampler", "steps", "num", "seed", "guidance", "precision")
INTERPOLATE_INPUTS = ("model", "interpolate_sampler", "interpolate_steps", "interpolate_num", "seed_a", "seed_b",
                      "guidance", "precision")


class FaceApp:
    """The models on offer, their pipelines (loaded once, on first use), the jobs, the checks the tabs share,
    and the tabs: `generator`, `interpolator` and `editor` (edit.py's PhotoEditor), each built on it."""

    def __init__(self, models: dict[str, ModelEntry], *, concurrency_limit: int = 1, max_queue: int = 32,
                 threads: int | None = None, device: str = "cpu", out_dir: str | Path | None = None,
                 runtime: str = "plain"):
        if not models:
            raise UserError("no model to serve")
        if concurrency_limit < 1:
            raise UserError(f"the concurrency limit must be at least 1, got {concurrency_limit}")
        self.models, self.default = models, next(iter(models))
        self.concurrency_limit, self.max_queue = concurrency_limit, max_queue
        self.threads, self.device = threads, device
        self.runtime = check_choice(runtime, RUNTIMES, "runtime")   # onnx: used for the requests that run in fp32
        self.attribute_names: list[str] = []        # one dropdown each, shown when the model has it
        for entry in models.values():
            self.attribute_names += [a for a in entry.cfg.model.attributes if a not in self.attribute_names]
        self.jobs = Jobs()
        self.out_dir = Path(tempfile.mkdtemp(prefix="ddpm-faces-app-", dir=out_dir))
        self.scratch = Path(out_dir) if out_dir is not None else None     # the server's folder, uploads included
        self._pipes: dict[str, Pipeline] = {}
        self._lock = threading.Lock()
        self.generator, self.interpolator, self.editor = FaceGenerator(self), Interpolator(self), PhotoEditor(self)
        atexit.register(self.close)

    @property
    def tabs(self) -> tuple[Tab, ...]:
        """The sampling tabs, as the page composes them."""
        return (Tab(self.generator.kind, self.generator.generate, self.generator.INPUTS, self.generator.OUTPUTS),
                Tab(self.interpolator.kind, self.interpolator.interpolate, self.interpolator.INPUTS,
                    self.interpolator.OUTPUTS),
                Tab(self.editor.kind, self.editor.edit, self.editor.INPUTS, self.editor.OUTPUTS))

    @classmethod
    def from_paths(cls, checkpoints: list[str] | None = None, runs_dir: str | Path = "runs", **kwargs) -> FaceApp:
        return cls(discover_models(checkpoints, runs_dir), **kwargs)

    @property
    def runs(self):
        """The finished runs' records, the newest last."""
        return self.jobs.runs

    @property
    def active(self) -> int:
        """Sampling threads still running."""
        return self.jobs.active

    def close(self) -> None:
        """Stop the sampling threads and remove the app's temporary files."""
        self.jobs.stop_all()
        shutil.rmtree(self.out_dir, ignore_errors=True)

    # -- models ---------------------------------------------------------------------------------------
    def entry(self, label) -> ModelEntry:
        return self.models[check_choice(label, list(self.models), "model")]

    def pipeline(self, entry: ModelEntry) -> Pipeline:
        with self._lock:
            if entry.label not in self._pipes:
                try:
                    self._pipes[entry.label] = load_pipeline(entry.source, device=self.device)
                except UserError as err:
                    raise UserError(f"cannot load {entry.label}: {err}") from None
            return self._pipes[entry.label]

    def card(self, model) -> str:
        entry = self.entry(model)
        return model_card(entry, self.pipeline(entry))

    def model_changed(self, model) -> Outputs:
        """The model card; the conditional controls shown (with the model's values) or hidden; the steps
        sliders limited to the model's timesteps."""
        entry = self.entry(model)
        m = entry.cfg.model
        most = min(MAX_STEPS, entry.max_sampling_steps)
        changes = {"card": self.card(model), "guidance": gr.update(visible=bool(m.attributes), value=1.0),
                   "steps": gr.update(maximum=most), "interpolate_steps": gr.update(maximum=most),
                   "edit_steps": gr.update(maximum=most)}
        for name in self.attribute_names:
            values = m.vocab[name] if name in m.attributes else []
            changes[f"attribute_{name}"] = gr.update(visible=name in m.attributes, value=ANY_CHOICE, choices=[ANY_CHOICE, *values])
        return changes

    @staticmethod
    def random_seed() -> int:
        return random.SystemRandom().randint(0, MAX_PAGE_SEED)

    def random_seeds(self) -> tuple[int, int]:
        return self.random_seed(), self.random_seed()

    # -- the request -----------------------------------------------------------------------------------
    def request(self, model, sampler, steps, num, seed, guidance, precision, attributes, *,
                kind: str = "generate") -> tuple[ModelEntry, Pipeline, SamplingRequest]:
        """The inputs the tabs share, checked; then the model's pipeline (loaded once) and one validated
        SamplingRequest (UserError naming the input that is wrong)."""
        entry = self.entry(model)
        sampler = check_choice(sampler, SAMPLERS, "sampler")
        steps = check_int(steps, "steps", 1, min(MAX_STEPS, entry.max_sampling_steps))
        num_name, fewest, seed_name = NAMES[kind]
        num = check_int(num, num_name, fewest, MAX_IMAGES)
        seed = check_int(seed, seed_name, 0, MAX_PAGE_SEED)
        guidance = check_number(guidance, "guidance scale", 0, MAX_GUIDANCE, " (1 = no guidance)")
        precision = check_choice(precision, SAMPLING_PRECISIONS, "precision")
        known = {a: entry.cfg.model.vocab[a] for a in entry.cfg.model.attributes}
        wanted = check_attributes(entry.label, known, self.attribute_names, attributes)
        pipe = self.pipeline(entry)
        fp32 = resolve_precision(precision, pipe.device) == "fp32"
        request = SamplingRequest(num=num, seed=seed, sampler=sampler, steps=steps, precision=precision,
                                  runtime=self.runtime if fp32 else "plain",
                                  guidance=guidance if pipe.conditional else 1.0,   # the hidden slider means nothing
                                  attributes=wanted, batch_size=MAX_IMAGES)
        return entry, pipe, request.validate(pipe)

    # -- sampling ----------------------------------------------------------------------------------------
    def arm(self, token=None) -> str:
        """The job token of a page session's tab (a fresh one the first time), cleared of an earlier cancel:
        the runs started under it can be stopped by `cancel(token)`."""
        return self.jobs.arm(token)

    def cancel(self, token=None) -> Outputs:
        """Set the stop flag of the runs started under `token`, running or still queued (each handler then
        ends with the status "Stopped.")."""
        self.jobs.cancel(token)
        return {}

    def follow(self, job: Job, show: Callable, status: str) -> Iterator[Outputs]:
        """Yield what each event shows (ticks change nothing) until the job ends; returns the images, or
        None when the job was cancelled (after yielding `status` "Stopped.")."""
        with contextlib.closing(job.events()) as events:        # closed early (a client's cancel): job stops
            for event in events:
                if event.kind == "tick":
                    yield {}
                elif event.kind == "preview":
                    yield show(event)
                elif event.kind == "cancelled":
                    yield {status: out.STOPPED}
                    return None
                elif event.kind == "error":
                    raise event.error
                else:
                    return event.images
        return None

    def limits(self) -> str:
        return (f"Limits: 1 to {MAX_IMAGES} images, 1 to {MAX_STEPS} steps, guidance 0 to {MAX_GUIDANCE:g}; photos "
                f"up to {MAX_BYTES // 2**20} MB and {MAX_PIXELS // 10**6} megapixels; {self.concurrency_limit} "
                "generation(s) or edit(s) at a time, the others wait in a queue.")


class FaceGenerator:
    """The Generate tab: `generate` reads INPUTS (then the attribute dropdowns and the job token) and yields
    OUTPUTS; built on its FaceApp (the request checks, pipelines, jobs and folders)."""

    kind = "generate"
    INPUTS = GENERATE_INPUTS
    OUTPUTS = out.GENERATE_OUTPUTS

    def __init__(self, app: FaceApp):
        self.app = app

    def generate(self, model, sampler, steps, num, seed, guidance=1.0, precision="auto", *attributes,
                 token: str | None = None) -> Iterator[Outputs]:
        """Yields outputs by name (out.GENERATE_OUTPUTS): every few steps the preview shows the current
        clean-image estimates as one picture; at the end the grid, the faces with their seeds, the denoising
        strip of face 0 and the status. `attributes`: one value per name in `attribute_names` ('any' or left
        out: not asked for). `token`: the name under which `cancel` finds this run."""
        entry, pipe, request = self.app.request(model, sampler, steps, num, seed, guidance, precision, attributes)
        scale = out.display_scale(pipe.codec.image_size)
        strip = DenoisingStrip(stage_steps(pipe, request), 1)
        steps, size = sum(strip.stages), pipe.codec.image_size
        cleared = []

        def show(event) -> Outputs:
            first = {} if cleared else {"gallery": None, "grid_file": None, "seeds": "", "strip": None}
            cleared.append(True)                                # the last run's outputs go at the first preview
            # a cascade's stage-1 previews are smaller: shown at the final size
            return {**first, "preview": out.enlarge(make_grid(enlarge(event.images, size)), scale),
                    "status": out.preview_status(event.step, steps)}

        start = time.perf_counter()
        job = self.app.jobs.start(Job(self.kind, steps, sampling_with_strip(pipe, request, strip),
                                  threads=self.app.threads), token)
        images = yield from self.app.follow(job, show, "status")
        if images is not None:
            yield self._faces(entry, pipe, request, images, strip, time.perf_counter() - start)

    def _faces(self, entry, pipe, request, images, strip, seconds) -> Outputs:
        scale = out.display_scale(pipe.codec.image_size)
        grid = str(out.save_grid(images, self.app.out_dir, request.seed, scale))
        gallery = [(out.enlarge(img, scale), f"seed {request.seed} · image {i}") for i, img in enumerate(images)]
        return {"preview": grid, "gallery": gallery, "grid_file": grid,
                "seeds": out.seeds_text(entry, request, scale), "strip": out.enlarge(strip.picture(), scale),
                "status": out.generate_status(request, seconds, pipe.conditional)}


class Interpolator:
    """The Interpolate tab: faces along the path between two seeds' starting noise; built on its FaceApp."""

    kind = "interpolate"
    INPUTS = INTERPOLATE_INPUTS
    OUTPUTS = out.INTERPOLATE_OUTPUTS

    def __init__(self, app: FaceApp):
        self.app = app

    def interpolate(self, model, sampler, steps, num, seed_a, seed_b, guidance=1.0, precision="auto",
                    *attributes, token: str | None = None) -> Iterator[Outputs]:
        """Yields outputs by name (out.INTERPOLATE_OUTPUTS): faces along the spherical path between the
        starting noise of two seeds, as one row."""
        entry, pipe, request = self.app.request(model, sampler, steps, num, seed_a, guidance, precision, attributes,
                                            kind=self.kind)
        seed_b = check_int(seed_b, "seed B", 0, MAX_PAGE_SEED)
        scale, nrow = out.display_scale(pipe.codec.image_size), request.num

        def work(callback):
            return interpolate(pipe, seed_b, request, progress=False, callback=callback)

        def show(event) -> Outputs:
            return {"row": out.enlarge(make_grid(event.images, nrow=nrow), scale),
                    "interpolate_status": out.preview_status(event.step, request.steps, generating=False)}

        start = time.perf_counter()
        job = self.app.jobs.start(Job(self.kind, request.steps, work, threads=self.app.threads), token)
        images = yield from self.app.follow(job, show, "interpolate_status")
        if images is not None:
            yield {"row": out.enlarge(make_grid(images, nrow=nrow), scale),
                   "interpolate_status": out.interpolate_status(request, seed_b, time.perf_counter() - start)}
