"""Sample-quality metrics: FID, KID, precision/recall on Inception features, and a face rate.

See docs/metrics.md for what each number means and how it was checked.
"""

from ..photos.faces import face_rate, face_scores
from .features import InceptionFeatures, MODEL_SHA256, inception_weights_path, verify_weights
from .metrics import (
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    kid,
    mmd2_unbiased,
    precision_recall,
)
from .reference import evaluate_images, reference_stats

__all__ = [
    "FeatureStats",
    "InceptionFeatures",
    "MODEL_SHA256",
    "evaluate_images",
    "face_rate",
    "face_scores",
    "fid_from_stats",
    "frechet_distance",
    "inception_weights_path",
    "kid",
    "mmd2_unbiased",
    "precision_recall",
    "reference_stats",
    "verify_weights",
]
