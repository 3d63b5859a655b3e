"""The shard folder format: file names, the Arrow schema of every shard, ``index.json`` (written
last, validated against ``schemas/shard_index.v1.json`` on read) and safe paths inside a folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


def safe_shard_path(folder: Path, name: Any, *, missing_ok: bool = False) -> Path:
    """Resolve a shard name from the index, refusing anything but a plain file inside ``folder``
    (with ``missing_ok``, one not there yet: a remote folder's, fetched when first read)."""
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
        if missing_ok:
            return path
        raise ShardError(f"{path}: shard file is missing")
    if not path.is_file():
        raise ShardError(f"{path}: shard is not a regular file")
    return path
