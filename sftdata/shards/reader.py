"""Reading a shard folder: rows memory-mapped from the Arrow files with zero copies, each shard's
sha256 checked (all up front, lazily on first use, or sizes only) before its rows are served."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sftdata.errors import ShardError
from sftdata.shards.format import (
    FIXED_COLUMNS,
    INDEX_NAME,
    VERIFY_MODES,
    arrow_schema,
    read_index,
    safe_shard_path,
    sha256_file,
)

MAX_SEQ_LEN = (1 << 31) - 1
"""Arrow's fixed-size list length is an int32: no shard can have longer rows."""
ROW_INT32S = 3
"""int32 values per token a row holds at least (input_ids, labels, position_ids)."""


class _Shard:
    """One memory-mapped shard: zero-copy numpy views of its columns."""

    def __init__(self, path: Path, *, seq_len: int, rows: int, vocab_size: int | None = None):
        import pyarrow as pa

        try:
            self._mmap = pa.memory_map(str(path), "r")
            reader = pa.ipc.open_stream(self._mmap)
            expected = arrow_schema(seq_len)
            if not reader.schema.remove_metadata().equals(expected.remove_metadata()):
                raise ShardError(f"{path}: columns do not match a seq_len {seq_len} shard")
            batches = list(reader)
        except pa.ArrowException as e:
            raise ShardError(f"{path}: not a readable Arrow shard ({e})") from None
        table = pa.Table.from_batches(batches, schema=reader.schema).combine_chunks()
        if table.num_rows != rows:
            raise ShardError(f"{path}: holds {table.num_rows} rows, the index says {rows}")
        self.cols: dict[str, np.ndarray] = {}
        for c in FIXED_COLUMNS:
            col = table.column(c)
            arr = col.chunk(0) if col.num_chunks else pa.array([], type=col.type)
            self.cols[c] = arr.flatten().to_numpy(zero_copy_only=True).reshape(rows, seq_len)
        ids = self.cols["input_ids"]
        if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            # hash-consistent but not what a pack writes: an embedding lookup would fail (or
            # read another row's memory) on it
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ShardError(
                f"{path}: token id {bad} is outside the tokenizer's vocabulary ({vocab_size:,} ids)"
            )
        lens = table.column("seq_lens").chunk(0)
        self._len_offsets = lens.offsets.to_numpy(zero_copy_only=True)
        self._len_values = lens.flatten().to_numpy(zero_copy_only=True)
        self._len_base = int(self._len_offsets[0]) if rows else 0
        self.num_pad = table.column("num_pad").chunk(0).to_numpy(zero_copy_only=True)
        self._record_ids = table.column("record_ids").chunk(0)
        self._table = table  # keeps the buffers (and the memory map) alive

    def seq_lens(self, i: int) -> np.ndarray:
        a, b = self._len_offsets[i], self._len_offsets[i + 1]
        return self._len_values[a - self._len_base : b - self._len_base]

    def record_ids(self, i: int) -> list[str]:
        return self._record_ids[i].as_py()

    def all_record_ids(self) -> list[list[str]]:
        return self._record_ids.to_pylist()


class ShardReader:
    """Read one split of a shard folder with zero-copy row access.

    Checks at open: ``index.json`` present, known ``format_version``, valid against the
    schema; every shard name a plain file inside the folder; every shard's size. ``verify``
    decides when shard sha256s are checked:

    - ``"lazy"`` (default; ``True`` means this): each shard is hashed the first time one of
      its rows is read, so time to first batch stays one shard's hash (~50 MB) whatever the
      folder size, and no row is ever returned from an unverified shard.
    - ``"full"``: every shard is hashed at open.
    - ``"size"`` (``False`` means this): sizes only, no hashing.

    Refusals raise ``ShardError`` naming the folder or file and what is wrong.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, split: str = "train", verify: bool | str = True
    ):
        mode = (
            {True: "lazy", False: "size"}.get(verify, verify)
            if isinstance(verify, bool)
            else verify
        )
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify must be True, False or one of {VERIFY_MODES}, got {verify!r}")
        self.path = Path(path)
        self.split = split
        self.verify = mode
        self.index: dict[str, Any] = read_index(self.path)
        self.seq_len: int = int(self.index["seq_len"])
        if self.seq_len > MAX_SEQ_LEN:
            raise ShardError(
                f"{self.path / INDEX_NAME}: seq_len {self.seq_len:,} is past Arrow's list size "
                f"({MAX_SEQ_LEN:,}); not an index sftdata pack wrote"
            )
        splits = self.index["splits"]
        if split not in splits:
            raise ShardError(f"{self.path}: no split {split!r} (it has {', '.join(splits)})")
        self._entries: list[dict[str, Any]] = list(splits[split]["shards"])
        self._paths: list[Path] = []
        for e in self._entries:
            p = safe_shard_path(self.path, e["file"])
            size = p.stat().st_size
            if size != e["bytes"]:
                raise ShardError(f"{p}: size {size} bytes, the index says {e['bytes']}")
            # three int32 columns of seq_len per row must be in the file: an index claiming
            # more rows than its bytes hold is refused before anything is sized by it
            if int(e["rows"]) * self.seq_len * ROW_INT32S * 4 > size:
                raise ShardError(
                    f"{p}: {size:,} bytes cannot hold the {int(e['rows']):,} rows of "
                    f"{self.seq_len:,} tokens the index says"
                )
            self._paths.append(p)
        rows = [int(e["rows"]) for e in self._entries]
        self._starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        self._len = int(self._starts[-1])
        if self._len != int(splits[split]["rows"]):
            raise ShardError(
                f"{self.path / INDEX_NAME}: split {split!r} rows disagree with its shards"
            )
        self._shards: list[_Shard | None] = [None] * len(self._entries)
        self._verified = [False] * len(self._entries)
        self._lock = threading.Lock()
        if mode == "full":
            # every shard hashed AND opened now (columns, row count, token ids in the
            # vocabulary): a crafted shard deep in the split is refused before a run starts,
            # not hours in; the check's memory map is dropped (reopened when first read)
            for k in range(len(self._entries)):
                self._check_hash(k)
                self._open(k)

    @staticmethod
    def splits(path: str | os.PathLike[str]) -> list[str]:
        """Names of the splits in a shard folder, e.g. ``["train", "validation"]``."""
        return list(read_index(path)["splits"])

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps do not pickle (DataLoader workers under spawn): reopen lazily there.
        state = self.__dict__.copy()
        state["_shards"] = [None] * len(self._entries)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _check_hash(self, k: int) -> None:
        if self._verified[k]:
            return
        p, want = self._paths[k], self._entries[k]["sha256"]
        got = sha256_file(p)
        if got != want:
            raise ShardError(f"{p}: sha256 {got[:12]}… does not match the index ({want[:12]}…)")
        self._verified[k] = True

    def _shard(self, k: int) -> _Shard:
        shard = self._shards[k]
        if shard is None:
            with self._lock:
                shard = self._shards[k]
                if shard is None:
                    if self.verify != "size":
                        self._check_hash(k)
                    shard = self._open(k)
                    self._shards[k] = shard
        return shard

    def _open(self, k: int) -> _Shard:
        vocab = (self.index.get("tokenizer") or {}).get("vocab_size")
        return _Shard(
            self._paths[k], seq_len=self.seq_len, rows=int(self._entries[k]["rows"]),
            vocab_size=vocab if isinstance(vocab, int) else None,
        )  # fmt: skip

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"row {i} out of range for {self._len} rows")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._shard(k), i - int(self._starts[k])

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row ``i``: read-only numpy views into the memory-mapped shard (no copies)."""
        shard, j = self._locate(int(i))
        out: dict[str, Any] = {c: shard.cols[c][j] for c in FIXED_COLUMNS}
        out["seq_lens"] = shard.seq_lens(j)
        out["num_pad"] = int(shard.num_pad[j])
        out["record_ids"] = shard.record_ids(j)
        return out

    def get_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """Rows ``indices`` stacked: 2-D int32 arrays for the fixed-size columns (one copy),
        an int32 array for ``num_pad`` and lists for ``seq_lens`` and ``record_ids``."""
        rows = [self[i] for i in indices]
        out: dict[str, Any] = {
            c: np.stack([r[c] for r in rows]) if rows else np.empty((0, self.seq_len), np.int32)
            for c in FIXED_COLUMNS
        }
        out["seq_lens"] = [r["seq_lens"] for r in rows]
        out["num_pad"] = np.asarray([r["num_pad"] for r in rows], dtype=np.int32)
        out["record_ids"] = [r["record_ids"] for r in rows]
        return out

    def find_record(self, record_id: str, *, missing_ok: bool = False) -> tuple[int, int] | None:
        """``(row, segment)`` holding record ``record_id``.

        Raises ShardError if it is not in this split, or returns None with ``missing_ok``.
        """
        for k in range(len(self._entries)):
            for j, ids in enumerate(self._shard(k).all_record_ids()):
                if record_id in ids:
                    return int(self._starts[k]) + j, ids.index(record_id)
        if missing_ok:
            return None
        raise ShardError(f"{self.path}: no record {record_id!r} in split {self.split!r}")
