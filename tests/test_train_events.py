"""The training step and each event of a run, one at a time, without a training loop: a Run is set up on a
tiny model and the real face data with a recording TensorBoard writer, and each test drives one method."""
from __future__ import annotations

import json
import signal
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import tiny_overrides
from ddpm_faces.config import load_config
from ddpm_faces.data import load_batch, prepare_dataset
from ddpm_faces.diffusion import diffusion_loss
from ddpm_faces.errors import UserError
from ddpm_faces.models import Codec
from ddpm_faces.models.conditioning import UNSPECIFIED
from ddpm_faces.pipeline import Pipeline, build_model
from ddpm_faces.runs import WEIGHTS_FILE
from ddpm_faces.training import diffusion_step
from ddpm_faces.training.interrupt import Interrupt
from ddpm_faces.training.monitors import Validation
from ddpm_faces.training.trainer import make_accelerator, prepare_run


class FakeWriter:
    """Records what a run would send to TensorBoard."""

    def __init__(self):
        self.scalars, self.images, self.closed = defaultdict(list), [], False

    def add_scalar(self, tag, value, step):
        self.scalars[tag].append((step, float(value)))

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.images.append((tag, step, image.shape, dataformats))

    def add_text(self, tag, text, step):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def make_run(tmp_path, face_folder):
    """make_run(**config overrides) -> (Run, FakeWriter) of the tiny config, at step 0."""
    def make(**overrides):
        cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **overrides))
        writer = FakeWriter()
        return prepare_run(cfg, make_accelerator(cfg.train), writer=writer), writer
    return make


def export_step(folder) -> int:
    with safe_open(folder / WEIGHTS_FILE, "pt") as f:
        return int(f.metadata()["step"])


# ---- the step ----------------------------------------------------------------------------------------------------

class HalvingCodec(Codec):
    """A stand-in for a latent codec: x is the image at half the side."""

    def __init__(self, image_size: int):
        super().__init__()
        self.shape, self.image_size = (3, image_size // 2, image_size // 2), image_size

    def encode(self, images):
        return F.avg_pool2d(images, 2)

    def decode(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


@pytest.fixture
def half_pipe(tmp_path, face_folder):
    """(a Pipeline whose 8 px network works on 16 px images through HalvingCodec, the 16 px data)."""
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder, **{
        "data.resolution": 8, "model.resolution": 8, "model.attn_resolutions": "[4]", "model.dropout": 0.0}))
    torch.manual_seed(0)
    pipe = Pipeline(build_model(cfg).eval(), cfg, tmp_path, codec=HalvingCodec(16))
    return pipe, prepare_dataset(face_folder, 16, cache_dir=tmp_path / "cache")


def test_the_step_encodes_through_the_codec_at_the_given_t_and_noise(half_pipe):
    pipe, data = half_pipe
    images = load_batch(data, data.indices("train")[:4])["images"]                      # (4, 3, 16, 16)
    t, noise = torch.tensor([0, 10, 25, 49]), torch.randn(4, *pipe.codec.shape)         # noise in x's shape
    got = diffusion_step(pipe, images, t=t, noise=noise, reduce=False)
    d = pipe.cfg.diffusion
    want = diffusion_loss(pipe.net, pipe.schedule, F.avg_pool2d(images, 2), t, noise, prediction=d.prediction,
                          min_snr_gamma=d.min_snr_gamma, reduce=False)
    assert got.shape == (4,) and torch.equal(got, want)
    assert torch.equal(diffusion_step(pipe, images, t=t, noise=noise), want.mean())


def test_the_step_draws_t_then_noise_when_not_given(half_pipe):
    pipe, data = half_pipe
    images = load_batch(data, data.indices("train")[:4])["images"]
    torch.manual_seed(7)
    drawn = diffusion_step(pipe, images)
    torch.manual_seed(7)
    t = torch.randint(0, pipe.schedule.T, (4,))
    noise = torch.randn(4, *pipe.codec.shape)
    assert torch.equal(drawn, diffusion_step(pipe, images, t=t, noise=noise))


def test_validation_noise_has_the_codecs_shape_and_scores_through_it(half_pipe):
    pipe, data = half_pipe
    cfg = pipe.cfg
    validation = Validation(data, cfg, pipe.codec.shape)
    assert validation.noise.shape == (cfg.train.val_images, 3, 8, 8)
    total = validation(pipe, batch_size=3)
    images = load_batch(data, validation.rows)["images"]
    with torch.no_grad():
        each = diffusion_step(pipe, images, t=validation.t, noise=validation.noise, reduce=False)
    assert float(total) == pytest.approx(float(each.sum()), rel=1e-5)


class Recorder(torch.nn.Module):
    """A network that remembers the labels it was given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, cond=None):
        self.seen.append(cond)
        return x * self.weight


def test_label_dropout_replaces_labels_with_unspecified(tmp_path, face_folder):
    cfg = load_config("quickstart", tiny_overrides(tmp_path, face_folder))
    pipe = Pipeline(Recorder(), cfg, tmp_path)
    images, labels = torch.zeros(64, 3, 16, 16), torch.ones(64, 2, dtype=torch.long)
    diffusion_step(pipe, images, labels=labels, label_dropout=0.0)
    diffusion_step(pipe, images, labels=labels, label_dropout=1.0)
    diffusion_step(pipe, images, labels=labels, label_dropout=0.5)
    kept, dropped, half = pipe.net.seen
    assert torch.equal(kept, labels) and (dropped == UNSPECIFIED).all()
    assert 0.2 < (half == UNSPECIFIED).float().mean() < 0.8
    diffusion_step(pipe, images)
    assert pipe.net.seen[-1] is None                          # unconditional: no labels at all


# ---- the events --------------------------------------------------------------------------------------------------

def test_log_writes_the_means_of_the_interval_and_starts_a_new_one(make_run):
    run, writer = make_run()
    run.step, run.n_logged = 3, 3
    run.loss_sum, run.norm_sum = torch.tensor(0.6), torch.tensor(3.0)
    run.log()
    assert writer.scalars["train/loss"] == [(3, pytest.approx(0.2))]
    assert writer.scalars["train/grad_norm"] == [(3, pytest.approx(1.0))]
    assert {"train/lr", "train/ema_decay", "train/images_per_s"} <= set(writer.scalars)
    assert run.n_logged == 0 and float(run.loss_sum) == 0 and float(run.norm_sum) == 0
    run.step, run.n_logged, run.loss_sum = 6, 3, torch.tensor(float("inf"))
    with pytest.raises(UserError, match="diverged at step 6"):
        run.log()


def test_a_non_finite_step_is_skipped_counted_and_too_many_in_a_row_stop(make_run):
    run, writer = make_run(**{"train.max_bad_steps": 3})
    batches = iter(run.loader)
    batch = next(batches)
    before = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
    batch["images"][0, 0, 0, 0] = float("nan")
    assert run.micro_step(batch) is False                               # the optimizer did not step
    assert all(torch.equal(before[k], v) for k, v in run.raw_model.state_dict().items())
    run.after_step(False)
    assert (run.step, run.skipped, run.bad_in_row) == (0, 1, 1)
    assert writer.scalars["train/skipped_steps"] == [(0, 1.0)]
    run.after_step(run.micro_step(next(batches)))                       # a good step ends the streak
    assert (run.step, run.skipped, run.bad_in_row) == (1, 1, 0)
    run.after_step(False)
    run.after_step(False)
    with pytest.raises(UserError) as err:
        run.after_step(False)
    message = str(err.value)
    assert "3 steps in a row had a non-finite loss" in message and "\n" not in message
    assert "no checkpoint was written yet" in message and run.skipped == 4


def test_validation_is_the_mean_per_image_loss_at_fixed_t_and_noise(make_run):
    run, writer = make_run()
    v = run.validation
    T = run.cfg.diffusion.timesteps
    assert v.size == 8 and torch.equal(v.t, torch.linspace(0, T - 1, 8).round().long())
    images = load_batch(v.data, v.rows)["images"]
    d = run.cfg.diffusion
    want = diffusion_loss(run.ema.model, run.averaged.schedule, images, v.t, v.noise, prediction=d.prediction,
                          min_snr_gamma=d.min_snr_gamma, reduce=False).mean()
    first = run.validation_loss()
    torch.randn(100)                                                    # the global generator does not matter
    assert first == pytest.approx(float(want), rel=1e-5) and run.validation_loss() == first
    run.step = 6
    run.validate()
    assert writer.scalars["val/loss"] == [(6, pytest.approx(first))]


def test_the_best_export_is_written_only_on_an_improvement(make_run):
    run, _ = make_run(**{"train.min_delta": 0.1})
    best = run.folder.best
    for step, value in [(2, 1.0), (4, 2.0), (6, 0.95), (8, 0.5)]:     # 0.95: within min_delta, no improvement
        run.step = step
        run.track_best("val loss", value)
        if step == 2:
            assert export_step(best) == 2
    assert export_step(best) == 8 and run.stopper.best == 0.5
    run.track_best("val loss", None)                                     # no validation images: nothing happens
    assert run.stopper.bad == 0 and not run.stopped_early


def test_early_stopping_after_patience_evaluations_without_improvement(make_run):
    run, _ = make_run(**{"train.patience": 2})
    values = iter([1.0, 1.5, 1.2, 1.1])
    run.validation_loss = lambda: next(values)
    run.validate()
    run.validate()
    assert not run.stopped_early and not run.finished
    run.validate()
    assert run.stopped_early and run.finished and run.stopper.bad == 2


class FakeQuality:
    """Sample-quality metrics from a list, one evaluation per call."""

    def __init__(self, fids):
        self.fids = iter(fids)

    def __call__(self, pipe, accelerator):
        return {"fid": next(self.fids), "kid_mean": 0.01, "precision": 0.5, "recall": 0.5, "face_rate": 0.9}


def test_sample_quality_is_logged_and_with_best_metric_fid_picks_the_best(make_run):
    run, writer = make_run(**{"train.patience": 1})
    run.quality, run.tc.best_metric = FakeQuality([30.0, 20.0, 25.0]), "fid"
    for step in (2, 4, 6):
        run.step = step
        run.measure_quality()
    assert writer.scalars["quality/fid"] == [(2, 30.0), (4, 20.0), (6, 25.0)]
    assert writer.scalars["quality/face_rate"][-1] == (6, 0.9)
    assert run.stopper.best == 20.0 and export_step(run.folder.best) == 4 and run.stopped_early


def test_a_checkpoint_writes_step_n_and_the_export_and_prunes(make_run):
    run, _ = make_run(**{"train.keep_checkpoints": 2})
    for step in (1, 2, 3):
        run.step = step
        run.checkpoint()
    assert [p.name for p in run.folder.checkpoints()] == ["step-2", "step-3"]
    assert export_step(run.folder.export) == 3
    state = json.loads((run.folder.checkpoint(3) / "state.json").read_text())
    assert state["step"] == 3 and state["data"] == {"epoch": 0, "batch": 0}


def test_the_sample_grid_goes_to_the_run_folder_and_tensorboard(make_run):
    run, writer = make_run()
    run.step = 6
    run.save_samples()
    assert run.folder.sample_grid(6).is_file()
    (tag, step, shape, fmt), = writer.images
    assert tag == "samples" and step == 6 and fmt == "HWC" and shape[2] == 3       # 4 images: a 2 x 2 grid
    assert shape[:2] == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)


def test_each_event_runs_at_its_own_steps(make_run):
    run, _ = make_run(**{"train.max_steps": 12, "train.log_every": 3, "train.eval_every": 4,
                         "train.sample_every": 6, "train.checkpoint_every": 5})
    seen = defaultdict(list)
    for name in ("log", "validate", "save_samples", "checkpoint"):
        setattr(run, name, lambda name=name: seen[name].append(run.step))
    for step in range(1, 13):
        run.step = step
        run.run_events()
    assert seen == {"log": [3, 6, 9, 12], "validate": [4, 8, 12], "save_samples": [6, 12], "checkpoint": [5, 10, 12]}
    run.step, run.stopped_early = 13, True                              # stopping early saves a checkpoint
    run.run_events()
    assert seen["checkpoint"][-1] == 13


def test_a_stop_request_saves_one_checkpoint_and_ends_the_run(make_run):
    run, _ = make_run(**{"train.checkpoint_every": 100})
    batches = iter(run.loader)
    run.after_step(run.micro_step(next(batches)))
    assert run.step == 1 and run.folder.checkpoints() == [] and not run.finished
    run.after_step(run.micro_step(next(batches)), stop_asked=True)
    assert run.interrupted and run.finished and [p.name for p in run.folder.checkpoints()] == ["step-2"]
    result = run.finish()
    assert result.interrupted and result.step == 2


def test_sigterm_is_treated_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with Interrupt() as interrupt:
        signal.raise_signal(signal.SIGTERM)
        assert interrupt.requested                                       # first: finish the step, then save
        with pytest.raises(KeyboardInterrupt):                           # second: quit at once
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    with Interrupt() as interrupt:
        signal.raise_signal(signal.SIGINT)
        assert interrupt.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_finish_closes_tensorboard_and_reports(make_run):
    run, writer = make_run()
    result = run.finish()
    assert writer.closed and result.step == 0 and not result.interrupted and result.run_dir == run.folder.root
    assert result.skipped_steps == 0 and result.best is None
