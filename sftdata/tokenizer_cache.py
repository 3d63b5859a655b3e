"""The on-disk cache of ``TokenizerSnapshot`` (what rendering and packing need of a tokenizer),
keyed by the content of the tokenizer's files, so a warm ``pack`` neither converts a SentencePiece
model nor imports transformers.

The cache (``$SFTPIPE_CACHE`` or ``~/.cache/sftpipe``) only ever saves time: an unreadable,
damaged or unwritable entry is rebuilt or skipped, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from sftdata import __version__, sha256_file
from sftdata.atomic import atomic_file
from sftdata.cache import cache_dir
from sftdata.errors import ConfigError
from sftdata.tokenizer import (
    TOKENIZER_FILES,
    TokenizerSnapshot,
    load_tokenizer,
    resolve_spec,
)

SNAPSHOT_VERSION = 6
"""Bump when loading changes what a snapshot holds (e.g. ``_restore_dummy_prefix``)."""


_WEIGHT_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index"}
)


def _content_files(path: Path) -> list[tuple[str, Path]] | None:
    """(name, file) of each file whose bytes decide what ``load_tokenizer(path)`` builds, or None
    where ``path`` is not something a snapshot is cached for."""
    if path.is_file():
        if path.suffix == ".model":
            return [("tokenizer.model", path)]
        if path.name in ("tokenizer.json", "tokenizer_config.json"):
            path = path.parent
        else:
            return None
    if not path.is_dir() or not any((path / n).is_file() for n in TOKENIZER_FILES):
        return None
    # Every small top-level file but weights: AutoTokenizer reads tokenizer_config.json,
    # config.json (to pick the class), special_tokens_map.json, chat_template.jinja, vocab files...
    files = [
        (p.name, p)
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and not p.name.startswith(".")
    ]
    extra = path / "additional_chat_templates"
    if extra.is_dir():
        files += [(f"{extra.name}/{p.name}", p) for p in sorted(extra.iterdir()) if p.is_file()]
    return files


_DIGESTS: dict[tuple[str, int, int], str] = {}
"""Per process: each tokenizer file's sha256 by (path, size, mtime): a command keys the same
files twice (the renderer's vetting, then the snapshot)."""


def _digest(p: Path) -> str:
    st = p.stat()
    ident = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if ident not in _DIGESTS:
        _DIGESTS[ident] = sha256_file(p)
    return _DIGESTS[ident]


def _cache_key(files: list[tuple[str, Path]]) -> str:
    from importlib.metadata import version

    h = hashlib.sha256()
    versions = [SNAPSHOT_VERSION, __version__, version("transformers"), version("tokenizers")]
    h.update(json.dumps(versions).encode())
    for name, p in files:
        h.update(f"{name}\0{_digest(p)}\0".encode())
    return h.hexdigest()


def content_key(spec: str | Path) -> str | None:
    """A key that changes whenever the files ``load_tokenizer(spec)`` reads change (with the
    versions of sftpipe, transformers and tokenizers), or None where it cannot be computed."""
    files = _content_files(resolve_spec(spec))
    if files is None:
        return None
    try:
        return _cache_key(files)
    except OSError:
        return None


def _read_cached(path: Path, key: str) -> TokenizerSnapshot | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("key") != key or d.get("snapshot_version") != SNAPSHOT_VERSION:
            return None
        backend = d["backend_json"]
        if hashlib.sha256(backend.encode("utf-8")).hexdigest() != d["backend_sha256"]:
            return None  # damaged: rebuilt and rewritten by the caller
        return TokenizerSnapshot(
            backend_json=backend,
            specials=dict(d["specials"]),
            chat_template=d["chat_template"],
            identity=dict(d["identity"]),
            stop_sources=tuple((t, tuple(src)) for t, src in d["stop_sources"]),
            max_length=d["max_length"],
            tokenizer_class=str(d["tokenizer_class"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def _write_cached(path: Path, key: str, snap: TokenizerSnapshot) -> None:
    payload = {
        "snapshot_version": SNAPSHOT_VERSION,
        "key": key,
        "backend_sha256": hashlib.sha256(snap.backend_json.encode("utf-8")).hexdigest(),
        "backend_json": snap.backend_json,
        "specials": snap.specials,
        "chat_template": snap.chat_template,
        "identity": snap.identity,
        "stop_sources": [[t, list(src)] for t, src in snap.stop_sources],
        "max_length": snap.max_length,
        "tokenizer_class": snap.tokenizer_class,
    }
    # A cache: a read-only or full disk only costs the next run its load time.
    with contextlib.suppress(OSError, ConfigError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            json.dump(payload, f, ensure_ascii=False)


LOAD_CPU_S = 120.0
"""CPU seconds loading a tokenizer may take (converting a SentencePiece model takes seconds)."""
LOAD_MEMORY = 2 << 30
"""Bytes loading a tokenizer may add at least, whatever ``SFTPIPE_WORKER_MEMORY_MB`` says:
transformers, imported to load it, maps most of a gigabyte by itself."""
LOAD_WALL_S = 300.0
"""Seconds loading a tokenizer may take in all (a FIFO among its files blocks without CPU)."""


def _load_child(spec: str | Path, budget: int, send: Any) -> None:
    from sftdata.bounded import PROBE_EXIT_REFUSED, bound_task, bound_worker, run_probe

    bound_worker(budget)
    bound_task(LOAD_CPU_S)

    def work() -> None:
        try:
            snap = TokenizerSnapshot.of(load_tokenizer(spec))
        except ConfigError as e:
            send.send(("error", str(e)))
            raise
        send.send(("ok", snap))

    run_probe(work, send, refused=PROBE_EXIT_REFUSED)


def _load_bounded(spec: str | Path) -> TokenizerSnapshot:
    """:class:`TokenizerSnapshot` of ``load_tokenizer(spec)``, loaded in a fresh child under the
    operating-system bounds (``sftdata.bounded``): a user's tokenizer files are untrusted (a
    normalizer that grows text without end aborts the process that runs it)."""
    from sftdata.bounded import (
        PROBE_EXIT_REFUSED,
        how_it_ended,
        in_bounds,
        memory_budget,
        run_child,
    )

    if in_bounds():
        return TokenizerSnapshot.of(load_tokenizer(spec))
    budget = max(memory_budget(1), LOAD_MEMORY)
    code, message = run_child(_load_child, spec, budget, wall=LOAD_WALL_S)
    if isinstance(message, tuple) and message[0] == "ok" and code == 0:
        return message[1]
    if isinstance(message, tuple) and message[0] == "error":
        raise ConfigError(message[1])
    if code in (0, 1, PROBE_EXIT_REFUSED):  # an error that is not the tokenizer's: repeat it
        return TokenizerSnapshot.of(load_tokenizer(spec))
    how = how_it_ended(code, message, budget=budget, seconds=LOAD_CPU_S, wall=LOAD_WALL_S)
    raise ConfigError(f"{spec}: a broken or hostile tokenizer: loading it {how}")


def load_snapshot(spec: str | Path) -> TokenizerSnapshot:
    """:class:`TokenizerSnapshot` of ``load_tokenizer(spec)``, from the cache when it holds one.

    The cache entry is keyed by the sha256 of the tokenizer's files and the versions of
    sftpipe, transformers and tokenizers, so any change to them loads afresh.

    Raises:
        ConfigError: as :func:`load_tokenizer`.
    """
    path = resolve_spec(spec)
    files = _content_files(path)
    if files is None:
        return _load_bounded(spec)
    try:
        key = _cache_key(files)
    except OSError:  # unreadable: load_tokenizer names the problem
        return _load_bounded(spec)
    entry = cache_dir() / "tokenizers" / f"{key}.json"
    snap = _read_cached(entry, key)
    if snap is not None:
        return replace(snap, name_or_path=str(path))
    snap = _load_bounded(spec)
    _write_cached(entry, key, snap)
    return snap


__all__ = ["SNAPSHOT_VERSION", "cache_dir", "content_key", "load_snapshot"]
