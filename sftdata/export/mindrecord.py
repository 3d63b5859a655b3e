"""Packed shards -> MindRecord for MindSpore Transformers (MindFormers), ``sftdata export --format mindrecord``.

What MindFormers reads, and what this matches (see the README's interop section for the sources):

* ``legacy`` layout (default), as ``mindformers/tools/dataset_preprocess/llama/llama_preprocess.py
  --dataset_type qa`` writes it: columns ``input_ids`` and ``labels``, both ``int32`` with shape
  ``[-1]``, every row ``seq_len + 1`` long (the script pads/truncates to ``--seq_length + 1``; the
  model slices ``input_ids[:, :-1]`` as inputs and ``labels[:, 1:]`` as targets). Labels are
  unshifted, ``-100`` (their IGNORE_TOKEN_ID) where not trained. Our rows are ``seq_len`` long, so
  one pad token (label -100) is appended: no trained token is lost because the label at a
  record's first token is always -100.
* ``mcore`` layout, as MindFormers' Hugging Face data handlers build rows when ``use_legacy`` is
  off (``mindformers/dataset/handler/alpaca_handler.py``): rows exactly ``seq_len`` long, labels
  pre-shifted (``labels[t]`` is the target of position ``t``, the last one -100).
* packed rows: MindFormers' ``PackingHandler`` (``mindformers/dataset/handler/packing_handler.py``)
  adds an ``actual_seq_len`` column of cumulative record end offsets (no leading 0; padding is not
  a record); its MindDataset loader switches on the compressed EOD attention mask when that
  column exists. We write the same column from the shards' ``seq_lens``.

The MindRecord ``desc`` carries a small JSON header (``format_version``, layout, seq_len,
tokenizer and template hashes); ``schemas/mindrecord.v1.json`` documents it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import IGNORE_INDEX
from sftdata.atomic import current_umask, follow_umask
from sftdata.errors import ConfigError, ShardError
from sftdata.inputs import refuse_overwriting

FORMAT_VERSION = 1
LAYOUTS = ("legacy", "mcore")
INSTALL_HINT = "mindrecord export needs the optional extra: pip install 'sftpipe[mindrecord]'"
_BATCH = 512  # rows per FileWriter.write_raw_data call


@dataclass
class MindRecordReport:
    """What ``export_mindrecord`` wrote."""

    output: str
    """The MindRecord file (``output + '.db'`` is its index)."""
    rows: int
    """Rows written."""
    row_len: int
    """Length of every ``input_ids``/``labels`` row."""
    columns: list[str]
    """Column names, in schema order."""
    layout: str
    """``legacy`` or ``mcore``."""


def schema(*, boundaries: bool) -> dict[str, dict[str, Any]]:
    """The FileWriter schema: int32 variable-length columns, as MindFormers' scripts declare them."""
    cols = {
        "input_ids": {"type": "int32", "shape": [-1]},
        "labels": {"type": "int32", "shape": [-1]},
    }
    if boundaries:
        cols["actual_seq_len"] = {"type": "int32", "shape": [-1]}
    return cols


def convert_row(
    row: dict[str, Any], *, layout: str, pad_token_id: int, boundaries: bool
) -> dict[str, np.ndarray]:
    """One shard row (ShardReader's dict) -> one MindRecord sample. Pure.

    Args:
        row: ``input_ids``/``labels`` int32[seq_len], ``seq_lens`` int32[k], ``num_pad`` int.
        layout: ``legacy`` (seq_len + 1, unshifted labels) or ``mcore`` (seq_len, shifted labels).
        pad_token_id: the id written at padding positions and in the appended legacy column.
        boundaries: add ``actual_seq_len`` (cumulative end offsets of the real records).
    """
    ids = np.asarray(row["input_ids"], dtype=np.int32)
    labels = np.asarray(row["labels"], dtype=np.int32)
    num_pad = int(row.get("num_pad", 0))
    if num_pad:
        ids = ids.copy()
        ids[len(ids) - num_pad :] = pad_token_id
    if layout == "legacy":
        ids = np.concatenate([ids, np.array([pad_token_id], dtype=np.int32)])
        labels = np.concatenate([labels, np.array([IGNORE_INDEX], dtype=np.int32)])
    elif layout == "mcore":
        labels = np.concatenate([labels[1:], np.array([IGNORE_INDEX], dtype=np.int32)])
    else:
        raise ConfigError(f"--layout {layout!r} is not one of {LAYOUTS}")
    out = {"input_ids": ids, "labels": labels}
    if boundaries:
        seg = np.asarray(row["seq_lens"], dtype=np.int64)
        if num_pad:
            seg = seg[:-1]  # the padding segment is the last one and is not a record
        out["actual_seq_len"] = np.cumsum(seg).astype(np.int32)
    return out


def _is_packed(reader: Any) -> bool:
    """Whether any row of the shards holds more than one record (then boundaries matter)."""
    for i in range(len(reader)):
        row = reader[i]
        real = len(row["seq_lens"]) - (1 if int(row.get("num_pad", 0)) else 0)
        if real > 1:
            return True
    return False


@contextlib.contextmanager
def _atomic_mindrecord(output: Path):
    """Yield a temp path with ``output``'s file name; move ``X`` and ``X.db`` onto ``output`` at the end.

    MindRecord stores its own file name in the header and refuses a renamed file, so the temp
    files keep the final name inside a temp folder beside the target (same filesystem).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    follow_umask(tmpdir, folder=True)
    try:
        target = tmpdir / output.name
        yield target
        db = output.with_name(output.name + ".db")
        mask = current_umask()  # FileWriter creates 0600 files; give them the usual mode
        for f in (target, target.with_name(target.name + ".db")):
            follow_umask(f, umask=mask)
        # Index first, data file last: a reader opening ``output`` then finds a matching .db.
        os.replace(target.with_name(target.name + ".db"), db)
        os.replace(target, output)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def export_mindrecord(
    shards_dir: str | Path,
    output: str | Path,
    *,
    split: str = "train",
    layout: str = "legacy",
    pad_token_id: int | None = None,
    boundaries: bool | None = None,
) -> MindRecordReport:
    """Write the rows of a shard folder's ``split`` as one MindRecord file (+ ``.db``), atomically.

    Args:
        shards_dir: a folder written by ``sftdata pack``.
        output: the MindRecord file to write (``output.db`` is written beside it).
        split: which split of the shards to export.
        layout: ``legacy`` or ``mcore`` (see the module docstring).
        pad_token_id: id for padding positions; ``None`` keeps the shards' pad id.
        boundaries: write ``actual_seq_len``; ``None`` = only when some row packs several records.

    Raises:
        ConfigError: mindspore is not installed, or a bad option.
        ShardError: the shard folder is missing, foreign or corrupted (from ShardReader).
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is not one of {LAYOUTS}")
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"{output}: is a folder; -o names the MindRecord file to write")
    # what holds without the extra is checked first, so it holds in every install
    refuse_overwriting([shards_dir], output)
    refuse_overwriting([shards_dir], f"{output}.db")
    try:
        from mindspore.mindrecord import FileWriter
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    from sftdata.shards import ShardReader

    reader = ShardReader(shards_dir, split=split)
    if len(reader) == 0:
        raise ShardError(f"{shards_dir}: split {split!r} has no rows to export")
    if boundaries is None:
        packed = reader.index.get("packed")
        boundaries = packed if isinstance(packed, bool) else _is_packed(reader)
    seq_len = int(reader.seq_len)
    index = reader.index
    if pad_token_id is None:
        pad_token_id = (index.get("tokenizer") or {}).get("pad_token_id")
        if not isinstance(pad_token_id, int):
            raise ShardError(f"{shards_dir}/index.json: tokenizer.pad_token_id is missing")
    desc = json.dumps(
        {
            "producer": "sftpipe",
            "format_version": FORMAT_VERSION,
            "layout": layout,
            "seq_len": seq_len,
            "split": split,
            "tokenizer_sha256": (index.get("tokenizer") or {}).get("sha256"),
            "template_sha256": (index.get("template") or {}).get("sha256"),
        },
        separators=(",", ":"),
    )
    cols = schema(boundaries=boundaries)
    with _atomic_mindrecord(output) as tmp:
        writer = FileWriter(file_name=str(tmp), shard_num=1, overwrite=True)
        writer.add_schema(cols, desc)
        batch: list[dict[str, np.ndarray]] = []
        for i in range(len(reader)):
            batch.append(
                convert_row(
                    reader[i], layout=layout, pad_token_id=pad_token_id, boundaries=boundaries
                )
            )
            if len(batch) == _BATCH:
                writer.write_raw_data(batch)
                batch = []
        if batch:
            writer.write_raw_data(batch)
        writer.commit()
    return MindRecordReport(
        output=str(output),
        rows=len(reader),
        row_len=seq_len + 1 if layout == "legacy" else seq_len,
        columns=list(cols),
        layout=layout,
    )
