"""Reading a shard folder: rows memory-mapped from the Arrow files with zero copies, each shard's
sha256 checked (all up front, lazily on first use, or sizes only) before its rows are served."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import sha256_file
from sftdata.errors import ShardError
from sftdata.shards.format import (
    FIXED_COLUMNS,
    INDEX_NAME,
    VERIFY_MODES,
    arrow_schema,
    read_index,
    safe_shard_path,
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

    With ``fetch`` (a remote folder's, :class:`sftdata.remote.RemoteFolder`), the shards need
    not be in the folder yet: each is fetched the first time it is read, ``fetch(name)`` returning
    once the file is there and matches the index's size and sha256 (so that is its verification),
    and :meth:`prefetch` fetches and opens shards in the background in the order they will be
    read.

    Refusals raise ``ShardError`` naming the folder or file and what is wrong.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        split: str = "train",
        verify: bool | str = True,
        fetch: Callable[[str], Any] | None = None,
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
        self._fetch = fetch
        for e in self._entries:
            p = safe_shard_path(self.path, e["file"], missing_ok=fetch is not None)
            size = int(e["bytes"])
            if fetch is None and (size := p.stat().st_size) != e["bytes"]:
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
        self._locks = [threading.Lock() for _ in self._entries]
        self._pending: dict[int, Future[_Shard]] = {}
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._closed = False
        self._failed: BaseException | None = None
        if mode == "full":
            # every shard hashed AND opened now (columns, row count, token ids in the
            # vocabulary): a crafted shard deep in the split is refused before a run starts,
            # not hours in; the check's memory map is dropped (reopened when first read)
            for k in range(len(self._entries)):
                if fetch is not None:
                    self._load(k)
                else:
                    self._check_hash(k)
                    self._open(k)

    @staticmethod
    def splits(path: str | os.PathLike[str]) -> list[str]:
        """Names of the splits in a shard folder, e.g. ``["train", "validation"]``."""
        return list(read_index(path)["splits"])

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps, locks and threads do not pickle (DataLoader workers under spawn): reopen
        # lazily there.
        state = self.__dict__.copy()
        state["_shards"] = [None] * len(self._entries)
        for key in ("_locks", "_pending", "_queue", "_threads", "_threads_lock"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._locks = [threading.Lock() for _ in self._entries]
        self._pending, self._queue, self._threads = {}, queue.SimpleQueue(), []
        self._threads_lock = threading.Lock()

    def _check_hash(self, k: int) -> None:
        if self._verified[k]:
            return
        p, want = self._paths[k], self._entries[k]["sha256"]
        got = sha256_file(p)
        if got != want:
            raise ShardError(f"{p}: sha256 {got[:12]}… does not match the index ({want[:12]}…)")
        self._verified[k] = True

    def _shard(self, k: int) -> _Shard:
        if self._failed is not None:  # a shard fetched ahead was refused: stop at once
            raise self._failed
        shard = self._shards[k]
        if shard is not None:
            return shard
        pending = self._pending.get(k)
        if (
            pending is not None
            and not pending.cancelled()
            and (pending.running() or pending.done())
        ):
            return pending.result()
        return self._load(k)  # not started yet: not behind the shards queued before it

    def _load(self, k: int) -> _Shard:
        """Shard ``k`` fetched (a remote folder), verified and opened, once."""
        with self._locks[k]:
            shard = self._shards[k]
            if shard is None:
                if self._fetch is not None:
                    self._fetch(self._entries[k]["file"])  # checks size and sha256
                    self._verified[k] = True
                elif self.verify != "size":
                    self._check_hash(k)
                shard = self._open(k)
                self._shards[k] = shard
        return shard

    @property
    def shard_count(self) -> int:
        """Shards in this split."""
        return len(self._entries)

    def shards_of(self, rows: np.ndarray) -> list[int]:
        """The shards holding ``rows``, in the order the rows first reach them."""
        ks = np.searchsorted(self._starts, np.asarray(rows, dtype=np.int64), side="right") - 1
        unique, first = np.unique(ks, return_index=True)
        return [int(k) for k in unique[np.argsort(first)]]

    def prefetch(self, order: Sequence[int], *, workers: int = 4) -> None:
        """Fetch, verify and open shards ``order`` in the background, in that order, ``workers``
        at a time (a folder with ``fetch`` only; elsewhere the files are already here). A read
        waits for its shard only; a shard refused in the background is raised by the next read.
        """
        if self._fetch is None:
            return
        queued = [k for k in order if self._shards[k] is None and k not in self._pending]
        for k in queued:
            self._pending[k] = Future()
            self._queue.put(k)
        self._start_fetchers(1)
        # the first shard alone first: the first batch waits for it, not for a share of the
        # bandwidth (measured: benchmarks/README.md, "Shards in object storage")
        if queued:
            self._pending[queued[0]].add_done_callback(lambda _: self._start_fetchers(workers))
        else:
            self._start_fetchers(workers)

    def _start_fetchers(self, count: int) -> None:
        # daemon threads, not an executor: a run that ends or fails early must not wait at exit
        # for every shard still queued (an executor's threads drain their queue first)
        with self._threads_lock:
            while len(self._threads) < count and not self._closed:
                thread = threading.Thread(
                    target=self._fetch_ahead, daemon=True, name="sftpipe-fetch"
                )
                thread.start()
                self._threads.append(thread)

    def _fetch_ahead(self) -> None:
        while not self._closed:
            k = self._queue.get()
            future = self._pending[k]
            if self._closed or not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._load(k))
            except BaseException as e:  # kept for the read that needs it, and the next read
                self._failed = self._failed or e
                future.set_exception(e)

    def close(self) -> None:
        """Stop fetching ahead (a download in progress ends; those not started are dropped)."""
        self._closed = True
        for future in self._pending.values():
            future.cancel()

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
