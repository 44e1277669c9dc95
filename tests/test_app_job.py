"""Sampling jobs without a server: previews arrive, Cancel stops the worker within a step, errors surface as
events, a finished job hands over its images, the registry finds jobs by token, and no thread is left over."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from ddpm_faces.app.job import Job, Jobs
from ddpm_faces.pipeline import SamplingRequest, generate

SIDE = 8


def stepping(steps: int, pause: float = 0.0, fail_at: int | None = None):
    """A stand-in sampler: calls the callback once a step with a fake estimate, then returns uint8 images."""
    def work(callback):
        x0 = torch.zeros(2, 3, SIDE, SIDE)
        for i in range(steps):
            if i == fail_at:
                raise RuntimeError(f"broken at step {i}")
            time.sleep(pause)
            callback(i, steps - i, x0, x0 + i / steps)
        return np.full((2, SIDE, SIDE, 3), 7, np.uint8)
    return work


def job_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ddpm-faces-")]


@pytest.fixture(autouse=True)
def no_thread_left():
    yield
    end = time.monotonic() + 10
    while job_threads() and time.monotonic() < end:
        time.sleep(0.01)
    assert not job_threads(), "a sampling thread outlived its job"


def test_previews_arrive_then_done_with_the_images():
    job = Job("generate", 20, stepping(20, pause=0.01), previews=5).start()
    events = [e for e in job.events(tick=0.05) if e.kind != "tick"]
    previews, last = events[:-1], events[-1]
    assert previews and all(e.kind == "preview" for e in previews)
    assert [e.step for e in previews] == sorted(e.step for e in previews) and previews[-1].step < 20
    assert previews[0].images.shape == (2, SIDE, SIDE, 3) and previews[0].images.dtype == np.uint8
    assert last.kind == "done" and (last.images == 7).all()
    assert job.join(5) and job.record.outcome == "done" and job.record.steps_done == 20


def test_cancel_stops_the_worker_within_a_step():
    job = Job("generate", 100_000, stepping(100_000, pause=0.002)).start()
    events = job.events(tick=0.05)
    first = next(e for e in events if e.kind == "preview")
    job.cancel()
    at_cancel = job.record.steps_done
    rest = list(events)
    assert job.join(5)
    assert rest[-1].kind == "cancelled" and job.record.outcome == "cancelled"
    assert first.step <= at_cancel and job.record.steps_done <= at_cancel + 1     # at most the step under way


def test_closing_the_events_cancels_the_job():
    job = Job("interpolate", 100_000, stepping(100_000, pause=0.002)).start()
    events = job.events(tick=0.05)
    next(events)
    events.close()                                  # what a client's disconnect or Gradio's cancel does
    assert job.join(5) and job.record.outcome == "cancelled"


def test_an_exception_in_the_worker_is_an_error_event():
    job = Job("generate", 10, stepping(10, fail_at=3)).start()
    last = list(job.events(tick=0.05))[-1]
    assert last.kind == "error" and isinstance(last.error, RuntimeError) and "step 3" in str(last.error)
    assert job.join(5) and job.record.outcome == "error" and job.record.steps_done == 3


def test_ticks_while_a_step_takes_long():
    job = Job("generate", 2, stepping(2, pause=0.3)).start()
    kinds = [e.kind for e in job.events(tick=0.05)]
    assert kinds.count("tick") >= 3 and kinds[-1] == "done"


def test_the_registry_cancels_by_token_and_records_runs():
    jobs = Jobs()
    token = jobs.arm()
    job = jobs.start(Job("generate", 100_000, stepping(100_000, pause=0.002)), token)
    while job.record.steps_done == 0:
        time.sleep(0.01)
    assert jobs.active == 1 and jobs.cancel(token) == 1
    assert job.join(5) and job.record.outcome == "cancelled"
    assert jobs.active == 0 and jobs.runs[-1] is job.record
    queued = jobs.start(Job("generate", 10, stepping(10)), token)     # queued before the cancel: stops at once
    assert queued.join(5) and queued.record.outcome == "cancelled" and queued.record.steps_done == 0
    fresh = jobs.start(Job("generate", 10, stepping(10)), jobs.arm(token))     # a new click arms it again
    assert fresh.join(5) and fresh.record.outcome == "done"
    assert [r.outcome for r in jobs.runs] == ["cancelled", "cancelled", "done"]
    assert jobs.cancel(None) == 0 and jobs.cancel(12345) == 0


def test_stop_all_ends_every_worker():
    jobs = Jobs()
    started = [jobs.start(Job("generate", 100_000, stepping(100_000, pause=0.002))) for _ in range(3)]
    jobs.stop_all(timeout=5)
    assert all(not job.thread.is_alive() and job.record.outcome == "cancelled" for job in started)


def test_a_job_runs_generate_and_gives_its_images(tiny_pipeline):
    request = SamplingRequest(num=3, seed=4, sampler="ddim", steps=8)
    job = Job("generate", 8, lambda callback: generate(tiny_pipeline, request, progress=False, callback=callback),
              previews=4).start()
    events = [e for e in job.events(tick=0.05) if e.kind != "tick"]
    assert [e.kind for e in events][-1] == "done" and any(e.kind == "preview" for e in events)
    side = tiny_pipeline.codec.image_size
    assert events[0].images.shape == (3, side, side, 3)
    assert np.array_equal(events[-1].images, generate(tiny_pipeline, request, progress=False))
