"""The pack's worker pool (sftdata/pack/workers.py): stopping it is bounded; its tasks are sized
to keep every worker busy."""

from __future__ import annotations

import multiprocessing as mp
import signal
import time

import pytest

from sftdata.pack import workers


def _deaf() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker Pool.terminate cannot stop


def test_terminating_a_pool_whose_worker_never_stops_still_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A busy worker that ignores SIGTERM never reads the stop sentinel nor dies: plain
    # pool.terminate() waits for it forever (checked by hand: killed by `timeout`).
    monkeypatch.setattr(workers, "TERMINATE_GRACE_S", 0.5)
    ctx = mp.get_context("fork")
    bystander = ctx.Process(target=time.sleep, args=(3600,))  # the caller's own child
    bystander.start()
    pool = ctx.Pool(1, initializer=_deaf)
    assert pool.apply_async(abs, (-3,)).get(timeout=30) == 3
    pool.apply_async(time.sleep, (3600,))
    time.sleep(0.3)
    t0 = time.monotonic()
    workers._terminate(pool, spare=frozenset({bystander}))
    assert time.monotonic() - t0 < 20
    assert mp.active_children() == [bystander]  # the pool's workers are gone, not the caller's
    bystander.kill()
    bystander.join()


def test_task_size_gives_every_worker_many_small_tasks_within_chunk_size():
    from sftdata.pack.options import PackOptions

    def size(records: int, num_proc: int, chunk: int = 2000) -> int:
        opts = PackOptions(tokenizer="tiny", seq_len=256, num_proc=num_proc, chunk_size=chunk)
        return workers.task_size(opts, records)

    assert size(15_000, 1) == 2000  # one worker: no tail to balance
    per = size(15_000, 2)
    assert -(-15_000 // per) >= 2 * workers.TASKS_PER_WORKER  # tasks enough for both workers
    assert size(10_000_000, 2) == 2000  # never past chunk_size
    assert size(10, 2) == workers.MIN_TASK  # never tiny tasks
    assert size(10, 2, chunk=4) == 4  # an explicit smaller chunk_size still holds
    assert size(0, 2) == 2000  # unknown record count
