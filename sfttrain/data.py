"""Shard rows for the loop: a deterministic, rank-sliced, epoch-shuffled step sampler and batches.

The global order depends only on (seed, epoch, number of rows), never on the number of ranks or
the micro-batch size: optimizer step ``s`` of an epoch always consumes the same ``global_batch``
rows of that epoch's permutation, split into disjoint per-rank slices, each cut into micro-batches.
So micro-batch 1 × accumulation 8 sees the same rows in a step as 8 × 1 (C3) and 2 ranks × 4 (issue
5), and a resume only needs the cursor ``(epoch, step_in_epoch)`` (C4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import IGNORE_INDEX
from sftdata.errors import ConfigError, ShardError


@dataclass(frozen=True)
class Cursor:
    """Where the data stream stands: the next optimizer step to run is ``step_in_epoch`` of ``epoch``."""

    epoch: int = 0
    step_in_epoch: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON form saved in checkpoints."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


class StepSampler:
    """Row indices of each optimizer step for one rank.

    Args:
        num_rows: rows in the training split.
        micro_batch: rows per micro-batch on each rank (``per_device_train_batch_size``).
        accumulation: micro-batches per step on each rank (``gradient_accumulation_steps``).
        seed: seeds every epoch's permutation (``seed`` and ``epoch`` are combined).
        rank, world_size: this process's slice of each step's rows (disjoint across ranks).
        drop_last: drop the last, incomplete step of an epoch instead of running it smaller.
    """

    def __init__(
        self,
        num_rows: int,
        *,
        micro_batch: int,
        accumulation: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_rows = num_rows
        self.micro_batch = micro_batch
        self.accumulation = accumulation
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = micro_batch * accumulation * world_size
        full, rest = divmod(num_rows, self.global_batch)
        self.steps_per_epoch = full if drop_last or rest == 0 else full + 1
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"per_device_train_batch_size: {num_rows} training rows cannot fill one step of "
                f"{self.global_batch} rows with dataloader_drop_last on"
            )
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of all rows in ``epoch`` (the same on every rank)."""
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def step_rows(self, cursor: Cursor) -> np.ndarray:
        """All ranks' rows of the step at ``cursor`` (global order)."""
        g = self.global_batch
        start = cursor.step_in_epoch * g
        return self.permutation(cursor.epoch)[start : start + g]

    def micro_batches(self, cursor: Cursor) -> list[np.ndarray]:
        """This rank's micro-batches (row indices) for the step at ``cursor``.

        A short last step is split evenly across ranks (rank r takes rows r, r+W, ...) and may have
        fewer or smaller micro-batches; the loss is normalised by trained tokens, so that is exact.
        """
        mine = self.step_rows(cursor)[self.rank :: self.world_size]
        return [mine[i : i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]

    def micro_batch_count(self, cursor: Cursor) -> int:
        """Micro-batches EVERY rank runs in the step at ``cursor`` (rank 0 has the most rows)."""
        rows_rank0 = math.ceil(len(self.step_rows(cursor)) / self.world_size)
        return math.ceil(rows_rank0 / self.micro_batch)

    def padded_micro_batches(self, cursor: Cursor) -> tuple[list[np.ndarray], int]:
        """(this rank's micro-batches padded to ``micro_batch_count``, how many are real).

        DDP and FSDP run collectives in every forward/backward, so every rank must run the same
        number of micro-batches or the group hangs. A short last step (e.g. 3 rows on 2 ranks with
        micro-batch 1: rank 0 has 2, rank 1 has 1) is evened out with padding micro-batches that
        re-read the step's first row; the loop multiplies their loss by 0, so they add exactly
        zero gradient and zero trained tokens and the step stays identical to one rank's (C3).
        """
        real = self.micro_batches(cursor)
        pad_rows = self.step_rows(cursor)[:1]
        pad = [pad_rows] * (self.micro_batch_count(cursor) - len(real))
        return real + pad, len(real)

    def advance(self, cursor: Cursor) -> Cursor:
        """The cursor of the next step."""
        nxt = cursor.step_in_epoch + 1
        if nxt >= self.steps_per_epoch:
            return Cursor(cursor.epoch + 1, 0)
        return Cursor(cursor.epoch, nxt)

    def cursor_at(self, step: int) -> Cursor:
        """The cursor after ``step`` optimizer steps from the start."""
        return Cursor(*divmod(step, self.steps_per_epoch))

    def total_steps(self, *, num_train_epochs: float, max_steps: int) -> int:
        """Optimizer steps of the whole run."""
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(num_train_epochs * self.steps_per_epoch))


def to_tensors(batch: dict[str, Any], device: Any = None) -> dict[str, Any]:
    """``ShardReader.get_batch`` output -> int64 torch tensors (``input_ids``, ``labels``, ``position_ids``).

    ``get_batch`` stacks the memory-mapped rows once; ``torch.from_numpy`` wraps that copy without
    another one. int64 because embedding lookups and cross-entropy targets want it.
    """
    import torch

    out = {}
    for key in ("input_ids", "labels", "position_ids"):
        arr = np.ascontiguousarray(batch[key], dtype=np.int64)
        t = torch.from_numpy(arr)
        out[key] = t.to(device, non_blocking=True) if device is not None else t
    return out


def trained_tokens(labels: np.ndarray) -> int:
    """Tokens the (shifted) loss of a label array [B, L] sums over."""
    return int(np.count_nonzero(labels[:, 1:] != IGNORE_INDEX))


def shard_source(path: Any) -> tuple[Path, Callable[[str], Any] | None]:
    """(folder here, fetch) of a shard folder. A URL's index is read into the node-local cache
    now and its shards are fetched into it when first read or fetched ahead (the ranks of a node
    share it: one fetches a file, the others wait), each checked against the index's size and
    sha256; a local folder has no fetch."""
    from sftdata.remote import RemoteFolder, is_url, local_path

    if not is_url(path):
        return local_path(path), None
    remote = RemoteFolder(str(path))
    return remote.path, remote.fetch


def open_split(
    path: Any, split: str, *, verify: bool | str = True, fetch: Callable[[str], Any] | None = None
):
    """A ShardReader for ``split`` of a shard folder (a URL's through :func:`shard_source`),
    refusing an empty split."""
    from sftdata.shards import ShardReader

    if fetch is None:
        path, fetch = shard_source(path)
    reader = ShardReader(path, split=split, verify=verify, fetch=fetch)
    if len(reader) == 0:
        raise ShardError(f"{path}: split {split!r} has no rows")
    return reader


def has_split(path: Any, split: str) -> bool:
    """True if the shard folder (a URL's: its index) has a non-empty ``split``."""
    from sftdata.remote import RemoteFolder, is_url, local_path
    from sftdata.shards import read_index

    splits = (RemoteFolder(str(path)).index if is_url(path) else read_index(local_path(path)))[
        "splits"
    ]
    return split in splits and int(splits[split]["rows"]) > 0


def shards_in_order(reader: Any, sampler: StepSampler, cursor: Cursor, steps: int) -> list[int]:
    """The shards this rank reads in the ``steps`` steps from ``cursor``, in the order it first
    reads them: what a remote folder fetches ahead (a shard no step of this rank reads is never
    fetched). A rank's rows of a step are the step's positions ``rank, rank + W, ...``."""
    order: list[int] = []
    seen: set[int] = set()
    epoch, first, g, w = (
        cursor.epoch,
        cursor.step_in_epoch,
        sampler.global_batch,
        sampler.world_size,
    )
    while steps > 0 and len(seen) < reader.shard_count:
        n = min(sampler.steps_per_epoch - first, steps)
        positions = np.arange(first * g, min((first + n) * g, sampler.num_rows))
        rows = sampler.permutation(epoch)[positions[positions % w == sampler.rank]]
        for k in reader.shards_of(rows):
            if k not in seen:
                seen.add(k)
                order.append(k)
        steps, epoch, first = steps - n, epoch + 1, 0
    return order


def eval_batches(
    reader, batch_size: int, *, rank: int = 0, world_size: int = 1, pad: bool = False
) -> Iterator[np.ndarray]:
    """Row indices of an evaluation pass, in order, this rank's slice only.

    With ``pad``, every rank yields the same number of batches (rank 0 has the most rows); a rank
    that runs out yields EMPTY arrays, for which the caller runs a zero-weight forward (FSDP
    all-gathers parameters in every forward, so all ranks must run the same number).
    """
    n = len(reader) if not isinstance(reader, int) else reader
    rows = np.arange(rank, n, world_size)
    starts = range(0, len(rows), batch_size)
    yield from (rows[s : s + batch_size] for s in starts)
    if pad:
        count = math.ceil(math.ceil(n / world_size) / batch_size)
        for _ in range(count - len(starts)):
            yield rows[:0]


__all__ = [
    "Cursor",
    "StepSampler",
    "check_compatible",
    "eval_batches",
    "has_split",
    "open_split",
    "shard_source",
    "shards_in_order",
    "to_tensors",
    "trained_tokens",
]


def check_compatible(
    index: dict[str, Any], tokenizer: Any, model: Any, *, shards_dir: Path, model_spec: str
) -> None:
    """Refuse shards that were packed for another tokenizer or are longer than the model's context."""
    from sftdata.tokenizer import tokenizer_identity

    want = index["tokenizer"]["sha256"]
    have = tokenizer_identity(tokenizer)["sha256"]
    if want != have:
        raise ConfigError(
            f"{shards_dir / 'index.json'}: shards were packed with tokenizer {index['tokenizer'].get('name')!r} "
            f"(sha256 {want[:12]}…) but model {model_spec} uses {tokenizer_identity(tokenizer)['name']!r} "
            f"(sha256 {have[:12]}…); pack again with --tokenizer {model_spec}"
        )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and index["seq_len"] > max_pos:
        raise ConfigError(
            f"{shards_dir / 'index.json'}: seq_len {index['seq_len']} is longer than the model's "
            f"max_position_embeddings {max_pos}; pack with --seq-len {max_pos} or less"
        )
    vocab = model.get_input_embeddings().num_embeddings
    if index["tokenizer"]["vocab_size"] > vocab:
        raise ConfigError(
            f"{shards_dir / 'index.json'}: tokenizer vocab_size {index['tokenizer']['vocab_size']} "
            f"exceeds the model's {vocab} embeddings"
        )
