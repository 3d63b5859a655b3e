"""The token-weighted loss over a split of shards: used by the loop's evaluations and by
``sfttrain eval`` (same batches, same weighting, so both report the same number)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class EvalReport:
    """What ``sfttrain eval`` measured: the loss over a split and, with generation, the scores."""

    split: str
    loss: float | None
    """Mean loss per trained token; None without a trained token (JSON has no NaN)."""
    perplexity: float | None
    tokens: int
    """Trained tokens the loss is over."""
    scores: dict[str, float] = field(default_factory=dict)
    """BLEU-4 and ROUGE of the generated replies (``--generate``)."""
    predicted: int | None = None
    """Replies generated (``--generate``)."""
    output: Path | None = None
    """Where the predictions were written."""

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document (and ``predict_results.json``'s figures)."""
        d = {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
             "split": self.split, **self.scores}  # fmt: skip
        return d if self.predicted is None else {**d, "predicted": self.predicted}

    def summary_lines(self) -> list[str]:
        """The figures in words, a line each."""
        loss, ppl = self.loss or float("nan"), self.perplexity or float("nan")
        lines = [f"{self.split}: loss {loss:.4f}, perplexity {ppl:.2f} over {self.tokens:,} "
                 "trained tokens"]  # fmt: skip
        if self.predicted is not None:
            s = self.scores
            lines.append(
                f"{self.split}: {self.predicted:,} replies generated: BLEU-4 {s['bleu-4']:.2f}, "
                f"ROUGE-1 {s['rouge-1']:.2f}, ROUGE-2 {s['rouge-2']:.2f}, "
                f"ROUGE-L {s['rouge-l']:.2f}; predictions in {self.output}/predictions.jsonl"
            )
        return lines


def evaluate_model(
    shards: str, model_spec: str, *, adapter: str | None, split: str | None, batch_size: int,
    attn_implementation: str, allow_unverified: bool, generate_to: Path | None = None,
    max_new_tokens: int = 256, max_samples: int | None = None,
) -> EvalReport:  # fmt: skip
    """``sfttrain eval``: the loss of ``model_spec`` (and ``adapter``) on ``split`` of a shard
    folder (default: validation if it has one, else train); with ``generate_to``, each record's
    last reply generated, scored and written there.

    Raises:
        ShardError, ModelError, CheckpointError, ConfigError: the shards or the model.
    """
    import contextlib

    from sfttrain.checkpoint import verify_before_use
    from sfttrain.data import check_compatible, has_split, open_split
    from sfttrain.loss import LossModel, isolation_for
    from sfttrain.model import load_for_inference

    if split is None:
        split = "validation" if has_split(shards, "validation") else "train"
    reader = open_split(shards, split, verify="full")
    verify_before_use(model_spec, adapter, allow_unverified=allow_unverified)
    model, tokenizer = load_for_inference(
        model_spec, adapter=adapter, attn_implementation=attn_implementation
    )
    check_compatible(reader.index, tokenizer, model, shards_dir=reader.path, model_spec=model_spec)
    isolation = isolation_for(attn_implementation)
    dist = Dist()  # the GPU when there is one (the model comes back on the CPU)
    loss_model = LossModel(model, isolation=isolation).to(dist.device)
    loss, tokens = evaluate(
        loss_model, reader, batch_size=batch_size, dist=dist, autocast=contextlib.nullcontext
    )
    report = EvalReport(
        split=split, loss=loss if tokens else None,
        perplexity=perplexity(loss) if tokens else None, tokens=tokens,
    )  # fmt: skip
    if generate_to is not None:
        from sfttrain.predict import predict, scores, write_predictions

        rows = predict(
            model, tokenizer, reader, max_new_tokens=max_new_tokens, batch_size=batch_size,
            limit=max_samples, device=dist.device,
        )  # fmt: skip
        report.scores = scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
        report.predicted, report.output = len(rows), generate_to
        write_predictions(rows, report.to_dict(), generate_to)
    return report


def eval_due(config: Any, step: int, total_steps: int, steps_per_epoch: int) -> bool:
    """Evaluate now? (the last step's evaluation runs after the loop, once)."""
    if config.eval_strategy == "no" or step >= total_steps:
        return False
    if config.eval_strategy == "epoch":
        return step % steps_per_epoch == 0
    return bool(config.eval_steps) and step % config.eval_steps == 0


__all__ = ["EvalReport", "eval_due", "eval_row", "evaluate", "evaluate_model", "perplexity"]
