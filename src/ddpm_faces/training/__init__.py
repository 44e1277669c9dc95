"""Training: the loop, EMA, learning-rate schedule, checkpoints."""
from .ema import EMA
from .trainer import EarlyStopping, TrainResult, train

__all__ = ["EMA", "EarlyStopping", "TrainResult", "train"]
