"""What ``sftdata inspect`` shows of a packed row: record segments and trained/masked text runs."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import IGNORE_INDEX
from sftdata.errors import ConfigError, ShardError
from sftdata.shards import ShardReader
from sftdata.text import counted, stop_line

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
        pieces.append((bool(trained[a]), visible(piece)))
        prev = upto
    return pieces


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Control characters but newline and tab: ESC starts terminal escape sequences (colours, window
titles, cursor moves, hyperlinks) that the data must not get to run on the user's terminal."""


def visible(text: str) -> str:
    """``text`` with control characters shown as escapes (``\x1b``), never sent raw to a
    terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


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


def load_decoder(index: dict[str, Any], tokenizer: str | None) -> Any:
    """The Rust tokenizer (``tokenizers.Tokenizer``, whose ``decode`` is what transformers'
    fast tokenizers call) matching the shard index (``--tokenizer`` or the path stored at pack
    time), from the snapshot cache: no transformers, no torch once a pack has cached it."""
    from sftdata.errors import ConfigError
    from sftdata.tokenizer import tokenizer_identity
    from sftdata.tokenizer_cache import load_snapshot

    spec = tokenizer or index["tokenizer"].get("spec")
    if not spec:
        raise ConfigError("the shard index names no tokenizer path: pass --tokenizer")
    if tokenizer is None and spec != "tiny" and not Path(spec).exists():
        raise ConfigError(
            f"{spec}: the tokenizer these shards were packed with is gone: pass --tokenizer"
        )
    tok = load_snapshot(spec)
    if tokenizer_identity(tok)["sha256"] != index["tokenizer"]["sha256"]:
        raise ConfigError(
            f"{spec}: not the tokenizer these shards were packed with (content hash differs)"
        )
    return tok.backend_tokenizer


@dataclass
class RowView:
    """The row ``sftdata inspect`` shows: where it is, its segments, and which of them to show."""

    reader: ShardReader
    split: str
    row_i: int
    row: dict[str, Any]
    segments: list[dict[str, Any]]
    shown: list[dict[str, Any]]
    """All segments, or only the record asked for with ``--record``."""
    stop_tokens: list[str]
    """The template's stop tokens recorded at pack time."""


def locate_row(
    shards: Path, *, row_i: int | None, record_id: str | None, split: str | None
) -> RowView:
    """Row ``row_i`` (negative counts from the end) of ``split``, or the row holding
    ``record_id`` in ``split`` or any split.

    Raises:
        ConfigError: both given, or a row out of range. ShardError: no such record.
    """
    if row_i is not None and record_id is not None:
        raise ConfigError("--row and --record: give at most one")
    seg_pick = None
    if record_id is not None:
        for name in [split] if split else ShardReader.splits(shards):
            reader = ShardReader(shards, split=name)
            found = reader.find_record(record_id, missing_ok=True)
            if found is not None:
                (row_i, seg_pick), split = found, name
                break
        else:
            where = f"split {split!r}" if split else "any split"
            raise ShardError(f"{shards}: no record {record_id!r} in {where}")
    else:
        split = split or "train"
        reader = ShardReader(shards, split=split)
    row_i = 0 if row_i is None else row_i
    if not -len(reader) <= row_i < len(reader):
        raise ConfigError(f"--row {row_i}: split {split!r} of {shards} has {len(reader)} rows")
    row_i %= len(reader)
    row = reader[row_i]
    segs = segments(row)
    stops = list(reader.index.get("template", {}).get("stop_tokens") or [])
    shown = segs if seg_pick is None else [segs[seg_pick]]
    return RowView(reader, split, row_i, row, segs, shown, stops)


def row_header(view: RowView, *, markers: bool) -> str:
    """The first line: the row's place, records, lengths, padding, trained tokens and stop tokens
    (with ``markers``, how trained text is marked)."""
    recs = [s for s in view.segments if s["record_id"] is not None]
    trained = int(sum(s["trained"].sum() for s in recs))
    seq_len = view.reader.seq_len
    header = (
        f"row {view.row_i} of {len(view.reader)} (split {view.split}, seq_len {seq_len}): "
        f"{counted(len(recs), 'record')}, lengths {[len(s['ids']) for s in recs]}, "
        f"padding {view.row['num_pad']}, trained {trained} of {seq_len} tokens"
    )
    template = view.reader.index.get("template", {})
    if template.get("stops"):
        appended = view.reader.index.get("counts", {}).get("appended_stops", 0)
        header += f"; {stop_line(template['stops'], template.get('appended_stop'), appended)}"
    elif view.stop_tokens:  # packed before the stop set was recorded with its sources
        header += f"; stop tokens {', '.join(view.stop_tokens)}"
    if markers:
        header += (
            f"; trained text is wrapped in {TRAIN_OPEN} {TRAIN_CLOSE}, "
            f"reasoning in {TRAIN_OPEN}reasoning: {TRAIN_CLOSE}, "
            f"the stop token in {TRAIN_OPEN}stop: {TRAIN_CLOSE}"
        )
    return header
