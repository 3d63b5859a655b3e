"""The pack's use of the operating-system bounds (``sftdata.bounded``): rendering and tokenizing
happen in workers under them; before each task the CPU bound is moved to the time used so far
plus :func:`task_cpu_budget`.

A task whose worker died, ran out of memory or whose tokenizer panicked is run again record by
record, each in a fresh bounded process (:func:`find_record`), to name the record.
"""

from __future__ import annotations

import os
from typing import Any

from sftdata.bounded import (
    PROBE_EXIT_PANIC,
    bound_task,
    bound_worker,
    run_child,
    run_probe,
    why_stopped,
)

CPU_PER_RECORD_S = 2.0
"""CPU seconds a task may spend per record, on top of :data:`CPU_PER_TASK_S` (real records take
milliseconds to render and tokenize)."""
CPU_PER_TASK_S = 60.0
"""CPU seconds every task may spend whatever its size."""

CPU_ENV = "SFTPIPE_WORKER_CPU_S"
"""Environment variable: ``TASK,RECORD`` CPU seconds (each task, and per record of it)."""


def task_cpu_budget(records: int) -> float:
    """CPU seconds a task of ``records`` records may take: :data:`CPU_PER_TASK_S` plus
    :data:`CPU_PER_RECORD_S` each, or ``SFTPIPE_WORKER_CPU_S=TASK,RECORD``."""
    base, each = CPU_PER_TASK_S, CPU_PER_RECORD_S
    raw = os.environ.get(CPU_ENV, "").split(",")
    try:
        if len(raw) == 2:
            base, each = max(float(raw[0]), 0.1), max(float(raw[1]), 0.0)
    except ValueError:
        pass
    return base + each * records


def probe(chunk: Any, opts: Any, budget: int, send: Any) -> None:
    """Child of :func:`find_record`: encode one record under the bounds; exit 0 when it ends
    (refused or not: not what the probe looks for), else as :func:`sftdata.bounded.run_probe`."""
    from sftdata.pack.encode import encode_raw, init_worker

    init_worker(opts)
    bound_worker(budget)
    bound_task(task_cpu_budget(1))
    run_probe(lambda: encode_raw(chunk, opts), send, refused=0)


def find_record(chunk: Any, opts: Any, *, budget: int, cause: str) -> None:
    """Raise the one-line error naming the record of ``chunk`` (a ``RawChunk`` whose worker was
    stopped: ``cause``) that goes past a bound, found by encoding its records one at a time,
    each in a fresh bounded process."""
    from sftdata.conversation import parse_jsonl_line
    from sftdata.errors import ValidationError
    from sftdata.pack.encode import RawChunk

    lines = chunk.data.splitlines(keepends=True)
    for lineno, line in enumerate(lines, start=chunk.first_line):
        if not line.strip():
            continue
        code, message = run_child(probe, RawChunk(chunk.path, lineno, line), opts, budget)
        if code != 0:
            try:
                rid = repr(
                    parse_jsonl_line(line.decode("utf-8"), path=chunk.path, lineno=lineno).id
                )
            except Exception:  # the line itself is what it is: name its place
                rid = "on this line"
            how = why_stopped(code, budget=budget, seconds=task_cpu_budget(1), panic=message)
            if code == PROBE_EXIT_PANIC:
                raise ValidationError(
                    f"{chunk.path}:{lineno}: record {rid}: tokenizing it failed: {how} (a broken "
                    "or hostile tokenizer): fix the tokenizer or remove the record"
                )
            raise ValidationError(
                f"{chunk.path}:{lineno}: record {rid}: rendering and tokenizing it took {how} "
                "(a template or tokenizer that does not end on it): fix or remove the record"
            )
    last = chunk.first_line + len(lines) - 1
    raise ValidationError(
        f"{chunk.path}:{chunk.first_line}-{last}: a worker encoding these records was stopped "
        f"({cause}), and none of them alone goes past a bound"
    )


__all__ = ["CPU_ENV", "CPU_PER_TASK_S", "find_record", "probe", "task_cpu_budget"]
