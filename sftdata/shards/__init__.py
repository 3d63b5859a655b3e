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

from sftdata.shards.format import (
    FIXED_COLUMNS,
    FORMAT_VERSION,
    INDEX_NAME,
    KIND,
    SCHEMA,
    VERIFY_MODES,
    arrow_schema,
    read_index,
    safe_shard_path,
    shard_file_name,
    validate_index,
    write_index,
)
from sftdata.shards.reader import ShardReader
from sftdata.shards.writer import ShardWriter

__all__ = [
    "FIXED_COLUMNS",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "KIND",
    "SCHEMA",
    "VERIFY_MODES",
    "ShardReader",
    "ShardWriter",
    "arrow_schema",
    "read_index",
    "safe_shard_path",
    "shard_file_name",
    "validate_index",
    "write_index",
]
