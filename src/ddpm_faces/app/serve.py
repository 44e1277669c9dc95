"""Serving the page: `launch` (one server, quiet, behind the request guard) and `serve` (what
`ddpm-faces serve` runs: discover the models, build the page, serve until SIGINT or SIGTERM, then remove the
server's temporary files).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import gradio as gr
from starlette.middleware import Middleware

from ..errors import UserError
from ..io import PipeSafe, process_alive
from ..pipeline import default_threads
from .guard import MAX_BODY, MAX_UPLOAD, RequestGuard
from .handlers import FaceApp
from .page import CSS, THEME_FONTS, build_page

QUEUE_POLL = 0.02                # seconds between Gradio's looks for queued work (see quiet_queue)


def quiet_queue(demo: gr.Blocks) -> None:
    """Make Gradio's queue look for work every QUEUE_POLL seconds instead of every millisecond (and for
    progress every 0.1 s instead of 0.01 s). Its polling wakes the interpreter often enough to slow the
    sampling thread by about a third on a 2-core machine busy with other work (GIL handoffs); the cost is at
    most QUEUE_POLL seconds before a queued request starts. A Gradio without these settings is left as it is."""
    q = getattr(demo, "_queue", None)
    for name, least in (("sleep_when_free", QUEUE_POLL), ("progress_update_sleep_when_free", 0.1)):
        if isinstance(getattr(q, name, None), (int, float)):
            setattr(q, name, max(getattr(q, name), least))


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True,
           quiet: bool = False):
    """Start the server (a public share link only when `share` is True); unless `quiet`, print one line with
    its address. Request bodies over MAX_BODY bytes and uploads over MAX_UPLOAD are refused (413). With
    `block`, serve until SIGINT or SIGTERM, then close the server."""
    quiet_queue(demo)
    theme = gr.themes.Default(font=THEME_FONTS, font_mono=["ui-monospace", "monospace"])
    with stop_signals() as stopping:
        result = demo.launch(server_name=host, server_port=port, share=bool(share), prevent_thread_lock=True,
                             show_error=True, quiet=True, theme=theme, css=CSS, max_file_size=MAX_UPLOAD,
                             app_kwargs={"middleware": [Middleware(RequestGuard, demo=demo, max_body=MAX_BODY)]})
        if not quiet:
            where = f"public link {demo.share_url}" if demo.share_url else "no public link; --share makes one"
            say(f"serving on {demo.local_url} ({where})")
        if block:
            stopping.wait()
            demo.close(verbose=False)
    return result


def say(line: str) -> None:
    """Print a line to stdout. A reader that went away (`serve | head -1`, a killed `tee`) is no reason to stop
    serving, nor a failure to start: the line is dropped, and so is what the server prints after it."""
    out = sys.stdout if isinstance(sys.stdout, PipeSafe) else PipeSafe(sys.stdout)
    print(line, file=out, flush=True)


def check_address(host: str, port: int) -> None:
    """UserError naming why the server could not listen on host:port (the port in use, a host that is not an
    address of this machine, a port that needs privileges); nothing when it can. Gradio itself reports every one
    of these as "Cannot find empty port"."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UserError(f"cannot serve on {host}:{port}: {host!r} is not an address or a known host name "
                        f"({getattr(err, 'strerror', None) or err}): pick another --host") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the server itself binds
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(address_error(host, port, err)) from None


def address_error(host: str, port: int, err: OSError) -> str:
    """The one line for a failure to listen on host:port."""
    where = f"cannot serve on {host}:{port}"
    if err.errno == errno.EADDRINUSE:
        return f"{where}: port {port} is in use by another program: pick another --port"
    if err.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges): pick another --port"
    if err.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine: pick another --host"
    return f"{where} ({err.strerror or err}): pick another --host or --port"


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (Ctrl-C, or `kill`) while the block runs, so that the server stops
    and cleans up instead of dying; outside the main thread, an event nothing sets."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(checkpoints: list[str] | None = None, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          threads: int | None = None, runs_dir: str | Path = "runs", concurrency_limit: int = 1,
          runtime: str = "plain") -> None:
    """`ddpm-faces serve`: discover the models, build the page, serve it until SIGINT or SIGTERM. Its temporary
    files (the grid PNGs and Gradio's cache) live in one folder, removed when the server stops."""
    import torch

    check_address(host, port)                                 # before the minutes of loading models
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)      # no line per request Gradio makes to itself
    with stop_signals(), scratch_folder() as scratch:         # a second signal cannot cut the cleanup short
        app = FaceApp.from_paths(checkpoints, runs_dir, threads=threads, concurrency_limit=concurrency_limit,
                                 out_dir=scratch, runtime=runtime)
        try:
            say(f"models: {', '.join(app.models)} (default {app.default}); {threads} torch thread(s)")
            _serve_page(app, host, port, share)
        finally:
            app.close()


SCRATCH_PREFIX = "ddpm-faces-serve-"


def remove_stale_scratch(root: Path) -> list[Path]:
    """Remove the scratch folders (uploads included) of servers that died without cleaning up (kill -9): those
    named after a process that no longer runs. Returns what was removed."""
    removed = []
    for folder in root.glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A temporary folder for the server's files, Gradio's cache included (GRADIO_TEMP_DIR), removed at the
    end with the empty folders Gradio makes in the system's temporary folder."""
    remove_stale_scratch(Path(tempfile.gettempdir()))
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    shared = Path(tempfile.gettempdir()) / "gradio"
    made = [p for p in (shared / "vibe_edit_history", shared) if not p.exists()]
    before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(scratch / "gradio")       # read by Gradio as the page is built
    try:
        yield scratch
    finally:
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before
        shutil.rmtree(scratch, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()                                    # only if empty: another app may use it


def _serve_page(app: FaceApp, host: str, port: int, share: bool) -> None:
    demo = build_page(app)
    try:
        launch(demo, host, port, share)
    except ConnectionError:                     # not the address: a connection (or pipe) that broke
        raise
    except OSError as err:                      # Gradio could not listen after all (another server took the port)
        reason = str(err).split(". ")[0]        # Gradio's advice after its first sentence names its own settings
        raise UserError(f"cannot serve on {host}:{port} ({reason}): pick another --port") from None
    finally:
        demo.close(verbose=False)
