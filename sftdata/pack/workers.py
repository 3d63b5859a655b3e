"""The ``num_proc`` worker processes of one pack (encoding, then writing shard files) and the
tasks they run; results come back in task order, so the output never depends on ``num_proc``."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftdata.pack.encode import Chunk, encode_raw, init_worker, read_raw_chunks
from sftdata.pack.options import PackOptions
from sftdata.pack.rows import build_row
from sftdata.shards import ShardWriter

SPILL_IDS, SPILL_MASK = ".spill-ids.bin", ".spill-mask.bin"
"""Tokens and masks of every kept record, spilled in input order inside the work folder."""
SPILL_RIDS, SPILL_SAMPLES = ".spill-record-ids.bin", ".spill-samples.bin"
"""Every kept record's id (UTF-8, back to back), and per sample where its tokens and id are."""
SAMPLE = np.dtype([("start", "<i8"), ("rid", "<i8"), ("rid_len", "<i8")])
"""One entry of ``SPILL_SAMPLES``: token offset, id byte offset, id byte length."""


class Workers:
    """The ``num_proc`` worker processes of one pack, used for encoding and then for writing.

    ``ordered`` runs a function over tasks and yields the results in task order with a bounded
    look-ahead (``Pool.imap`` would read the whole input ahead into its queue), so the output
    never depends on ``num_proc``. With ``num_proc`` 1 the tasks run in this process.
    """

    def __init__(self, opts: PackOptions):
        self.opts = opts
        self._pool: Any = None
        self._old_env: str | None = None
        self._others: frozenset[Any] = frozenset()

    def __enter__(self) -> Workers:
        if self.opts.num_proc > 1:
            import multiprocessing as mp

            # The workers each run one single-threaded tokenizer; this also silences the
            # tokenizers library's fork warning.
            self._old_env = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self._others = frozenset(mp.active_children())  # not ours to stop (see _terminate)
            self._pool = ctx.Pool(
                self.opts.num_proc, initializer=init_worker, initargs=(self.opts,)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            _terminate(self._pool, spare=self._others)
            if self._old_env is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = self._old_env

    def ordered(self, fn: Callable[..., Any], tasks: Iterator[tuple[Any, ...]]) -> Iterator[Any]:
        """``fn(*task)`` for each task, in task order."""
        if self._pool is None:
            for task in tasks:
                yield fn(*task)
            return
        pending: deque = deque()
        for task in tasks:
            pending.append(self._pool.apply_async(fn, task))
            if len(pending) >= 2 * self.opts.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass(frozen=True)
class ShardTask:
    """One shard file to write: the samples of its rows (their tokens, masks and ids are read
    from the spill files)."""

    folder: str
    split: str
    number: int
    seq_len: int
    pad_id: int
    samples: np.ndarray
    """Sample indices, row after row."""
    lengths: np.ndarray
    """Their lengths in tokens."""
    row_starts: np.ndarray
    """Offset of each row in ``samples`` (one more entry: the total)."""


def write_shard(task: ShardTask) -> tuple[str, int, dict[str, Any], int, int]:
    """Gather, lay out and write one shard; return its split, rows, index entry, tokens and
    trained tokens."""
    folder = Path(task.folder)
    # Records are read back with pread, not a memory map: mapped pages count towards RSS, which
    # would then grow with the dataset (5 bytes per token) instead of staying flat.
    fds = {
        n: os.open(folder / n, os.O_RDONLY)
        for n in (SPILL_IDS, SPILL_MASK, SPILL_RIDS, SPILL_SAMPLES)
    }
    n_rows = len(task.row_starts) - 1
    try:
        writer = ShardWriter(
            folder, split=task.split, seq_len=task.seq_len, shard_size=n_rows,
            first_shard=task.number,
        )  # fmt: skip
        tokens = trained = 0
        size = SAMPLE.itemsize
        for r in range(n_rows):
            segs, rids = [], []
            for j in range(task.row_starts[r], task.row_starts[r + 1]):
                i, n = int(task.samples[j]), int(task.lengths[j])
                (where,) = np.frombuffer(os.pread(fds[SPILL_SAMPLES], size, size * i), dtype=SAMPLE)
                a = int(where["start"])
                ids = np.frombuffer(os.pread(fds[SPILL_IDS], 4 * n, 4 * a), dtype=np.int32)
                mask = np.frombuffer(os.pread(fds[SPILL_MASK], n, a), dtype=np.bool_)
                rid = os.pread(fds[SPILL_RIDS], int(where["rid_len"]), int(where["rid"]))
                tokens += n
                trained += int(np.count_nonzero(mask[1:]))
                segs.append((ids, mask))
                rids.append(rid.decode("utf-8"))
            # The last add fills the writer (shard_size = rows), which writes the file.
            writer.add(build_row(segs, seq_len=task.seq_len, pad_id=task.pad_id), rids)
    finally:
        for fd in fds.values():
            os.close(fd)
    (entry,) = writer.shards
    return task.split, n_rows, entry, tokens, trained


def encoded_chunks(
    inputs: Sequence[Path], opts: PackOptions, workers: Workers, *, approx_records: int = 0
) -> Iterator[Chunk]:
    """Encoded chunks in input order."""
    size = task_size(opts, approx_records)
    chunks = read_raw_chunks(inputs, size, limit=opts.max_samples)
    return workers.ordered(encode_raw, ((raw, opts) for raw in chunks))


TASKS_PER_WORKER = 16
"""Encode tasks each worker gets at least (where ``chunk_size`` allows): the last task of one
worker can end up to a whole task after the others', so tasks much smaller than a worker's share
keep both cores busy to the end (on the Glaive benchmark, 2,000-record chunks left one worker
idle for most of a chunk's time)."""
MIN_TASK = 200
"""Records below which a task's fixed costs (one pickled result, one tokenizer call) show."""


def task_size(opts: PackOptions, approx_records: int) -> int:
    """Records per encode task: ``chunk_size``, smaller where the input has too few records to
    give every worker ``TASKS_PER_WORKER`` tasks (one worker: no tail to balance)."""
    if opts.num_proc <= 1 or approx_records <= 0:
        return opts.chunk_size
    share = -(-approx_records // (opts.num_proc * TASKS_PER_WORKER))
    return max(min(MIN_TASK, opts.chunk_size), min(opts.chunk_size, share))


def _terminate(pool: Any, *, spare: frozenset[Any] = frozenset()) -> None:
    """``pool.terminate()`` and ``join()``, bounded: terminate SIGTERMs the workers and then waits
    for each, and a worker it never signals (seen once in a test run: left blocked on the task
    queue's lock that a killed sibling held) would make it wait forever. So it runs in a helper
    thread; past a grace period every remaining child but ``spare`` (the caller's own children,
    alive before the pool) is killed, which ends the wait."""
    import multiprocessing as mp
    import threading

    stopper = threading.Thread(target=pool.terminate, daemon=True)
    stopper.start()
    stopper.join(timeout=TERMINATE_GRACE_S)
    while stopper.is_alive():
        for child in set(mp.active_children()) - spare:
            child.kill()
        stopper.join(timeout=1.0)
    pool.join()


TERMINATE_GRACE_S = 10.0
"""Seconds ``Pool.terminate`` gets before the workers are killed outright."""
