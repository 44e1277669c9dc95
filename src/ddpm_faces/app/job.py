"""Sampling jobs: `generate`, `interpolate` or an edit (`generate` with an EditPlan) in a worker thread, with a stop flag of their own and a queue of
events for whoever shows the progress (no Gradio here).

    job = Job("generate", steps, lambda callback: generate(pipe, request, callback=callback)).start()
    for event in job.events():          # preview ... (tick while nothing happens), then done/cancelled/error
        ...
    job.cancel()                        # from any thread: the sampler stops at its next step

`Jobs` is the app's registry: the running jobs by token (so that a Cancel button can find the job it
started), the tokens cancelled before their job began, and a record of every finished run.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..images import to_uint8

PREVIEWS = 10                    # live previews per run (one every steps / PREVIEWS steps)
TICK = 0.25                      # seconds: the longest `events` waits before it yields a tick


class Cancelled(Exception):
    """Raised inside the sampler's step callback to stop a run."""


@dataclass(frozen=True)
class Event:
    kind: str                             # preview, tick, done, cancelled, error
    step: int = 0                         # preview: steps done so far
    images: np.ndarray | None = None      # preview: the current estimates; done: the result (uint8)
    error: BaseException | None = None    # error: what the worker raised


@dataclass
class RunRecord:
    """One run: how far it got and how it ended."""
    kind: str
    steps: int
    steps_done: int = 0
    outcome: str = "running"              # done, cancelled, error
    seconds: float = 0.0


class Job:
    """`work(callback)` in a daemon thread; `callback(i, t, x_i, x0)` is what the sampler calls each step."""

    def __init__(self, kind: str, steps: int, work: Callable, *, previews: int = PREVIEWS,
                 threads: int | None = None, on_end: Callable[[Job], None] | None = None):
        self.record = RunRecord(kind, steps)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"ddpm-faces-{kind}", daemon=True)
        self.on_end = on_end                      # called in the worker when it ends, before the last event
        self._work, self._threads = work, threads
        self._every = max(1, round(steps / max(1, previews)))
        self._events: queue.Queue[Event] = queue.Queue()

    def start(self) -> Job:
        self.thread.start()
        return self

    def cancel(self) -> None:
        """Stop at the next step (or before the first, if the job has not begun)."""
        self.stop.set()

    @property
    def finished(self) -> bool:
        return self.record.outcome != "running"

    def callback(self, i: int, t, x_i, x0) -> None:
        if self.stop.is_set():
            raise Cancelled()
        self.record.steps_done = i + 1
        if i % self._every == 0 and i < self.record.steps - 1:      # the last estimate is the result itself
            self._events.put(Event("preview", step=i + 1, images=to_uint8(x0)))

    def _run(self) -> None:
        if self._threads:
            import torch
            torch.set_num_threads(self._threads)
        start = time.perf_counter()
        try:
            event = Event("done", images=self._work(self.callback))
        except Cancelled:
            event = Event("cancelled")
        except BaseException as err:                # handed over to whoever follows the events
            event = Event("error", error=err)
        self.record.seconds = time.perf_counter() - start
        self.record.outcome = event.kind
        if self.on_end is not None:
            self.on_end(self)
        self._events.put(event)

    def events(self, tick: float = TICK) -> Iterator[Event]:
        """Previews (only the newest when several wait), a tick every `tick` seconds without news, then one
        done, cancelled or error event. Closing this iterator early cancels the job."""
        try:
            while True:
                try:
                    event = self._events.get(timeout=tick)
                except queue.Empty:
                    yield Event("tick")
                    continue
                while event.kind == "preview" and not self._events.empty():
                    event = self._events.get()
                yield event
                if event.kind != "preview":
                    return
        finally:
            self.cancel()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker; True when it has ended."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


class Jobs:
    """The running jobs by token, the cancelled tokens, and the finished runs' records.

    A token names what one Cancel button stops: `arm(token)` before a run is queued clears an earlier cancel,
    `cancel(token)` stops the token's running jobs and also those that start later under it (they were queued
    before the cancel), until the token is armed again."""

    def __init__(self, keep: int = 1000):
        self.runs: collections.deque[RunRecord] = collections.deque(maxlen=keep)     # the newest last
        self._lock = threading.Lock()
        self._running: dict[str, list[Job]] = {}
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._keep = keep

    @property
    def active(self) -> int:
        """Jobs whose worker is still running."""
        with self._lock:
            return sum(len(jobs) for jobs in self._running.values())

    def arm(self, token=None) -> str:
        """`token` (a fresh one unless it is a non-empty string), no longer cancelled."""
        token = token if isinstance(token, str) and token else uuid.uuid4().hex
        with self._lock:
            self._cancelled.pop(token, None)
        return token

    def start(self, job: Job, token: str | None = None) -> Job:
        """Start `job` under `token` (a fresh one if None); it stops before its first step if the token is
        cancelled. Sets `job.on_end`."""
        token = token if isinstance(token, str) and token else uuid.uuid4().hex
        with self._lock:
            if token in self._cancelled:
                job.cancel()
            self._running.setdefault(token, []).append(job)
        job.on_end = lambda finished: self._ended(token, finished)
        return job.start()

    def _ended(self, token: str, job: Job) -> None:
        with self._lock:
            jobs = self._running.get(token, [])
            if job in jobs:
                jobs.remove(job)
            if not jobs:
                self._running.pop(token, None)
            self.runs.append(job.record)

    def cancel(self, token) -> int:
        """Stop the jobs running under `token`, and those that start under it until it is armed again;
        returns how many were running."""
        if not isinstance(token, str) or not token:
            return 0
        with self._lock:
            jobs = list(self._running.get(token, []))
            self._cancelled[token] = None
            self._cancelled.move_to_end(token)
            while len(self._cancelled) > self._keep:
                self._cancelled.popitem(last=False)
        for job in jobs:
            job.cancel()
        return len(jobs)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Cancel every running job and wait for their workers (a thread inside torch must not outlive the
        interpreter)."""
        with self._lock:
            running = [job for jobs in self._running.values() for job in jobs]
        for job in running:
            job.cancel()
        for job in running:
            job.join(timeout)
