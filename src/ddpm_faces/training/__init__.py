"""Training: the loop (trainer.py), the run between steps and its events (run.py), the loss of a batch
(step.py), validation, sample quality and early stopping (monitors.py), resuming (resume.py), Ctrl-C and
SIGTERM (interrupt.py), EMA (ema.py) and the learning-rate schedule (lr.py). Checkpoints and exports on disk
are ddpm_faces.runs."""
from .ema import EMA
from .monitors import EarlyStopping
from .step import diffusion_step
from .trainer import TrainResult, train

__all__ = ["EMA", "EarlyStopping", "TrainResult", "diffusion_step", "train"]
