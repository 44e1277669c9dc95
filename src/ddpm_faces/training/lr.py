"""Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, max_steps, min_lr_ratio))
