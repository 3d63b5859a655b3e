"""Shard folders: Arrow IPC files of packed rows plus ``index.json`` (written last, atomically).

Layout of a folder (``schemas/shard_index.v1.json`` describes ``index.json``)::

    index.json             written last; its absence means "incomplete": every reader refuses
    train-00000.arrow      Arrow IPC *stream* files, uncompressed (``datasets.Dataset.from_file``
    train-00001.arrow      opens them; ``ShardReader`` memory-maps them with zero copies)
    validation-00000.arrow

Columns of every shard (one row = one training sequence of exactly ``seq_len`` tokens):
``input_ids``, ``labels``, ``position_ids`` (fixed_size_list<int32, seq_len>), ``seq_lens``
(list<int32>: segment lengths, summing to seq_len; padding, if any, is the last segment),
``num_pad`` (int32), ``record_ids`` (list<string>, one per record segment).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sftdata.atomic import atomic_file
from sftdata.errors import ShardError
from sftdata.jsonfile import read_json_object, schema_problem

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
KIND = "sftpipe.shards"
SCHEMA = "shard_index.v1"
FIXED_COLUMNS = ("input_ids", "labels", "position_ids")
VERIFY_MODES = ("full", "lazy", "size")


def shard_file_name(split: str, k: int) -> str:
    """File name of the ``k``-th shard of ``split``."""
    return f"{split}-{k:05d}.arrow"


def arrow_schema(seq_len: int):
    """The Arrow schema of every shard file for rows of ``seq_len`` tokens."""
    import pyarrow as pa

    fixed = pa.list_(pa.int32(), seq_len)
    return pa.schema(
        [
            ("input_ids", fixed),
            ("labels", fixed),
            ("position_ids", fixed),
            ("seq_lens", pa.list_(pa.int32())),
            ("num_pad", pa.int32()),
            ("record_ids", pa.list_(pa.string())),
        ],
        metadata={b"sftpipe.format_version": str(FORMAT_VERSION).encode()},
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Buffer rows of one split and write them as shard files of ``shard_size`` rows.

    Rows are written in the order they are added; nothing here is random, so the same rows
    give byte-identical files.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        split: str,
        seq_len: int,
        shard_size: int,
        first_shard: int = 0,
    ):
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self.folder = Path(folder)
        self.split = split
        self.seq_len = seq_len
        self.shard_size = shard_size
        self.first_shard = first_shard
        """Number of this writer's first file (writers of one split may run in parallel)."""
        self.shards: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        shape = (self.shard_size, self.seq_len)
        self._cols = {c: np.empty(shape, dtype=np.int32) for c in FIXED_COLUMNS}
        self._seq_lens: list[np.ndarray] = []
        self._num_pad: list[int] = []
        self._record_ids: list[list[str]] = []

    def add(self, row: Any, record_ids: Sequence[str]) -> None:
        """Append one row (a ``sftdata.pack.Row``) and the ids of its records."""
        n = len(self._num_pad)
        for c in FIXED_COLUMNS:
            self._cols[c][n] = getattr(row, c)
        self._seq_lens.append(np.asarray(row.seq_lens, dtype=np.int32))
        self._num_pad.append(int(row.num_pad))
        self._record_ids.append(list(record_ids))
        if len(self._num_pad) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows (if any) as the next shard file."""
        import pyarrow as pa

        n = len(self._num_pad)
        if n == 0:
            return
        schema = arrow_schema(self.seq_len)
        arrays = [
            pa.FixedSizeListArray.from_arrays(_int32(self._cols[c][:n].reshape(-1)), self.seq_len)
            for c in FIXED_COLUMNS
        ]
        arrays.append(_int32_lists(self._seq_lens))
        arrays.append(_int32(np.asarray(self._num_pad, dtype=np.int32)))
        arrays.append(_string_lists(self._record_ids))
        batch = pa.record_batch(arrays, schema=schema)
        name = shard_file_name(self.split, self.first_shard + len(self.shards))
        path = self.folder / name
        with atomic_file(path, mode="wb") as f:
            sink = pa.PythonFile(f, mode="w")
            with pa.ipc.new_stream(sink, schema) as w:
                w.write_batch(batch)
        self.shards.append(
            {"file": name, "rows": n, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
        self._reset()


# Arrays are built from buffers: pa.array() on numpy arrays or Python lists imports pandas on
# first use (measured: 0.24 s in every pack worker's first shard, a third of the write stage).


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _int32(values: np.ndarray) -> Any:
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def _int32_lists(rows: Sequence[np.ndarray]) -> Any:
    import pyarrow as pa

    flat = np.concatenate(rows) if rows else np.empty(0, np.int32)
    return pa.ListArray.from_arrays(_int32(_offsets([len(r) for r in rows])), _int32(flat))


def _string_lists(rows: Sequence[Sequence[str]]) -> Any:
    import pyarrow as pa

    encoded = [s.encode("utf-8") for row in rows for s in row]
    sizes = [len(b) for b in encoded]
    if sum(sizes) > np.iinfo(np.int32).max:  # string offsets are int32
        raise ShardError("the record ids of one shard exceed 2 GiB; use a smaller --shard-size")
    chars = _offsets(sizes)
    strings = pa.StringArray.from_buffers(
        len(encoded), pa.py_buffer(chars), pa.py_buffer(b"".join(encoded))
    )
    return pa.ListArray.from_arrays(_int32(_offsets([len(r) for r in rows])), strings)


def validate_index(index: Any, *, where: str) -> None:
    """Check ``index`` against ``schemas/shard_index.v1.json``; ShardError naming ``where``."""
    problem = schema_problem(index, SCHEMA)
    if problem is not None:
        raise ShardError(f"{where}: {problem}")


def write_index(folder: str | os.PathLike[str], index: dict[str, Any]) -> Path:
    """Validate and write ``index.json`` atomically (the last step of a pack)."""
    path = Path(folder) / INDEX_NAME
    validate_index(index, where=str(path))
    with atomic_file(path) as f:
        json.dump(index, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")
    return path


def read_index(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check ``index.json`` of a shard folder (presence, JSON, version, schema)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"{folder}: not a folder (expected a shard folder from sftdata pack)")
    path = folder / INDEX_NAME
    if not path.is_file():
        raise ShardError(
            f"{folder}: no {INDEX_NAME} (not a shard folder, or an interrupted pack: run it again)"
        )
    index = read_json_object(path, error=ShardError)
    version = index.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {version!r} is not supported (this reader knows {FORMAT_VERSION})"
        )
    validate_index(index, where=str(path))
    return index


def safe_shard_path(folder: Path, name: Any) -> Path:
    """Resolve a shard name from the index, refusing anything but a plain file inside ``folder``."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
    ):
        raise ShardError(
            f"{folder}: shard name {name!r} is not a plain file name inside the folder"
        )
    path = folder / name
    try:
        inside = path.resolve(strict=False).parent == folder.resolve()
    except OSError:
        inside = False
    if not inside:
        raise ShardError(f"{folder}: shard {name!r} points outside the folder")
    if not path.exists():
        raise ShardError(f"{path}: shard file is missing")
    if not path.is_file():
        raise ShardError(f"{path}: shard is not a regular file")
    return path


class _Shard:
    """One memory-mapped shard: zero-copy numpy views of its columns."""

    def __init__(self, path: Path, *, seq_len: int, rows: int):
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
            for k in range(len(self._entries)):
                self._check_hash(k)

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
                    shard = _Shard(
                        self._paths[k], seq_len=self.seq_len, rows=int(self._entries[k]["rows"])
                    )
                    self._shards[k] = shard
        return shard

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
