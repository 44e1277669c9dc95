"""Framing a photo like the training faces, so that a model can edit it: find the face, widen the box to the
training data's framing, crop a square and resize it.

The framing was measured on 400 train faces of ../shared/data/faces at 128 px with the same detector
(photos/faces.py): the largest box's side is a median 0.984 of the image's side (10-90%: 0.945-1.023),
its centre at (0.480, 0.496) of the width and height. A photo's square crop is therefore the box's side /
0.984, placed so that the box's centre falls at that point.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..data.prepare import to_rgb
from ..errors import CENTRE_SQUARE, NoFace, PhotoError
from .faces import MIN_SCORE, detect_faces

BOX_SIDE = 0.984                 # detector box side / training image side
BOX_CENTRE = (0.480, 0.496)      # where the box's centre sits in a training image (x, y as fractions)
MAX_PIXELS = 40_000_000          # larger images are refused before decoding (decompression bombs)
MAX_BYTES = 50 * 2**20
FIT_SLACK = 0.12                 # a crop moved or shrunk by up to this share of its side to stay inside the photo
DETECT_SIZE = 320                # the photo's longer side for detection: faces of a tenth of it are still found


@dataclass
class Framing:
    image: np.ndarray            # (size, size, 3) uint8, framed like the training faces
    box: tuple[int, int, int, int]   # the crop in the photo's pixels (left, top, right, bottom)
    faces: int                   # faces the detector found (0 with detect=False)
    photo_size: tuple[int, int]  # the photo's (width, height), which a mask must have


def open_photo(path, name: str | None = None) -> Image.Image:
    """An RGB photo with its EXIF rotation applied; one-line PhotoErrors for files that are not usable images,
    and for files too large in bytes or pixels (checked from the header, before decoding). The messages call the
    file `name` (default: its path; an upload's own name where `path` is a temporary copy)."""
    name = path if name is None else repr(name)
    try:
        if os.path.getsize(path) > MAX_BYTES:
            raise PhotoError(f"{name} is larger than {MAX_BYTES // 2**20} MB: give a smaller photo")
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise PhotoError(f"{name} has {img.width}x{img.height} pixels, more than {MAX_PIXELS:,}: resize it "
                                 "first")
            return to_rgb(ImageOps.exif_transpose(img))          # 16-bit greyscale scaled, not clipped white
    except Image.DecompressionBombError:
        raise PhotoError(f"{name} has far more than {MAX_PIXELS:,} pixels: resize it first") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise PhotoError(f"{name} is not an image Pillow can read, or a damaged or cut-off one "
                         f"({type(err).__name__}): give a JPEG or PNG photo") from None


def frame_photo(photo: Image.Image, size: int, detect: bool = True) -> Framing:
    """The photo framed at `size` px: around its largest face, or (detect=False) its centre square."""
    if not detect:
        side = min(photo.size)
        left, top = (photo.width - side) // 2, (photo.height - side) // 2
        box = (left, top, left + side, top + side)
        return Framing(_resize(photo.crop(box), size), box, 0, photo.size)
    boxes = _detect(photo)
    if not boxes:
        raise NoFace("no face found in the photo: use a photo with a frontal face", fix=CENTRE_SQUARE)
    box = fit_box(_crop_box(max(boxes, key=lambda b: b[2] * b[3]), photo.size), photo.size)
    return Framing(_resize(crop_square(photo, box), size), box, len(boxes), photo.size)


def frame_mask(mask: np.ndarray, framing: Framing, size: int) -> np.ndarray:
    """A photo-sized mask of 0/1 (1 = redraw) framed like the photo: the same crop box, a nearest resize to
    `size` (so it stays two-valued). Outside the photo (a box reaching past its edge) is kept (0)."""
    framed = Image.fromarray(mask.astype(np.uint8) * 255).crop(framing.box).resize((size, size), Image.NEAREST)
    return (np.asarray(framed) > 127).astype(np.float32)


def _detect(photo: Image.Image) -> list[tuple[float, float, float, float]]:
    """Face boxes (x, y, w, h) in the photo's pixels, found on a DETECT_SIZE copy of its longer side."""
    scale = DETECT_SIZE / max(photo.size)
    small = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (DETECT_SIZE, DETECT_SIZE))
    canvas.paste(small)
    found = detect_faces(np.asarray(canvas), DETECT_SIZE)
    return [(x / scale, y / scale, w / scale, h / scale) for x, y, w, h, score in found if score >= MIN_SCORE]


def fit_box(box: tuple[int, int, int, int], photo_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The crop square moved or shrunk into the photo where that changes the framing by at most FIT_SLACK of its
    side (a photo that is already a face crop at about the training framing is then used as it is); else
    unchanged (crop_square fills what lies outside by reflection)."""
    left, top, right, bottom = box
    side, (width, height) = right - left, photo_size
    edges = (left, top, right - width, bottom - height)
    if width == height and max(abs(e) for e in edges) <= FIT_SLACK * width:
        return 0, 0, width, height               # a face crop at the training framing already: all of it
    if side > min(width, height):
        if side > (1 + FIT_SLACK) * min(width, height):
            return box
        centre_x, centre_y, side = (left + right) / 2, (top + bottom) / 2, min(width, height)
        left, top = round(centre_x - side / 2), round(centre_y - side / 2)
    new_left, new_top = min(max(left, 0), width - side), min(max(top, 0), height - side)
    if max(abs(new_left - left), abs(new_top - top)) > FIT_SLACK * side:
        return box
    return new_left, new_top, new_left + side, new_top + side


def crop_square(photo: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The photo inside `box`; where the box reaches outside the photo, the photo mirrored at its edges fills it
    (what a wider photo would most likely have shown), never black bands that a model would paint around."""
    left, top, right, bottom = box
    width, height = photo.size
    pad = max(0, -left, -top, right - width, bottom - height)
    if not pad:
        return photo.crop(box)
    pixels = np.pad(np.asarray(photo), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")   # repeats as needed
    return Image.fromarray(pixels).crop((left + pad, top + pad, right + pad, bottom + pad))


def _crop_box(face, photo_size) -> tuple[int, int, int, int]:
    """The square around a face box at the training framing (it may reach outside the photo: fit_box and
    crop_square handle that)."""
    x, y, w, h = face
    side = max(w, h) / BOX_SIDE
    left = x + w / 2 - BOX_CENTRE[0] * side
    top = y + h / 2 - BOX_CENTRE[1] * side
    return round(left), round(top), round(left + side), round(top + side)


def _resize(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(img.resize((size, size), Image.BICUBIC, reducing_gap=3.0), dtype=np.uint8)
