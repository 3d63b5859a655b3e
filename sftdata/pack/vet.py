"""Before a process builds its own renderer (the fingerprint needs the template and its stop
tokens), :func:`vet` builds it first in a fresh bounded process (``sftdata.bounded``), once per
tokenizer content, template and options (remembered in the cache), so a tokenizer that aborts or
spins on the template's probe texts stops there, named, not in the process that would report it.
"""

from __future__ import annotations

from typing import Any

from sftdata.bounded import (
    PROBE_EXIT_REFUSED,
    bound_task,
    bound_worker,
    how_it_ended,
    in_bounds,
    memory_budget,
    run_child,
    run_probe,
)

CPU_S = 60.0
"""CPU seconds the child may spend (loading a snapshot and probing a template take well under one)."""
VET_WALL_S = 300.0
"""Seconds :func:`vet` waits for its child in all (a FIFO among a tokenizer's files blocks
without spending CPU)."""


def _vet_key(opts: Any, renderer_key: tuple[Any, ...]) -> str | None:
    import hashlib
    import json
    from pathlib import Path

    from sftdata import __version__
    from sftdata.tokenizer_cache import content_key

    tok = content_key(opts.tokenizer)
    if tok is None:
        return None
    template = Path(opts.template)
    try:
        text = template.read_bytes() if template.is_file() else b""
    except OSError:
        return None
    h = hashlib.sha256(json.dumps([__version__, tok, repr(renderer_key)]).encode())
    h.update(text)
    return h.hexdigest()


def _vet_child(build: Any, budget: int, send: Any) -> None:
    bound_worker(budget)
    bound_task(CPU_S)
    run_probe(build, send, refused=PROBE_EXIT_REFUSED)


def vet(opts: Any, build: Any, renderer_key: tuple[Any, ...]) -> None:
    """Before this process calls ``build()`` (building the renderer of ``opts``, a
    ``PackOptions``, from a loaded tokenizer): call it in a fresh bounded child first, unless one
    did for the same tokenizer content, template and options before (a marker in the cache).

    Raises:
        ConfigError: the child went past a bound or its tokenizer panicked, naming the tokenizer
            and the template. An ordinary error in the child is left for this process to raise.
    """
    from sftdata.cache import cache_dir
    from sftdata.errors import ConfigError

    if in_bounds():
        return
    key = _vet_key(opts, renderer_key)
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
    how = how_it_ended(code, message, budget=budget, seconds=CPU_S, wall=VET_WALL_S)
    raise ConfigError(
        f"{opts.tokenizer}: a broken or hostile tokenizer or template: loading the tokenizer "
        f"and encoding the probe conversations of template {opts.template!r} {how}"
    )


__all__ = ["VET_WALL_S", "vet"]
