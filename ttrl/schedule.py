"""The learning-rate schedule (pure), as the official TTRL scripts run it through verl: a linear
warm-up from 0, then constant or a half cosine to 0 at the last step. It steps once per rollout
batch, however many optimizer steps the batch takes (verl steps it once per actor update)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; use constant or cosine")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_ratio: float,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(warmup_ratio * total_steps)  # verl: int(lr_warmup_steps_ratio * total_training_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, schedule))
