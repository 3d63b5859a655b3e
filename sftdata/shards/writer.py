"""Writing one shard file: rows buffered and flushed as Arrow record batches (uncompressed IPC
stream, the schema of ``format.arrow_schema``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import sha256_file
from sftdata.atomic import atomic_file
from sftdata.errors import ShardError
from sftdata.shards.format import FIXED_COLUMNS, arrow_schema, shard_file_name


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


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


# Arrays are built from buffers: pa.array() on numpy arrays or Python lists imports pandas on
# first use, a cost every pack worker would pay on its first shard (profiled).
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
