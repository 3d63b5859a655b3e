"""Operating-system bounds on the pack's worker processes, the floor under the counted template
bounds (``sftdata.templates.bounds``): rendering a user's template and running a user's
tokenizer happen in workers whose address space and CPU time the kernel limits, so work that
escapes the counts (a tokenizer's regex, a C-level string method) ends as a one-line refusal
naming the record and the bound, never as the machine's memory or a hang.

- memory: ``RLIMIT_AS`` at the worker's address space when it starts plus :func:`memory_budget`
  (Python raises ``MemoryError``; a native allocation that fails aborts the worker);
- CPU: before each task the soft ``RLIMIT_CPU`` is set to the CPU time used so far plus
  :func:`task_cpu_budget` (past it the kernel stops the worker with ``SIGXCPU``).

A task whose worker died or ran out of memory is run again record by record, each in a fresh
bounded process (:func:`find_record`), to name the record.
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any

MEMORY_ENV = "SFTPIPE_WORKER_MEMORY_MB"
"""Environment variable: the memory (MB) each worker may add to what it starts with."""
DEFAULT_MEMORY = 4 << 30
"""Bytes a worker may add by default (capped at a share of the machine's memory)."""
CPU_PER_RECORD_S = 2.0
"""CPU seconds a task may spend per record, on top of :data:`CPU_PER_TASK_S` (real records take
milliseconds to render and tokenize)."""
CPU_PER_TASK_S = 60.0
"""CPU seconds every task may spend whatever its size."""
PROBE_EXIT_MEMORY = 3
"""Exit code of a probe (:func:`probe`) whose record ran out of memory."""


def memory_budget(num_proc: int) -> int:
    """Bytes each worker may add: ``SFTPIPE_WORKER_MEMORY_MB``, else the default capped at the
    machine's memory shared among the workers."""
    from sftdata import physical_memory

    raw = os.environ.get(MEMORY_ENV, "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw) << 20
    return min(DEFAULT_MEMORY, physical_memory() // max(num_proc, 1))


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


def _address_space() -> int:
    """This process's address space in bytes (``/proc/self/statm``), or 0 where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def bound_worker(budget: int) -> None:
    """In a new worker: its address space limited to where it stands plus ``budget``, no core
    file when the kernel stops it."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    # SIGXCPU must stop the process (its default): a Python handler would not run while a
    # native call spins, and that is the case the bound is for
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    now = _address_space()
    if now:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = now + budget
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def bound_task(seconds: float) -> None:
    """Before a task in a worker: the CPU time it may spend from now."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(used.ru_utime + used.ru_stime + seconds) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def why_stopped(exitcode: int | None, *, budget: int, seconds: float) -> str:
    """The bound a worker or probe with ``exitcode`` went past, in words."""
    if exitcode == -signal.SIGXCPU:
        return f"more than {seconds:g} CPU seconds"
    if exitcode in (PROBE_EXIT_MEMORY, -signal.SIGABRT, -signal.SIGKILL, -signal.SIGSEGV):
        return f"more than {budget >> 20:,} MB of memory ({MEMORY_ENV} raises it)"
    return f"the worker stopped (exit {exitcode})"


def probe(chunk: Any, opts: Any, budget: int) -> None:
    """Child of :func:`find_record`: encode one record under the bounds; exit 0 when it ends
    (refused or not), :data:`PROBE_EXIT_MEMORY` when it runs out of memory."""
    from sftdata.pack.encode import encode_raw, init_worker

    init_worker(opts)
    bound_worker(budget)
    bound_task(task_cpu_budget(1))
    try:
        encode_raw(chunk, opts)
    except MemoryError:
        os._exit(PROBE_EXIT_MEMORY)
    except BaseException:  # an ordinary refusal: not what the probe looks for
        os._exit(0)
    os._exit(0)


def find_record(chunk: Any, opts: Any, *, budget: int, cause: str) -> None:
    """Raise the one-line error naming the record of ``chunk`` (a ``RawChunk`` whose worker was
    stopped: ``cause``) that goes past a bound, found by encoding its records one at a time,
    each in a fresh bounded process."""
    import multiprocessing as mp

    from sftdata.conversation import parse_jsonl_line
    from sftdata.errors import ValidationError
    from sftdata.pack.encode import RawChunk

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    lines = chunk.data.splitlines(keepends=True)
    for lineno, line in enumerate(lines, start=chunk.first_line):
        if not line.strip():
            continue
        p = ctx.Process(target=probe, args=(RawChunk(chunk.path, lineno, line), opts, budget))
        p.start()
        p.join()
        if p.exitcode != 0:
            try:
                rid = repr(
                    parse_jsonl_line(line.decode("utf-8"), path=chunk.path, lineno=lineno).id
                )
            except Exception:  # the line itself is what it is: name its place
                rid = "on this line"
            how = why_stopped(p.exitcode, budget=budget, seconds=task_cpu_budget(1))
            raise ValidationError(
                f"{chunk.path}:{lineno}: record {rid}: rendering and tokenizing it took {how} "
                "(a template or tokenizer that does not end on it): fix or remove the record"
            )
    last = chunk.first_line + len(lines) - 1
    raise ValidationError(
        f"{chunk.path}:{chunk.first_line}-{last}: a worker encoding these records was stopped "
        f"({cause}), and none of them alone goes past a bound"
    )


__all__ = [
    "CPU_ENV",
    "MEMORY_ENV",
    "PROBE_EXIT_MEMORY",
    "bound_task",
    "bound_worker",
    "find_record",
    "memory_budget",
    "task_cpu_budget",
    "why_stopped",
]
