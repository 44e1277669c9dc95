"""The web app behind `ddpm-faces serve`: a Gradio page that generates faces with a live preview, and edits
photos.

    from ddpm_faces.app import FaceApp, build_page, launch
    app = FaceApp.from_paths(None)              # the bundled model(s) and the exports under runs/
    launch(build_page(app), port=7860)          # http://127.0.0.1:7860, no public link

    models.py    which models to offer, and their model card
    inputs.py    the limits and the checks of every input (the HTTP API can send anything)
    job.py       a sampling run in a worker thread: its stop flag, its events, the registry of runs
    outputs.py   the outputs by name, pictures, status lines, the command that reproduces a grid
    handlers.py  FaceApp: the state and the handlers (plain Python)
    edit.py      the "Edit a photo" tab's handlers: the uploaded photo, the painted mask, the edit job
    page.py      the gr.Blocks layout and the event wiring
    guard.py     the request-size guard in front of Gradio's routes
    serve.py     launch and serve
"""
from .handlers import FaceApp
from .inputs import MAX_GUIDANCE, MAX_IMAGES, MAX_PAGE_SEED, MAX_STEPS
from .job import Job, Jobs, RunRecord
from .models import ModelEntry, discover_models, model_card
from .page import build_page
from .serve import launch, serve

__all__ = ["FaceApp", "MAX_GUIDANCE", "MAX_IMAGES", "MAX_PAGE_SEED", "MAX_STEPS", "Job", "Jobs", "RunRecord",
           "ModelEntry", "discover_models", "model_card", "build_page", "launch", "serve"]
