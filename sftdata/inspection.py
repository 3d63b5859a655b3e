"""What ``sftdata inspect`` shows of a packed row: record segments and trained/masked text runs."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import IGNORE_INDEX

TRAIN_OPEN, TRAIN_CLOSE = "[[", "]]"


def segments(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Split a reader row into its record segments (and the padding segment, if any).

    Each item: ``record_id`` (None for padding), ``ids`` (int32), ``trained`` (bool per token:
    the label is not IGNORE_INDEX, i.e. what the model learns), ``start`` (offset in the row).
    """
    out, pos = [], 0
    rids = row["record_ids"]
    for k, n in enumerate(np.asarray(row["seq_lens"]).tolist()):
        sl = slice(pos, pos + n)
        out.append(
            {
                "record_id": rids[k] if k < len(rids) else None,
                "ids": row["input_ids"][sl],
                "trained": row["labels"][sl] != IGNORE_INDEX,
                "start": pos,
            }
        )
        pos += n
    return out


def runs(ids: np.ndarray, trained: np.ndarray, decode) -> list[tuple[bool, str]]:
    """Decoded text of consecutive same-status tokens, as ``(trained, text)`` pieces.

    Text is decoded from the record start up to each run's end and differenced, so pieces join
    to the same text a whole-record decode gives (no spaces lost at run edges).
    """
    if len(ids) == 0:
        return []
    edges = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(ids)]
    pieces, prev = [], ""
    for a, b in itertools.pairwise(bounds):
        upto = decode(ids[:b].tolist())
        piece = upto[len(prev) :] if upto.startswith(prev) else decode(ids[a:b].tolist())
        pieces.append((bool(trained[a]), piece))
        prev = upto
    return pieces


def plain_text(pieces: list[tuple[bool, str]]) -> str:
    """Pieces joined with trained text wrapped in the ``[[``/``]]`` markers."""
    return "".join(f"{TRAIN_OPEN}{t}{TRAIN_CLOSE}" if tr else t for tr, t in pieces)


def load_decoder(index: dict[str, Any], tokenizer: str | None):
    """A tokenizer matching the shard index (``--tokenizer`` or the path stored at pack time)."""
    from sftdata.errors import ConfigError
    from sftdata.tokenizer import load_tokenizer, tokenizer_identity

    spec = tokenizer or index["tokenizer"].get("spec")
    if not spec:
        raise ConfigError("the shard index names no tokenizer path: pass --tokenizer")
    if tokenizer is None and spec != "tiny" and not Path(spec).exists():
        raise ConfigError(
            f"{spec}: the tokenizer these shards were packed with is gone: pass --tokenizer"
        )
    tok = load_tokenizer(spec)
    if tokenizer_identity(tok)["sha256"] != index["tokenizer"]["sha256"]:
        raise ConfigError(
            f"{spec}: not the tokenizer these shards were packed with (content hash differs)"
        )
    return tok
