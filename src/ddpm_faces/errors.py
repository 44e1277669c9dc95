"""The errors that reach the user as a single line, and their kinds.

A library error names the problem and the facts (`UserError.facts`). Where the remedy depends on where the user
is (a command-line flag, a box on the web page), the library names the remedy (`fix`) and never words it:
each edge words it in one place, `cli.FIXES` and `app.page.FIXES`, with the error's facts. The message reads
whole without it, so an edge that has no wording for a fix adds nothing.

    raise NoFace("no face found in the photo: use a photo with a frontal face", fix=CENTRE_SQUARE)
    err.worded({CENTRE_SQUARE: ", or --no-detect to take the photo's centre square"})
"""
from __future__ import annotations

from collections.abc import Mapping

# Remedies an edge words its own way (cli.FIXES, app.page.FIXES); the facts each one's wording may use
RESUME = "resume"                  # continue the run (facts: run_dir)
NEW_RUN = "new_run"                # start another run under a new name, or continue this one (run_dir)
OTHER_NAME = "other_name"          # train under another run name
RESUME_AS_SAVED = "resume_as_saved"    # continue with the run's own config (saved)
NOT_RESUMING = "not_resuming"      # start a new run instead of continuing one
CACHE_ELSEWHERE = "cache_elsewhere"    # put the data cache on another disk (env)
CPU_DEVICE = "cpu_device"          # run on the CPU
CENTRE_SQUARE = "centre_square"    # skip face detection and take the photo's centre square
WITHOUT_DETECTOR = "without_detector"  # go on without the face detector (the face rate off, or no detection)
OTHER_MODEL = "other_model"        # name a run, export or checkpoint folder
RUN_LONGER = "run_longer"          # raise the step limit (run_dir, steps)
MORE_PATIENCE = "more_patience"    # raise the early-stopping patience (run_dir, patience)
OTHER_OUT_DIR = "other_out_dir"    # write runs to another folder


class UserError(Exception):
    """Bad input from the user: the message names the problem and, where it does not depend on the edge, the fix.

    The command line prints ``error: <message>`` and exits with status 2 instead of a traceback; the web page
    shows it as the tab's error. Line breaks in the message (from user input echoed back) are shown as \\n so
    the message stays one line.
    """

    def __init__(self, message: str, *, fix: str | None = None, **facts):
        super().__init__(message)
        self.fix, self.facts = fix, facts

    def __str__(self) -> str:
        text = super().__str__()
        return text.replace("\r", "\\r").replace("\n", "\\n")

    def worded(self, fixes: Mapping[str, str]) -> str:
        """The one line an edge shows: the message, then the edge's wording of the fix (formatted with the
        facts), if it has one."""
        hint = fixes.get(self.fix) if self.fix else None
        if hint is None:
            return str(self)
        return str(self) + hint.format(**self.facts).replace("\r", "\\r").replace("\n", "\\n")


# The kinds, to catch by type rather than by text
class RunError(UserError):
    """A training run folder that cannot be used as asked: missing, locked, finished, or of another setting."""


class ModelNotFound(UserError):
    """No model (run, export, checkpoint or bundled name) where one was asked for, or a part of one missing."""


class PhotoError(UserError):
    """A photo (or mask) that cannot be used: not an image, too large, damaged."""


class NoFace(PhotoError):
    """The face detector found no face in the photo."""


class MissingPackage(UserError):
    """An optional package a feature needs is not installed (facts: package)."""


class CacheError(UserError):
    """The data cache cannot be written: a full disk or a read-only folder (facts: env)."""


class DeviceError(UserError):
    """The device asked for does not exist on this machine."""
