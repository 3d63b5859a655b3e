"""Hugging Face datasets as input: a folder written by ``Dataset.save_to_disk`` or a Parquet file.

Rows are read in Arrow record batches (memory stays flat: Parquet row groups are streamed, a
saved dataset is memory-mapped) and go through the Alpaca, ShareGPT or OpenAI adapter chosen
from the first row's columns (after ``--map``), exactly as JSON records would. A record's source
is ``file:row N`` (1-based row of the table).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftdata.conversation import Conversation
from sftdata.errors import ConversionError, RecordError
from sftdata.inputs import inside
from sftdata.sources import alpaca, openai, sharegpt
from sftdata.sources.base import apply_mapping, record_id, run_adapter, source_of

HF_FORMATS = ("parquet", "hf")
"""``parquet``: a ``.parquet`` file; ``hf``: a folder written by ``datasets`` ``save_to_disk``."""

_BATCH_ROWS = 1024
# ShareGPT before OpenAI: both have "messages", ShareGPT's turns carry "from".
_ADAPTERS = (("sharegpt", sharegpt), ("openai", openai), ("alpaca", alpaca))


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _drop_nulls(value: Any) -> Any:
    # Arrow gives every struct the union of all rows' fields, absent ones as None (e.g. a
    # "tool_calls": None on every plain message); JSON records simply lack those keys.
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def saved_files(path: Path, split: str | None) -> list[Path]:
    """The Arrow files of one split of a ``save_to_disk`` folder, each checked before anything
    opens it: the metadata naming it is ours to read (``dataset_dict.json``'s ``splits``, the
    split's ``state.json`` ``_data_files``), and every name must resolve to a regular file inside
    its folder, links included. Only these files are read afterwards (no other metadata of the
    folder, which ``datasets.load_from_disk`` would follow, is opened).

    A folder with ``dataset_dict.json`` is a DatasetDict (``split``, else ``train``, else its
    only split); otherwise it is one Dataset (its ``state.json``).

    Raises:
        ConversionError: naming the metadata file, the key and the path.
    """
    from sftdata.jsonfile import read_json

    folder = path
    meta = path / "dataset_dict.json"
    if meta.is_file():
        info = read_json(meta, error=ConversionError)
        names = info.get("splits") if isinstance(info, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConversionError(f"{meta}: 'splits' must be a list of split names")
        for k, name in enumerate(names):
            if not inside(path, name) or "/" in name or "\\" in name or not (path / name).is_dir():
                raise ConversionError(f"{meta}: splits[{k}] {name!r} is not a folder inside {path}")
        pick = split or ("train" if "train" in names else (names[0] if len(names) == 1 else None))
        if pick not in names:
            raise ConversionError(
                f"{path}: saved DatasetDict has splits {', '.join(map(repr, names))}; "
                f"{'split ' + repr(split) + ' is not one of them' if split else 'it has no train split'}"
            )
        folder = path / pick
    meta = folder / "state.json"
    state = read_json(meta, error=ConversionError)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConversionError(f"{meta}: '_data_files' must be a non-empty list of files")
    files = []
    for k, entry in enumerate(entries):
        name = entry.get("filename") if isinstance(entry, dict) else None
        where = f"{meta}: _data_files[{k}].filename {name!r}"
        if not inside(folder, name):
            raise ConversionError(f"{where} is not a file inside {folder}")
        if not (folder / name).is_file():  # a FIFO or a device would block or never end
            raise ConversionError(f"{where} is not a regular file")
        files.append(folder / name)
    return files


def _saved_batches(path: Path, split: str | None) -> Iterator[list[dict[str, Any]]]:
    """Rows of a ``save_to_disk`` folder, read from its checked Arrow files (``datasets``
    writes them as Arrow IPC streams; memory-mapped, a batch at a time)."""
    import pyarrow as pa

    for file in saved_files(path, split):
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(file)))
            for batch in reader:
                for start in range(0, batch.num_rows, _BATCH_ROWS):
                    yield batch.slice(start, _BATCH_ROWS).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ConversionError(f"{file}: not a readable Arrow file ({e})") from None


def _parquet_batches(path: Path) -> Iterator[list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConversionError(f"{path}: not a readable Parquet file ({e})") from None
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS):
        yield batch.to_pylist()


def _batches(path: Path, split: str | None) -> Iterator[list[dict[str, Any]]]:
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    if path.is_dir():
        if not is_saved_dataset(path):
            raise ConversionError(
                f"{path}: is a folder but not one written by datasets save_to_disk "
                "(no state.json or dataset_dict.json)"
            )
        return _saved_batches(path, split)
    return _parquet_batches(path)


def _pick_adapter(path: Path, row: dict[str, Any]) -> Any:
    for _, adapter in _ADAPTERS:
        if adapter.matches(row):
            return adapter
    cols = ", ".join(map(repr, row)) or "none"
    raise ConversionError(
        f"{path}:row 1: cannot tell the record shape from the columns ({cols}); "
        "map them with --map COLUMN=instruction,COLUMN=output (or conversations/messages)"
    )


def iter_hf(
    path: str | Path,
    *,
    mapping: dict[str, str] | None = None,
    role_tags: dict[str, str] | None = None,
    stem: str,
    split: str | None = None,
) -> Iterator[list[tuple[Conversation, bool]] | RecordError]:
    """Per row: its conversations with "id came from the data" flags, or its RecordError.

    The protocol of ``sftdata.sources`` adapters (see ``_raw_conversations``). Generated ids are
    ``<stem>-<row index>``.

    Raises:
        ConversionError: for the table as a whole (unreadable, unknown shape).
    """
    path = Path(path)
    adapter = None
    index = 0
    for rows in _batches(path, split):
        for raw in rows:
            row = apply_mapping(_drop_nulls(raw), mapping)
            if adapter is None:
                adapter = _pick_adapter(path, row)
            own = record_id(row)
            kwargs: dict[str, Any] = {"role_tags": role_tags} if adapter is sharegpt else {}
            yield run_adapter(
                adapter,
                row,
                own=own,
                where=f"{path}:row {index + 1}",
                source=source_of(path, row=index + 1),
                rid=own or f"{stem}-{index}",
                **kwargs,
            )
            index += 1
    if index == 0:
        raise ConversionError(f"{path}: has no rows")


def read_hf(
    path: str | Path,
    *,
    mapping: dict[str, str] | None = None,
    role_tags: dict[str, str] | None = None,
    split: str | None = None,
) -> Iterator[Conversation]:
    """Stream canonical conversations from a Parquet file or a ``save_to_disk`` folder.

    Raises:
        ConversionError: at the first bad row, naming ``file:row N``.
    """
    path = Path(path)
    for item in iter_hf(path, mapping=mapping, role_tags=role_tags, stem=path.stem, split=split):
        if isinstance(item, RecordError):
            raise item
        for conv, _ in item:
            yield conv
