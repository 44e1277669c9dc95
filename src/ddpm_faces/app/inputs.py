"""The web app's limits and the checks of its inputs (no Gradio here).

The HTTP API reaches the handlers with whatever JSON a client sends (the events run with preprocess=False),
so every value is checked for its type and its magnitude before any arithmetic, and an error message quotes
at most QUOTE characters of what was sent; an uploaded image is checked from its header (bytes, format,
pixels) before anything decodes it. Each check raises UserError naming the input.
"""
from __future__ import annotations

import io
import math
import os
import reprlib
from pathlib import PurePath

from PIL import Image

from ..errors import UserError
from ..photos.framing import MAX_BYTES, MAX_PIXELS

MAX_IMAGES = 16
MAX_STEPS = 1000
MAX_GUIDANCE = 20.0
MAX_PAGE_SEED = 2**31 - 1        # a seed the browser's numbers hold exactly (the library takes up to 2**63 - 1)
ANY_CHOICE = "any"               # the dropdown entry of an attribute left to the model
QUOTE = 80                       # characters of a client's value that an error message repeats
MAX_MESSAGE = 400                # characters of any error message sent back

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = QUOTE
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 2


def shorten(text: str, limit: int = QUOTE) -> str:
    """`text` cut to `limit` characters, with "…" where it was cut."""
    return text if len(text) <= limit else text[:limit] + "…"


def quote(value) -> str:
    """How an error message shows a value a client sent: its repr, at most about QUOTE characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"a number of {'-' if value < 0 else ''}about {int(value.bit_length() * math.log10(2))} digits"
    return shorten(_repr.repr(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value, name: str, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi] (a whole float such as 3.0 is taken), or UserError naming the input."""
    whole = f"{name} must be a whole number from {lo} to {hi}, got {quote(value)}"
    if not _is_number(value):
        raise UserError(whole)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise UserError(whole)
        value = int(value)
    if not lo <= value <= hi:                       # ints compare exactly, however large
        raise UserError(f"{name} must be from {lo} to {hi}, got {quote(value)}")
    return value


def check_number(value, name: str, lo: float, hi: float, note: str = "") -> float:
    """`value` as a finite float in [lo, hi], or UserError naming the input."""
    finite = _is_number(value) and (not isinstance(value, float) or math.isfinite(value))
    if not finite or not lo <= value <= hi:         # a huge int compares with floats exactly
        raise UserError(f"{name} must be a number from {lo:g} to {hi:g}{note}, got {quote(value)}")
    return float(value)


def check_choice(value, choices, name: str) -> str:
    """`value` if it is one of `choices` (strings), else UserError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"unknown {name} {quote(value)}: choose one of {', '.join(map(str, choices))}")
    return value


def check_attributes(label: str, known: dict[str, list[str]], names: list[str], values) -> dict[str, str]:
    """The attribute values asked for, by name: `values` are for `names` in order (missing ones are 'any');
    each one not left at 'any' must be in the model's vocabulary `known` ({name: values})."""
    if not isinstance(values, (list, tuple)) or len(values) > len(names):
        count = len(values) if isinstance(values, (list, tuple)) else quote(values)
        raise UserError(f"expected at most {len(names)} attribute values ({', '.join(names) or 'none'}), got {count}")
    wanted = {}
    for name, value in zip(names, values):
        if value in (None, "", ANY_CHOICE):
            continue
        if name not in known:
            having = ", ".join(known) or "no attributes (an unconditional model)"
            raise UserError(f"{shorten(label)} is not conditioned on {name} (it knows {having}): leave {name} "
                            f"at '{ANY_CHOICE}'")
        wanted[name] = check_choice(value, [ANY_CHOICE, *known[name]], name)
    return wanted


def one_line(message: str) -> str:
    """An error message as sent to a client: one line of at most MAX_MESSAGE characters."""
    return shorten(" ".join(str(message).split()), MAX_MESSAGE)


def check_bool(value, name: str) -> bool:
    """`value` if it is true or false (a checkbox), else UserError naming the input."""
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {quote(value)}")
    return value


# ---------------------------------------------------------------------------------------------------
# Uploaded images: checked from the header (bytes, format, pixels) before anything decodes them
# ---------------------------------------------------------------------------------------------------
UPLOAD_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF"}   # a phone's MPO: JPEG


def upload_name(value) -> str:
    """The client's name of an uploaded file (a FileData dict's orig_name), fit for a command line and a
    message: its last part, printable characters only, at most QUOTE of them."""
    name = value.get("orig_name") or value.get("path") if isinstance(value, dict) else value
    name = PurePath(str(name)).name if isinstance(name, (str, PurePath)) else ""
    return shorten("".join(c for c in name if c.isprintable() and c != "`").strip() or "photo.png")


def upload_source(value, what: str) -> str | bytes:
    """What an upload input holds, as a path or bytes: Gradio's FileData dict (whose path Gradio has checked
    to lie in its upload folder before any handler runs), the PNG bytes the mask editor sent ahead, or
    (from Python) a path."""
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return value["path"]
    if isinstance(value, (str, PurePath, bytes)):
        return value if isinstance(value, bytes) else str(value)
    raise UserError(f"{what} must be an uploaded image file, got {quote(value)}")


def open_upload(source: str | bytes, what: str) -> Image.Image:
    """The uploaded image, opened but not decoded, after checking its size in bytes, its format and its
    pixel count (framing.open_photo's limits); UserError naming `what` (e.g. "the photo 'me.jpg'")."""
    try:
        size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
    except OSError:
        raise UserError(f"{what} is no longer on the server: upload it again") from None
    if size > MAX_BYTES:
        raise UserError(f"{what} is larger than {MAX_BYTES // 2**20} MB: give a smaller photo")
    Image.init()                                        # every format plugin, WebP included
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=list(UPLOAD_FORMATS))
    except Image.DecompressionBombError:                # Pillow's own limit, far above ours
        raise UserError(f"{what} has far more than {MAX_PIXELS:,} pixels: resize it first") from None
    except (OSError, ValueError, SyntaxError):
        raise UserError(f"{what} is not an image of a known kind: give a {', '.join(UPLOAD_FORMATS.values())} "
                        "file") from None
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise UserError(f"{what} has {img.width}x{img.height} pixels, more than {MAX_PIXELS:,}: resize it first")
    return img
