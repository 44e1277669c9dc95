"""Real photos: the face detector (faces.py) and the framing of a photo like the training faces (framing.py),
below the pipeline so that the command line, the web page, training monitors and the metrics share them.

    face = frame_photo(open_photo("me.jpg"), 32)        # Framing: the (32, 32, 3) face, its box, faces found
"""
from .faces import face_rate, face_scores, load_detector
from .framing import MAX_BYTES, MAX_PIXELS, Framing, frame_mask, frame_photo, open_photo

__all__ = ["face_rate", "face_scores", "load_detector",
           "MAX_BYTES", "MAX_PIXELS", "Framing", "frame_mask", "frame_photo", "open_photo"]
