"""The optimizer's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from sfttrain.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; weight decay only on matrices (not biases or norm weights)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    """transformers' warm-up + cosine/linear/constant schedules (LambdaLR; state saves as plain data)."""
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        config.lr_scheduler_type
    ]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


__all__ = ["lr_schedule", "param_groups"]
