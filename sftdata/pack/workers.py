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
from sftdata.pack.rows import build_rows
from sftdata.shards import ShardWriter

SPILL_IDS, SPILL_MASK = ".spill-ids.bin", ".spill-mask.bin"
"""Tokens and masks of every kept record, spilled in input order inside the work folder."""
SPILL_RIDS, SPILL_SAMPLES = ".spill-record-ids.bin", ".spill-samples.bin"
"""Every kept record's id (UTF-8, back to back), and per sample where its tokens and id are."""
SAMPLE = np.dtype([("start", "<i8"), ("rid", "<i8"), ("rid_len", "<i8")])
"""One entry of ``SPILL_SAMPLES``: token offset, id byte offset, id byte length."""


class Workers:
    """The worker processes of one pack (``num_proc``, at least one), used for encoding and
    then for writing, each under the operating system's bounds (``sftdata.bounded``).

    ``ordered`` runs a function over tasks and yields the results in task order with a bounded
    look-ahead (the whole input is never read ahead into a queue), so the output never depends
    on ``num_proc``. A task whose worker the kernel stopped (or that ran out of memory) is
    handed to ``on_lost``, which raises the error naming what went past a bound.
    """

    def __init__(self, opts: PackOptions):
        from sftdata.bounded import memory_budget

        self.opts = opts
        self.budget = memory_budget(opts.num_proc)
        self._pool: Any = None
        self._old_env: str | None = None
        self._procs: set[Any] = set()
        """Every worker process the pool started (it forgets those it lost when it breaks)."""

    def __enter__(self) -> Workers:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # Several workers each run one single-threaded tokenizer (this also silences the
        # tokenizers library's fork warning); a single worker keeps the tokenizer's own threads.
        self._old_env = os.environ.get("TOKENIZERS_PARALLELISM")
        if self.opts.num_proc > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._pool = ProcessPoolExecutor(
            max(1, self.opts.num_proc), mp_context=ctx, initializer=_init_bounded,
            initargs=(self.opts, self.budget),
        )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._stop()
            if self._old_env is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = self._old_env

    def ordered(
        self, fn: Callable[..., Any], tasks: Iterator[tuple[Any, ...]], *,
        seconds: Callable[..., float], on_lost: Callable[..., Any],
    ) -> Iterator[Any]:  # fmt: skip
        """``fn(*task)`` for each task, in task order, each task given ``seconds(*task)`` of
        CPU time; ``on_lost(cause, *task)`` for a task whose worker was stopped."""
        from concurrent.futures.process import BrokenProcessPool

        from sftdata.bounded import PROBE_EXIT_MEMORY, TokenizerPanic, why_stopped

        pending: deque = deque()

        def result() -> Any:
            task, future = pending.popleft()
            try:
                return future.result()
            except (BrokenProcessPool, MemoryError, TokenizerPanic) as e:
                codes = [p.exitcode for p in getattr(self._pool, "_processes", {}).values()]
                dead = next((c for c in codes if c not in (None, 0)), None)
                if isinstance(e, TokenizerPanic):
                    cause = f"the tokenizer panicked ({e})"
                elif isinstance(e, MemoryError):
                    cause = why_stopped(PROBE_EXIT_MEMORY, budget=self.budget, seconds=0.0)
                else:
                    cause = why_stopped(dead, budget=self.budget, seconds=seconds(*task))
                self._stop()
                on_lost(cause, *task)
                raise  # on_lost raises its own error; this only if it did not

        for task in tasks:
            pending.append((task, self._pool.submit(_bounded, seconds(*task), fn, *task)))
            self._procs.update((getattr(self._pool, "_processes", None) or {}).values())
            if len(pending) >= 2 * max(1, self.opts.num_proc):
                yield result()
        while pending:
            yield result()

    def _stop(self) -> None:
        if self._pool is not None:
            _stop(self._pool, self._procs)
            self._pool = None


def _init_bounded(opts: PackOptions, budget: int) -> None:
    from sftdata.bounded import bound_worker

    init_worker(opts)
    bound_worker(budget)


def _bounded(seconds: float, fn: Callable[..., Any], *task: Any) -> Any:
    """In a worker: ``fn(*task)`` with ``seconds`` of CPU time from now."""
    from sftdata.bounded import TokenizerPanic, bound_task, is_panic
    from sftdata.errors import first_line

    bound_task(seconds)
    try:
        return fn(*task)
    except BaseException as e:  # pyo3's PanicException is a BaseException
        if is_panic(e):
            raise TokenizerPanic(first_line(e)[:200]) from None
        raise


def _stop(pool: Any, processes: set[Any] | None = None) -> None:
    """Stop an executor's workers now (a SIGTERM, an error, or the end of the pack): cancel what
    is queued and kill what runs, so stopping never waits on a busy or stuck worker."""
    procs = set(processes or ()) | set((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=TERMINATE_GRACE_S)


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


BLOCK_TOKENS = 1 << 20
"""Tokens a shard writer reads and lays out at a time (into the same three arrays, block after
block): about 30 bytes a token while a block is laid out, so tens of MB however large a shard
is."""


def _read_records(
    fds: dict[str, int], samples: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Tokens and masks (back to back), lengths and record ids of ``samples``, in their order."""
    size = SAMPLE.itemsize
    where = np.frombuffer(
        b"".join([os.pread(fds[SPILL_SAMPLES], size, size * i) for i in samples.tolist()]),
        dtype=SAMPLE,
    )
    lens = lengths.astype(np.int64)
    spans = list(zip(where["start"].tolist(), lens.tolist(), strict=True))
    ids = b"".join([os.pread(fds[SPILL_IDS], 4 * n, 4 * a) for a, n in spans])
    mask = b"".join([os.pread(fds[SPILL_MASK], n, a) for a, n in spans])
    rids = [
        os.pread(fds[SPILL_RIDS], n, a).decode("utf-8")
        for a, n in zip(where["rid"].tolist(), where["rid_len"].tolist(), strict=True)
    ]
    return np.frombuffer(ids, dtype=np.int32), np.frombuffer(mask, dtype=np.bool_), lens, rids


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
        step = max(1, BLOCK_TOKENS // task.seq_len)  # rows laid out at a time
        shape = (min(step, n_rows), task.seq_len)
        block = (np.empty(shape, np.int32), np.empty(shape, np.int32), np.empty(shape, np.int32))
        for r0 in range(0, n_rows, step):
            starts = task.row_starts[r0 : r0 + step + 1]
            picked = slice(int(starts[0]), int(starts[-1]))
            ids, mask, lens, rids = _read_records(fds, task.samples[picked], task.lengths[picked])
            local = starts - starts[0]
            firsts = np.cumsum(lens) - lens
            tokens += len(ids)
            # a record's first token is never trained once packed (build_row): it never counts
            trained += int(np.count_nonzero(mask)) - int(np.count_nonzero(mask[firsts]))
            rows = build_rows(
                ids, mask, lens, local, seq_len=task.seq_len, pad_id=task.pad_id, out=block
            )
            for r, row in enumerate(rows):
                # The last add fills the writer (shard_size = rows), which writes the file.
                writer.add(row, rids[local[r] : local[r + 1]])
    finally:
        for fd in fds.values():
            os.close(fd)
    (entry,) = writer.shards
    return task.split, n_rows, entry, tokens, trained


def encoded_chunks(
    inputs: Sequence[Path],
    opts: PackOptions,
    workers: Workers,
    *,
    approx_records: int = 0,
    keep_zero_trained: bool = False,
) -> Iterator[Chunk]:
    """Encoded chunks in input order (rendered and tokenized in the bounded workers)."""
    from sftdata.pack.bounds import find_record, task_cpu_budget

    size = task_size(opts, approx_records)
    chunks = read_raw_chunks(inputs, size, limit=opts.max_samples)

    def lost(cause: str, raw: Any, opts: PackOptions, _keep: bool) -> None:
        find_record(raw, opts, budget=workers.budget, cause=cause)

    return workers.ordered(
        encode_raw, ((raw, opts, keep_zero_trained) for raw in chunks),
        seconds=lambda raw, *_: task_cpu_budget(raw.data.count(b"\n") + 1), on_lost=lost,
    )  # fmt: skip


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


TERMINATE_GRACE_S = 10.0
"""Seconds a killed worker gets to be reaped."""
