"""The token-weighted loss over a split of shards: used by the loop's evaluations and by
``sfttrain eval`` (same batches, same weighting, so both report the same number)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sfttrain.data import eval_batches, to_tensors, trained_tokens
from sfttrain.distributed import Dist


@torch.no_grad()
def evaluate(
    loss_model: torch.nn.Module, reader: Any, *, batch_size: int, dist: Dist, autocast: Any
) -> tuple[float, int]:
    """(token-weighted mean loss, trained tokens) over a split; no RNG is consumed (dropout off)."""
    was_training = loss_model.training
    loss_model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dist.device)
    tokens = 0
    batches = eval_batches(
        reader, batch_size, rank=dist.rank, world_size=dist.world_size, pad=dist.world_size > 1
    )
    for rows in batches:
        # A rank out of rows runs row 0 with weight 0: FSDP needs the same forwards on every rank.
        weight = 1.0 if len(rows) else 0.0
        host = reader.get_batch(rows if len(rows) else np.zeros(1, dtype=np.int64))
        if weight:
            tokens += trained_tokens(host["labels"])
        with autocast():
            total += loss_model(**to_tensors(host, dist.device)).double() * weight
    loss_model.train(was_training)
    tokens = int(dist.all_reduce_sum(tokens))
    loss_sum = dist.all_reduce_sum(total.item())
    return (loss_sum / tokens if tokens else float("nan")), tokens


def perplexity(loss: float) -> float:
    """exp(loss), capped where a float overflows (NaN stays NaN: no trained tokens)."""
    return math.exp(min(loss, 700.0))


def eval_row(
    loss_model: torch.nn.Module, reader: Any, *, step: int, epoch: float, batch_size: int,
    dist: Dist, autocast: Any,
) -> dict[str, Any]:  # fmt: skip
    """The ``metrics.jsonl`` row of an evaluation during training."""
    loss, tokens = evaluate(loss_model, reader, batch_size=batch_size, dist=dist, autocast=autocast)
    return {
        "step": step,
        "epoch": epoch,
        "eval_loss": loss,
        "eval_perplexity": perplexity(loss),
        "eval_tokens": tokens,
    }


def eval_due(config: Any, step: int, total_steps: int, steps_per_epoch: int) -> bool:
    """Evaluate now? (the last step's evaluation runs after the loop, once)."""
    if config.eval_strategy == "no" or step >= total_steps:
        return False
    if config.eval_strategy == "epoch":
        return step % steps_per_epoch == 0
    return bool(config.eval_steps) and step % config.eval_steps == 0


__all__ = ["eval_due", "eval_row", "evaluate", "perplexity"]
