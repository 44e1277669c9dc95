"""Atomic writes: a crash never leaves a half-written file or folder under its final name.

    with atomic_folder(Path("runs/x/export")) as tmp:    # fill tmp; renamed to export/ when complete
        ...
    with atomic_file(Path("stats.npz")) as tmp:          # write tmp; renamed to stats.npz when complete
        ...

Both flush to disk before the rename, and both leave what they write readable as the user's umask allows
(some writers, safetensors among them, create files with mode 0600). Replacing a folder takes two renames
(final -> final.old, final.tmp -> final); `recover_folder` repairs a crash between them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

NAME_MAX = 255                   # bytes of one file or folder name on the usual file systems


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_tree(folder: Path, mode: int) -> None:
    """Flush every file and the folder itself; give every file `mode`."""
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)
            _fsync(path)
    _fsync(folder)


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine exists (signal 0 only checks; Windows, and another user's process,
    count as alive)."""
    if os.name == "nt" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def name_bytes(name: str) -> int:
    """The length of a file or folder name as the file system counts it: in bytes."""
    return len(os.fsencode(name))


def sibling(final: Path, ending: str) -> Path:
    """`final` with `ending` added to its name (`export` -> `export.tmp`); where that passes NAME_MAX bytes, the
    name's start, a hash of the whole name, then `ending`: the same for the same `final`, never too long."""
    final = Path(final)
    name = final.name + ending
    if name_bytes(name) <= NAME_MAX:
        return final.with_name(name)
    raw = os.fsencode(final.name)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    keep = NAME_MAX - len(digest) - 1 - name_bytes(ending)
    start = raw[:max(keep, 0)].decode("utf-8", "ignore")      # whole characters only
    return final.with_name(f"{start}~{digest}{ending}")


@contextmanager
def atomic_folder(final: Path):
    """Yield a temporary sibling folder to fill; on success it is flushed to disk and renamed to `final`
    (replacing an older folder of that name); on an exception it is removed and `final` is untouched."""
    final = Path(final)
    tmp = sibling(final, ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _finish_tree(tmp, 0o666 & ~current_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = sibling(final, ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def recover_folder(final: Path) -> bool:
    """Finish an `atomic_folder` replacement that a crash interrupted; True when something was repaired.

    `final.old` exists only once `final.tmp` was complete and flushed, so with `final` missing the new
    folder is `final.tmp`; with `final` present, `final.old` is a leftover."""
    final = Path(final)
    tmp, old = sibling(final, ".tmp"), sibling(final, ".old")
    if not old.is_dir():
        return False
    if not final.exists() and tmp.is_dir():
        os.replace(tmp, final)
    elif not final.exists():
        os.replace(old, final)              # the new folder is gone too: the old one is the last complete one
        return True
    shutil.rmtree(old, ignore_errors=True)
    return True


@contextmanager
def atomic_file(final: Path):
    """Yield a temporary path beside `final` (same suffix) to write; renamed over `final` when the block
    succeeds, removed when it fails."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    names = [f".{final.stem}.{tag}{final.suffix}", f".{tag}{final.suffix}", f".{tag}.tmp"]   # a long name: shorter
    tmp = final.with_name(next(name for name in names if name_bytes(name) <= NAME_MAX))
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        _fsync(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


class PipeSafe:
    """A text stream (stdout, stderr) whose writes stop, silently, once its reader has gone (EPIPE: `| head`, a
    killed `tee`): a closed pipe must not end a training run. The stream's descriptor is then pointed at
    /dev/null, so that the interpreter's last flush does not fail either. Text the stream cannot encode (a file
    name that is not UTF-8, on a terminal whose encoding is strict) is written with escapes (\\xff) instead of
    failing after the work is done."""

    def __init__(self, stream):
        self._stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._gone()
            except UnicodeEncodeError:
                return self.write(escaped(text, getattr(self._stream, "encoding", None) or "utf-8"))
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._gone()

    def _gone(self) -> None:
        self.broken = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def escaped(text: str, encoding: str) -> str:
    """`text` as `encoding` can write it: the bytes of a file name that is not UTF-8 (Python's surrogate escapes)
    as \\xNN, any other character the encoding lacks as a backslash escape."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:                  # a lone surrogate that no file name decodes to
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def trim_oldest(folder: Path, max_bytes: int) -> int:
    """Delete the oldest files under `folder` until it holds at most `max_bytes`; returns the bytes freed."""
    files = []
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file():
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        except OSError:
            continue
    total, freed = sum(size for _, size, _ in files), 0
    for _, size, path in sorted(files, key=lambda f: f[0]):
        if total - freed <= max_bytes:
            break
        try:
            path.unlink()
            freed += size
        except OSError:
            continue
    return freed
