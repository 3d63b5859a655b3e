"""The pack's worker pool (sftdata/pack/workers.py): stopping it is bounded; its tasks are sized
to keep every worker busy."""

from __future__ import annotations

import multiprocessing as mp
import re
import signal
import subprocess
import time

import pytest

from sftdata.pack import workers


def _deaf() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker SIGTERM cannot stop


def test_stopping_workers_whose_task_never_ends_still_returns() -> None:
    """A busy worker that ignores SIGTERM: stopping the pool kills it, never waits for it, and
    leaves the caller's own children alone."""
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork")
    before = set(mp.active_children())
    bystander = ctx.Process(target=time.sleep, args=(3600,))  # the caller's own child
    bystander.start()
    try:
        pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_deaf)
        assert pool.submit(abs, -3).result(timeout=30) == 3
        pool.submit(time.sleep, 3600)
        time.sleep(0.3)
        t0 = time.monotonic()
        workers._stop(pool)
        assert time.monotonic() - t0 < 20
        # the pool's workers are gone, not the caller's
        assert set(mp.active_children()) - before == {bystander}
    finally:
        bystander.kill()
        bystander.join()


SLOW = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% if m.content == 'slow' %}{% for i in range(200000) %}{{ ('a' * 200000).count('b') }}"
    "{% endfor %}{% endif %}{% endfor %}"
)
"""Fine for every record but one, on which it runs C-level scans no count sees."""
BIG = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% if m.content == 'big' %}{% set s = ['a' * 30000000, 'b' * 30000000, 'c' * 30000000, "
    "'d' * 30000000, 'e' * 30000000, 'f' * 30000000, 'g' * 30000000, 'h' * 30000000] %}"
    "{{ s|length }}{% endif %}{% endfor %}"
)
"""Every string under the character bound, together 240 MB: what only a memory bound stops."""


def _records(path, special: str) -> None:
    import json

    rows = [{"schema_version": 2, "id": f"r{i}",
             "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "a"}],
             "source": {"file": "raw.json", "index": i}}
            for i, q in enumerate(["q", "q", special, "q"])]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


BOUNDED_ENV = {
    "SFTPIPE_RENDER_CPU_S": "1000",  # the OS bounds alone, not the render floor
    "SFTPIPE_WORKER_CPU_S": "1,0",  # one CPU second a task
    "SFTPIPE_WORKER_MEMORY_MB": "150",
}
"""The bounds lowered (through the environment a user would use) so the tests are quick."""


def bounded_cli(*args: object, cwd=None) -> subprocess.CompletedProcess:
    """``sftdata ARGS`` in a fresh process with :data:`BOUNDED_ENV`."""
    import os
    import sys

    env = {**os.environ, **BOUNDED_ENV}
    return subprocess.run([sys.executable, "-m", "sftdata", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_os_bounds_stop_a_record_no_count_stops_and_name_it(tmp_path, num_proc: int) -> None:
    """Under the counted bounds, the workers' CPU and memory bounds: a record whose render
    escapes the counts ends the pack with one line naming the record and the bound, quickly,
    with nothing written and no process left."""
    for name, tpl, special, want in (
        ("slow", SLOW, "slow", r"more than 1 CPU seconds"),
        ("big", BIG, "big", r"memory .*SFTPIPE_WORKER_MEMORY_MB raises"),
    ):
        (tmp_path / f"{name}.jinja").write_text(tpl, encoding="utf-8")
        data = tmp_path / f"{name}.jsonl"
        _records(data, special)
        t0 = time.monotonic()
        r = bounded_cli("pack", data, "-o", tmp_path / f"out-{name}", "--tokenizer", "tiny",
                        "--seq-len", 256, "--template", tmp_path / f"{name}.jinja",
                        "--num-proc", num_proc)  # fmt: skip
        assert time.monotonic() - t0 < 60
        (line,) = r.stderr.strip().splitlines()[-1:]
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        # named by the record's place: its raw source (a template refusal) or the canonical
        # file's line (a worker the kernel stopped)
        assert re.search(
            rf"^Error: (raw\.json|.*{name}\.jsonl:3): .*record 'r2': .*{want}", line
        ), line
        assert not (tmp_path / f"out-{name}").exists()


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
