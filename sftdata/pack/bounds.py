"""The pack's use of the operating-system bounds (``sftdata.bounded``): rendering and tokenizing
happen in workers under them; before each task the CPU bound is moved to the time used so far
plus :func:`task_cpu_budget`.

A task whose worker died, ran out of memory or whose tokenizer panicked is run again record by
record, each in a fresh bounded process (:func:`find_record`), to name the record.

The calling process builds its own renderer too (the fingerprint needs the template and its stop
tokens): :func:`vet` builds it first in a fresh bounded process, once per tokenizer content,
template and options (remembered in the cache), so a tokenizer that aborts or spins on the
template's probe texts stops there, named, not in the process that would report it.
"""

from __future__ import annotations

import os
from typing import Any

from sftdata.bounded import (
    PROBE_EXIT_PANIC,
    PROBE_EXIT_REFUSED,
    bound_task,
    bound_worker,
    in_bounds,
    memory_budget,
    run_child,
    run_probe,
    why_stopped,
)

CPU_PER_RECORD_S = 2.0
"""CPU seconds a task may spend per record, on top of :data:`CPU_PER_TASK_S` (real records take
milliseconds to render and tokenize)."""
CPU_PER_TASK_S = 60.0
"""CPU seconds every task may spend whatever its size."""
VET_WALL_S = 300.0
"""Seconds :func:`vet` waits for its child in all (a FIFO among a tokenizer's files blocks
without spending CPU)."""

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


def _vet_key(opts: Any) -> str | None:
    import hashlib
    import json
    from pathlib import Path

    from sftdata import __version__
    from sftdata.pack.encode import renderer_key
    from sftdata.tokenizer_cache import content_key

    tok = content_key(opts.tokenizer)
    if tok is None:
        return None
    template = Path(opts.template)
    try:
        text = template.read_bytes() if template.is_file() else b""
    except OSError:
        return None
    h = hashlib.sha256(json.dumps([__version__, tok, repr(renderer_key(opts))]).encode())
    h.update(text)
    return h.hexdigest()


def _vet_child(build: Any, budget: int, send: Any) -> None:
    bound_worker(budget)
    bound_task(CPU_PER_TASK_S)
    run_probe(build, send, refused=PROBE_EXIT_REFUSED)


def vet(opts: Any, build: Any) -> None:
    """Before this process calls ``build()`` (building the renderer of ``opts``, a
    ``PackOptions``, from a loaded tokenizer): call it in a fresh bounded child first, unless one
    did for the same tokenizer content, template and options before (a marker in the cache).

    Raises:
        ConfigError: the child went past a bound or its tokenizer panicked, naming the tokenizer
            and the template. An ordinary error in the child is left for this process to raise.
    """
    from sftdata.errors import ConfigError
    from sftdata.tokenizer_cache import cache_dir

    if in_bounds():
        return
    key = _vet_key(opts)
    marker = cache_dir() / "vetted" / key if key else None
    if marker is not None and marker.is_file():
        return
    budget = memory_budget(1)
    code, message = run_child(_vet_child, build, budget, wall=VET_WALL_S)
    if code == 0 and marker is not None:
        try:  # a cache: an unwritable one only costs the next run this check
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass
    if code in (0, PROBE_EXIT_REFUSED):
        return
    if code is None:
        how = f"did not end within {VET_WALL_S:g} seconds"
    elif code == PROBE_EXIT_PANIC:
        how = f"failed: the tokenizer panicked ({message or 'no message'})"
    else:
        how = "took " + why_stopped(code, budget=budget, seconds=CPU_PER_TASK_S)
    raise ConfigError(
        f"{opts.tokenizer}: a broken or hostile tokenizer or template: loading the tokenizer "
        f"and encoding the probe conversations of template {opts.template!r} {how}"
    )


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


__all__ = ["CPU_ENV", "find_record", "probe", "task_cpu_budget", "vet"]
