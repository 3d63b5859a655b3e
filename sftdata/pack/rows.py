"""Packing: whole records into rows of exactly ``seq_len`` tokens (pure functions, no I/O).

``pack_rows`` decides which records share a row (best-fit decreasing over the whole dataset);
``build_row`` lays one row out: concatenated tokens, HF-convention labels (unshifted, -100 where
not trained and at every record's first token, so no record learns from its neighbour),
``position_ids`` restarting at 0 per record, and a trailing padding segment.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sftdata import IGNORE_INDEX


def pack_rows(lengths: Sequence[int] | np.ndarray, *, seq_len: int) -> list[list[int]]:
    """Group record indices into rows whose total length is at most ``seq_len``.

    Best-fit decreasing: records are taken longest first (ties by index, so the result is
    deterministic) and each goes into the open row with the least remaining room that still
    fits it. Open rows are kept in buckets keyed by remaining capacity, with a sorted list of
    the non-empty capacities searched by ``bisect``: O(n log seq_len) overall.

    On the pack benchmark it comes within a row of the floor ceil(total/seq_len), above TRL's
    and LLaMA-Factory's per-1,000-record packing (figures in benchmarks/README.md): the many
    short records fill the gaps the long ones leave.

    Args:
        lengths: token count of each record; every one must be in ``1..seq_len``.
        seq_len: row capacity.

    Returns:
        Rows as lists of record indices (ascending within a row), in order of creation.
    """
    samples, starts = assign_rows(lengths, seq_len=seq_len)
    return [samples[a:b].tolist() for a, b in itertools.pairwise(starts.tolist())]


def assign_rows(
    lengths: Sequence[int] | np.ndarray, *, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """``pack_rows``' rows as flat arrays: record indices row after row (ascending within a
    row, rows in order of creation) and each row's offset (one more entry: the total).

    Each record's row is kept in an array, not in per-row Python lists, so the packer holds a few
    bytes per record; only the open rows' numbers live in Python objects.
    """
    lens = np.asarray(lengths)
    if lens.size and (lens.min() < 1 or lens.max() > seq_len):
        bad = int(np.flatnonzero((lens < 1) | (lens > seq_len))[0])
        raise ValueError(f"record {bad} has length {int(lens[bad])}, not in 1..{seq_len}")
    order = np.argsort(-lens.astype(np.int64), kind="stable")
    row_of = np.empty(len(lens), dtype=np.int32)
    n_rows = 0
    by_room: dict[int, list[int]] = {}  # remaining capacity -> open rows with exactly that room
    rooms: list[int] = []  # sorted distinct capacities that have at least one open row
    for lo in range(0, len(order), 8192):  # Python ints for one block at a time
        block = order[lo : lo + 8192]
        for i, n in zip(block.tolist(), lens[block].tolist(), strict=True):
            k = bisect.bisect_left(rooms, n)
            if k == len(rooms):
                r = n_rows
                n_rows += 1
                room = seq_len - n
            else:
                room_before = rooms[k]
                bucket = by_room[room_before]
                r = bucket.pop()
                if not bucket:
                    del by_room[room_before]
                    rooms.pop(k)
                room = room_before - n
            row_of[i] = r
            if room > 0:
                bucket = by_room.get(room)
                if bucket is None:
                    by_room[room] = [r]
                    bisect.insort(rooms, room)
                else:
                    bucket.append(r)
    samples = np.argsort(row_of, kind="stable")  # by row, then by index within a row
    starts = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=starts[1:])
    return samples, starts


PACK_WINDOW = 1_000_000
"""Records packed together by ``pack_rows_windowed``: the packer's arrays (about 28 bytes a
record while it runs) stay bounded however large the split is, and a split of up to a million
records is packed exactly as ``pack_rows`` packs it. Windows cost next to nothing in efficiency
(100,000-record windows on 500,000 repeated Alpaca records: 99.7404% against 99.7416% whole,
benchmarks/README.md)."""


def pack_rows_windowed(
    lengths: np.ndarray, *, seq_len: int, window: int = PACK_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """``pack_rows`` over consecutive windows of ``window`` records, as flat arrays: the record
    indices row after row (int32) and each row's offset in them (one more entry: the total).
    A split of at most ``window`` records is packed whole, exactly as ``pack_rows`` packs it."""
    samples: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    for first in range(0, len(lengths), window):
        flat, starts = assign_rows(lengths[first : first + window], seq_len=seq_len)
        samples.append((flat + first).astype(np.int32))  # 4 bytes a record, not 8
        sizes.append(np.diff(starts))
    if not samples:
        return np.empty(0, np.int32), np.zeros(1, np.int64)
    starts = np.zeros(sum(len(x) for x in sizes) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(sizes), out=starts[1:])
    return np.concatenate(samples), starts


def next_fit(lengths: Sequence[int] | np.ndarray, *, seq_len: int) -> list[list[int]]:
    """The naive baseline (records in input order, new row when the next one does not fit)."""
    rows: list[list[int]] = []
    room = 0
    for i, n in enumerate(np.asarray(lengths).tolist()):
        if not rows or n > room:
            rows.append([])
            room = seq_len
        rows[-1].append(i)
        room -= n
    return rows


def efficiency(total_tokens: int, rows: int, seq_len: int) -> float:
    """Fraction of row slots holding real tokens (1.0 = no padding at all)."""
    return total_tokens / (rows * seq_len) if rows else 0.0


@dataclass(frozen=True)
class Row:
    """One packed row, every array exactly ``seq_len`` long except ``seq_lens``."""

    input_ids: np.ndarray
    """int32[seq_len]: the records' tokens back to back, then padding."""
    labels: np.ndarray
    """int32[seq_len]: input_ids where trained, IGNORE_INDEX elsewhere (unshifted)."""
    position_ids: np.ndarray
    """int32[seq_len]: 0.. per record and 0.. again for the padding segment."""
    seq_lens: np.ndarray
    """int32[k]: segment lengths (records, then padding if any); sums to seq_len."""
    num_pad: int
    """Pad tokens at the end of the row (the last segment when > 0)."""


def build_row(
    segments: Sequence[tuple[np.ndarray, np.ndarray]], *, seq_len: int, pad_id: int
) -> Row:
    """Lay out whole records in one row.

    Args:
        segments: ``(input_ids, train_mask)`` per record, in row order.
        seq_len: the row length; the records' total must not exceed it.
        pad_id: token id used for padding (its labels are IGNORE_INDEX).
    """
    lens = [len(ids) for ids, _ in segments]
    used = sum(lens)
    if used > seq_len:
        raise ValueError(f"records total {used} tokens, more than seq_len {seq_len}")
    if any(n < 1 for n in lens):
        raise ValueError("empty record in a row")
    input_ids = np.full(seq_len, pad_id, dtype=np.int32)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int32)
    position_ids = np.empty(seq_len, dtype=np.int32)
    pos = 0
    for (ids, mask), n in zip(segments, lens, strict=True):
        sl = slice(pos, pos + n)
        input_ids[sl] = ids
        labels[sl] = np.where(mask, ids, IGNORE_INDEX)
        # The first token of a record must not be predicted from the previous record's last one.
        labels[pos] = IGNORE_INDEX
        position_ids[sl] = np.arange(n, dtype=np.int32)
        pos += n
    num_pad = seq_len - used
    position_ids[used:] = np.arange(num_pad, dtype=np.int32)
    seq_lens = np.asarray(lens + ([num_pad] if num_pad else []), dtype=np.int32)
    return Row(input_ids, labels, position_ids, seq_lens, num_pad)


def build_rows(
    ids: np.ndarray,
    mask: np.ndarray,
    lens: np.ndarray,
    row_starts: np.ndarray,
    *,
    seq_len: int,
    pad_id: int,
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[Row]:
    """:func:`build_row` for many rows at once: a row is three slice copies, not a Python loop
    per record (a shard's tens of thousands of records were most of a shard writer's time).

    Args:
        ids, mask: the records' tokens and train masks back to back, row after row.
        lens: each record's length (every one at least 1).
        row_starts: offset of each row's first record in ``lens`` (one more entry: the total).
        out: int32 ``(rows, seq_len)`` arrays for input_ids, labels and position_ids with room
            for the rows, reused between calls (the rows returned are views of them); fresh
            arrays when None.
    """
    lens = np.asarray(lens, dtype=np.int64)
    row_starts = np.asarray(row_starts, dtype=np.int64)
    n_rows = len(row_starts) - 1
    if lens.size and lens.min() < 1:
        raise ValueError("empty record in a row")
    first = np.cumsum(lens) - lens  # each record's first token in ``ids``
    ends = np.append(first, len(ids))[row_starts].tolist()  # each row's first token, the total
    used = [b - a for a, b in itertools.pairwise(ends)]
    if used and max(used) > seq_len:
        raise ValueError(f"records total {max(used)} tokens, more than seq_len {seq_len}")
    labels_flat = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
    labels_flat[first] = IGNORE_INDEX  # no record is predicted from its neighbour's last token
    positions = (np.arange(len(ids), dtype=np.int64) - np.repeat(first, lens)).astype(np.int32)
    if out is None:
        shape = (n_rows, seq_len)
        out = (np.empty(shape, np.int32), np.empty(shape, np.int32), np.empty(shape, np.int32))
    input_ids, labels, position_ids = (x[:n_rows] for x in out)
    counting = np.arange(seq_len, dtype=np.int32)
    rows = []
    for r in range(n_rows):
        a, n = ends[r], used[r]
        input_ids[r, :n] = ids[a : a + n]
        input_ids[r, n:] = pad_id
        labels[r, :n] = labels_flat[a : a + n]
        labels[r, n:] = IGNORE_INDEX
        position_ids[r, :n] = positions[a : a + n]
        position_ids[r, n:] = counting[: seq_len - n]
        segs = lens[row_starts[r] : row_starts[r + 1]]
        pad = seq_len - n
        seq_lens = (np.append(segs, pad) if pad else segs).astype(np.int32)
        rows.append(Row(input_ids[r], labels[r], position_ids[r], seq_lens, pad))
    return rows
