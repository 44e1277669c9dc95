"""Stopping a run cleanly: Ctrl-C (SIGINT), SIGTERM (the signal with which Slurm, Kubernetes and `docker stop`
end a job) or SIGHUP (the terminal or SSH session closed). The first one finishes the step, saves a checkpoint and stops; a second one quits
at once (KeyboardInterrupt).

    with Interrupt() as interrupt:
        while ...:
            if interrupt.requested: ...
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())   # + a closed terminal


def signal_label(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class Interrupt:
    """While active, SIGINT and SIGTERM set `requested` instead of ending the process (the second one
    raises KeyboardInterrupt). Signal handlers can only be set on the main thread: elsewhere it does nothing."""

    def __init__(self):
        self.requested = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def handle(self, signum, frame) -> None:
        """The first signal asks for a stop after this step; the second stops at once."""
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        label = signal_label(signum)
        print(f"\ninterrupted ({label}): saving a checkpoint after this step ({label} again to quit at once)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
