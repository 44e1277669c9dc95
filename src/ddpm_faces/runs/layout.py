"""The run folder: the one place that knows what lives where.

    runs/<name>/
        config.yaml                 the run's resolved config
        machines.json               each (re)start: the CPU or GPU, torch, threads and the precision used
        train.lock                  held by the process training it (runs/lock.py)
        checkpoints/step-N/         training state (runs/checkpoints.py), the newest few kept
        export/                     EMA weights + config of the newest checkpoint, and a latent model's
                                    autoencoder.safetensors (runs/weights.py)
        best/                       the same, for the best value of train.best_metric
        samples/step-NNNNNNN.png    fixed-seed sample grids
        tb/                         TensorBoard events
"""
from __future__ import annotations

import re
from pathlib import Path

from ..config import CONFIG_FILE
from ..errors import NOT_RESUMING, RunError, UserError
from ..io import recover_folder

METRICS_FILE = "metrics.json"                # quality numbers beside an export, or in its run folder
WEIGHTS_FILE = "model.safetensors"           # an export's (EMA) weights
EMA_FILE = "ema.safetensors"                 # a checkpoint's EMA weights
CODEC_FILE = "autoencoder.safetensors"       # a latent model's codec, carried by its export
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_step(folder: Path) -> int | None:
    """The N of a checkpoint folder named step-N, else None."""
    m = STEP_DIR.match(Path(folder).name)
    return int(m.group(1)) if m else None


class RunFolder:
    """Paths inside one run folder; creating nothing."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / CONFIG_FILE)
    machines = property(lambda self: self.root / "machines.json")
    export = property(lambda self: self.root / "export")
    best = property(lambda self: self.root / "best")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    samples = property(lambda self: self.root / "samples")
    tensorboard = property(lambda self: self.root / "tb")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step}"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step-{step:07d}.png"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (their state.json written last), oldest first."""
        root = self.checkpoints_dir
        if not root.is_dir():
            return []
        for left in root.glob("step-*.old"):                 # a save interrupted between its two renames
            recover_folder(left.with_name(left.name[:-len(".old")]))
        found = [(step, p) for p in root.iterdir() if (step := checkpoint_step(p)) is not None
                 and (p / "state.json").is_file()]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def has_trained_model(self) -> bool:
        return bool(self.checkpoints()) or self.export.exists()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"


def list_runs(out_dir: str | Path) -> list[str]:
    """Names of the run folders under `out_dir` (those with a config.yaml), sorted."""
    out = Path(out_dir)
    return sorted(p.name for p in out.iterdir() if (p / CONFIG_FILE).is_file()) if out.is_dir() else []


def missing_run_error(run: str, out_dir: str | Path) -> UserError:
    """The one-line error of --resume for a run that is not in `out_dir`, naming the runs that are."""
    runs = list_runs(out_dir)
    there = f"the runs there: {', '.join(runs)}" if runs else "there are no runs there yet"
    return RunError(f"there is no run {run} to continue in {out_dir} ({there}). Check the run name, or start a "
                    "new run", fix=NOT_RESUMING)


def run_of_export(folder: str | Path) -> RunFolder | None:
    """The run whose export/ folder `folder` is, or None (a bundled model, a checkpoint, another folder)."""
    run = RunFolder(Path(folder).parent)
    return run if Path(folder) == run.export else None
