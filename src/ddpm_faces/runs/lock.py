"""One trainer per run folder: an operating-system lock on runs/<name>/train.lock while a run trains.

    with RunLock(RunFolder("runs/faces64")):     # UserError naming the holder if another process trains it
        ...

The lock is flock(2) on a file the holder keeps open, so the kernel drops it when the holder ends in any
way, kill -9 included: a stale lock cannot remain. The file itself stays behind (deleting it would let two
processes lock two different files of the same name); while held it records the holder's pid and command
line, which a refused process names. A forked child inherits the open file and so holds the lock too, until
it ends. Where the file system offers no locks, the run goes on unguarded, with a warning.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from ..errors import OTHER_NAME, RunError, UserError
from .layout import RunFolder

LOCK_FILE = "train.lock"
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}       # file systems without flock support
log = logging.getLogger("ddpm_faces.runs")


def lock_path(run: RunFolder) -> Path:
    return run.root / LOCK_FILE


def command_line() -> list[str]:
    """This process's command line (its arguments, as `ps` shows them)."""
    try:
        raw = Path("/proc/self/cmdline").read_bytes()
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    except OSError:
        return [sys.executable, *sys.argv]


def holder_record() -> str:
    """What the lock file says while this process holds it (JSON: pid and command line)."""
    return json.dumps({"pid": os.getpid(), "command": command_line()}) + "\n"


def read_holder(path: Path) -> tuple[int | None, list[str]]:
    """(pid, command line) recorded in a lock file; (None, []) when it holds no record (yet)."""
    try:
        record = json.loads(path.read_text(errors="replace"))
        return int(record["pid"]), [str(arg) for arg in record.get("command", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return None, []


def describe_holder(path: Path) -> str:
    """'process 1234 (python -m ddpm_faces train ...)', or a vaguer phrase when the record is missing."""
    pid, command = read_holder(path)
    if pid is None:
        return "another process (which has not recorded itself yet)"
    shown = " ".join(shlex.join(command).split())             # one line, even for a `python -c` script
    shown = shown if len(shown) <= 200 else f"{shown[:120]} ... {shown[-75:]}"
    return f"process {pid} ({shown})" if shown else f"process {pid}"


def _same_file(handle, path: Path) -> bool:
    """Whether the open lock file is still the one at `path` (its last holder may have removed it)."""
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except OSError:
        return False


class RunLock:
    """Held from `acquire` (or `with`) to `release`, or until the object is garbage collected (its open file is
    the lock); `acquire` raises UserError when another process holds it."""

    def __init__(self, run: RunFolder):
        self.run, self.path = run, lock_path(run)
        self.file = None

    def acquire(self) -> RunLock:
        """Take the lock without waiting (creating the run folder if needed): UserError naming the holder if it is
        taken."""
        for _ in range(10):                       # a lock file removed by its last holder meanwhile: open it anew
            self.run.root.mkdir(parents=True, exist_ok=True)
            # unbuffered "a+b": the holder's record stays until we hold it, and a failed write leaves nothing pending
            handle = open(self.path, "a+b", buffering=0)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise self.taken() from None
            except OSError as err:
                handle.close()
                if err.errno not in NO_LOCKS:
                    raise
                log.warning("the file system of %s has no file locks: nothing stops a second trainer on this run",
                            self.run.root)
                return self
            if _same_file(handle, self.path):
                break
            handle.close()
        else:
            raise UserError(f"{self.path} keeps being replaced by other processes: train another run name")
        self.file = handle
        try:
            self.record(holder_record())
        except OSError:
            pass                                  # a full disk: the lock holds, without a record of its holder
        return self

    def taken(self) -> UserError:
        """The error for a run that another process trains."""
        holder = describe_holder(self.path)
        return RunError(f"{self.run.root} is being trained by {holder}: one run folder takes one trainer. Wait for "
                        "it to end, stop it (Ctrl-C or kill: it saves a checkpoint), or train another run name",
                        fix=OTHER_NAME)

    def record(self, text: str) -> None:
        """Replace the lock file's content (only while holding the lock)."""
        self.file.truncate(0)
        self.file.write(text.encode())

    def release(self) -> None:
        """Clear the record and drop the lock (closing the file drops it). A run folder that holds nothing but the
        lock (a `train` that failed before writing anything) is removed with it, so failed commands leave no
        folders behind."""
        if self.file is None:
            return
        try:
            self.record("")
            if self.run.root.is_dir() and [p.name for p in self.run.root.iterdir()] == [self.path.name]:
                self.path.unlink()                # still held: a waiting acquire sees the file gone and retries
                self.run.root.rmdir()
        except OSError:
            pass                                  # a full disk cannot stop the release
        self.file.close()
        self.file = None

    @property
    def held(self) -> bool:
        return self.file is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
