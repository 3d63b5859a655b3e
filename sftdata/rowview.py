"""What ``sftdata inspect`` shows of a packed row: record segments and trained/masked text runs."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import IGNORE_INDEX

TRAIN_OPEN, TRAIN_CLOSE = "[[", "]]"
KIND_PREFIX = {"reply": "", "reasoning": "reasoning: ", "stop": "stop: "}
"""Plain-text marker of each trained kind: ``[[reply]]``, ``[[reasoning: ...]]``, ``[[stop: ...]]``."""

REASONING_RE = re.compile(
    r"<think>.*?(?:</think>|$)"  # Qwen3, DeepSeek-R1, GLM, and sftdata's reasoning fold-in
    r"|<\|channel\|>analysis<\|message\|>.*?(?:<\|end\|>|$)"  # gpt-oss analysis channel
    r"|<\|channel>thought.*?(?:<channel\|>|$)",  # Gemma 4
    re.S,
)
"""Reasoning blocks as the chat templates sftdata knows write them (display only: masks never
depend on this)."""


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


def classify(pieces: list[tuple[bool, str]], stop_tokens: list[str]) -> list[tuple[str, str]]:
    """``runs`` pieces as ``(kind, text)``: ``masked``, or a trained ``reply``, ``reasoning``
    block or ``stop`` token (the stop tokens recorded in the shard index)."""
    stops = sorted((t for t in stop_tokens if t), key=len, reverse=True)
    stop_re = re.compile("|".join(re.escape(t) for t in stops)) if stops else None
    out: list[tuple[str, str]] = []
    for trained, text in pieces:
        if not trained:
            out.append(("masked", text))
            continue
        at = 0
        for m in REASONING_RE.finditer(text):
            out += _stops(text[at : m.start()], stop_re)
            out.append(("reasoning", m.group(0)))
            at = m.end()
        out += _stops(text[at:], stop_re)
    return [(k, t) for k, t in out if t]


def _stops(text: str, stop_re: re.Pattern[str] | None) -> list[tuple[str, str]]:
    if stop_re is None:
        return [("reply", text)]
    out, at = [], 0
    for m in stop_re.finditer(text):
        out += [("reply", text[at : m.start()]), ("stop", m.group(0))]
        at = m.end()
    return [*out, ("reply", text[at:])]


def plain_text(pieces: list[tuple[str, str]]) -> str:
    """Classified pieces joined, each trained one wrapped in ``[[``/``]]`` with its kind."""
    return "".join(
        t if kind == "masked" else f"{TRAIN_OPEN}{KIND_PREFIX[kind]}{t}{TRAIN_CLOSE}"
        for kind, t in pieces
    )


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
