"""Run folders, checkpoints and weights on disk: the layout, atomic saves, exports, the bundled models."""
from .checkpoints import load_checkpoint, prune, save_checkpoint, state_tensors
from .layout import (CODEC_FILE, CONFIG_FILE, EMA_FILE, METRICS_FILE, WEIGHTS_FILE, RunFolder, checkpoint_step,
                     list_runs, missing_run_error, run_of_export)
from .weights import (BUNDLED_DIR, DEFAULT_CLASSIFIER, DEFAULT_MODEL, DEFAULT_UPSCALER, ModelFiles, bundled, bundled_folders,
                      codec_key, export_model, find_model, model_name, read_codec, read_weights, tensors_key)

__all__ = [
    "load_checkpoint", "prune", "save_checkpoint", "state_tensors",
    "CODEC_FILE", "CONFIG_FILE", "EMA_FILE", "METRICS_FILE", "WEIGHTS_FILE", "RunFolder", "checkpoint_step", "list_runs",
    "missing_run_error", "run_of_export",
    "BUNDLED_DIR", "DEFAULT_CLASSIFIER", "DEFAULT_MODEL", "DEFAULT_UPSCALER", "ModelFiles", "bundled", "bundled_folders",
    "codec_key", "export_model", "find_model", "model_name", "read_codec", "read_weights", "tensors_key",
]
