"""Exponential moving average of the learned weights, used for validation, samples and export.

One `update` per optimizer step (never per micro-batch). Only parameters are averaged; buffers (which
hold no learned values) are copied. With warmup the decay grows as (1 + n) / (10 + n) up to `decay`, so
early averages are not dominated by the random initialisation.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = [p for p in self.model.parameters()]
        live_params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, live_params, 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
