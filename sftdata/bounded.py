"""Operating-system bounds for untrusted work (a user's template, a user's tokenizer): the floor
under the counted template bounds (``sftdata.templates.bounds``). The work runs in a process whose
address space and CPU time the kernel limits, so what escapes the counts (a tokenizer's regex or
normalizer, a C-level string method) ends as a one-line refusal naming what and the bound, never
as the machine's memory, a hang, or a Rust panic's traceback.

- memory: ``RLIMIT_AS`` at the process's address space when it starts plus :func:`memory_budget`
  (Python raises ``MemoryError``; a native allocation that fails aborts the process);
- CPU: the soft ``RLIMIT_CPU`` set to the CPU time used so far plus a budget (:func:`bound_task`;
  past it the kernel stops the process with ``SIGXCPU``);
- panics: pyo3 surfaces a Rust panic as ``PanicException``, a BaseException; it is reported by
  its first line (:func:`is_panic`), and the hook's backtrace on fd 2 is silenced.

:func:`run_child` runs one function in a fresh forked child under these bounds and says how it
ended; ``sftdata.pack.bounds`` uses it for the pack's workers and ``tokenizer_cache`` for loading
a tokenizer.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from typing import Any

from sftdata.errors import first_line

MEMORY_ENV = "SFTPIPE_WORKER_MEMORY_MB"
"""Environment variable: the memory (MB) each worker may add to what it starts with."""
DEFAULT_MEMORY = 4 << 30
"""Bytes a worker may add by default (capped at a share of the machine's memory)."""

PROBE_EXIT_MEMORY = 3
"""Exit code of a child that ran out of memory."""
PROBE_EXIT_PANIC = 4
"""Exit code of a child whose tokenizer panicked (the Rust library's own check failed: a
backtracking regex past its retry limit, for one)."""
PROBE_EXIT_REFUSED = 5
"""Exit code of a child that ended in an ordinary error (one its caller repeats or reports)."""

_BOUNDED: list[bool] = []
"""Non-empty in a process under the bounds (a worker, a probe): its work needs no child."""


class TokenizerPanic(Exception):
    """A worker's tokenizer panicked; its first line, picklable (pyo3's ``PanicException``
    derives from BaseException and does not cross processes cleanly)."""


def is_panic(e: BaseException) -> bool:
    """A Rust panic surfaced by pyo3 (``pyo3_runtime.PanicException``)."""
    return type(e).__name__ == "PanicException"


def memory_budget(num_proc: int) -> int:
    """Bytes each worker may add: ``SFTPIPE_WORKER_MEMORY_MB``, else the default capped at the
    machine's memory shared among the workers."""
    from sftdata import physical_memory

    raw = os.environ.get(MEMORY_ENV, "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw) << 20
    return min(DEFAULT_MEMORY, physical_memory() // max(num_proc, 1))


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
    _BOUNDED.append(True)
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    # Rust's panic hook writes a backtrace to fd 2 before Python sees the panic; what went wrong
    # comes back to the caller as the one line it reports.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
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


def why_stopped(exitcode: int | None, *, budget: int, seconds: float, panic: str = "") -> str:
    """The bound a worker or probe with ``exitcode`` went past, in words."""
    if exitcode == PROBE_EXIT_PANIC:
        return f"the tokenizer panicked ({panic or 'no message'})"
    if exitcode == -signal.SIGXCPU:
        return f"more than {seconds:g} CPU seconds"
    if exitcode in (PROBE_EXIT_MEMORY, -signal.SIGABRT, -signal.SIGKILL, -signal.SIGSEGV):
        return f"more than {budget >> 20:,} MB of memory ({MEMORY_ENV} raises it)"
    return f"the worker stopped (exit {exitcode})"


def how_it_ended(
    code: int | None, message: Any, *, budget: int, seconds: float, wall: float
) -> str:
    """How a child of :func:`run_child` that went past a bound ended, in words that follow
    "loading it" or similar: past ``wall`` seconds, a tokenizer panic, or a bound."""
    if code is None:
        return f"did not end within {wall:g} seconds"
    if code == PROBE_EXIT_PANIC:
        return f"failed: the tokenizer panicked ({message or 'no message'})"
    return "took " + why_stopped(code, budget=budget, seconds=seconds)


def run_probe(work: Any, send: Any, refused: int) -> None:
    """In a bounded child: ``work()``; exit 0 when it ends, :data:`PROBE_EXIT_MEMORY` out of
    memory, :data:`PROBE_EXIT_PANIC` (the message sent) when the tokenizer panics, ``refused``
    on any other error."""
    try:
        work()
    except MemoryError:
        os._exit(PROBE_EXIT_MEMORY)
    except BaseException as e:  # PanicException is a BaseException
        if is_panic(e):
            send.send(first_line(e)[:200])
            os._exit(PROBE_EXIT_PANIC)
        os._exit(refused)
    os._exit(0)


def fork_context() -> Any:
    import multiprocessing as mp

    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def run_child(target: Any, *args: Any, wall: float | None = None) -> tuple[int | None, Any]:
    """Run ``target(*args, send)`` in a forked child; its exit code (None: still running after
    ``wall`` seconds) and the one message it sent ("" if none). The message is read while the
    child runs (a large one would fill the pipe and block it); the child is killed if this
    process stops waiting (a signal, ``wall``)."""
    ctx = fork_context()
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, send))
    deadline = None if wall is None else time.monotonic() + wall
    message: Any = ""
    try:
        p.start()
        send.close()
        with contextlib.suppress(EOFError, OSError):  # EOF: it ended without a message
            while not recv.poll(0.1):
                if deadline is not None and time.monotonic() > deadline:
                    return None, ""
            message = recv.recv()
        p.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        return p.exitcode, message
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        recv.close()


def in_bounds() -> bool:
    """Whether this process is already under the bounds (:func:`bound_worker` ran here)."""
    return bool(_BOUNDED)


__all__ = [
    "MEMORY_ENV",
    "PROBE_EXIT_MEMORY",
    "PROBE_EXIT_PANIC",
    "PROBE_EXIT_REFUSED",
    "TokenizerPanic",
    "bound_task",
    "bound_worker",
    "fork_context",
    "how_it_ended",
    "in_bounds",
    "is_panic",
    "memory_budget",
    "run_child",
    "run_probe",
    "why_stopped",
]
