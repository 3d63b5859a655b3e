"""One adapter per raw input format, behind :func:`read_conversations`.

``detect_format`` guesses a file's format from its extension, then from the keys of its first
record, and says why; ``iter_records`` yields conversations and, for bad records, the
:class:`~sftdata.errors.RecordError` instead of raising it (so ``convert --skip-invalid``
can count them and go on).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftdata.conversation import Conversation
from sftdata.errors import ConversionError
from sftdata.sources import alpaca, hf, lf_v1, openai, sharegpt
from sftdata.sources.base import (
    RecordError,
    apply_mapping,
    check_input_file,
    looks_binary,
    parse_mapping,
    record_id,
    run_adapter,
    source_of,
    type_name,
)
from sftdata.sources.jsonstream import first_value, iter_json

FORMATS = ("alpaca", "sharegpt", "openai", "lf_v1", "csv", "tsv", "xlsx", "parquet", "hf")

_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".xlsx": "xlsx", ".xlsm": "xlsx"}
# Order matters: v1 and ShareGPT-with-"messages" are special cases of a "messages" record.
_MATCHERS = (
    ("lf_v1", lf_v1.matches),
    ("sharegpt", sharegpt.matches),
    ("openai", openai.matches),
    ("alpaca", alpaca.matches),
)

__all__ = [
    "FORMATS",
    "IdAllocator",
    "RecordError",
    "detect_format",
    "iter_records",
    "parse_mapping",
    "read_conversations",
]


def detect_format(
    path: str | Path, *, mapping: dict[str, str] | None = None, encoding: str | None = None
) -> tuple[str, str]:
    """Guess the format of ``path``: ``(format, reason)``, e.g. ``("csv", "extension .csv")``.

    Raises:
        ConversionError: when the file cannot be read or matches no known shape.
    """
    path = Path(path)
    ext = path.suffix.lower()
    # Hugging Face datasets (sftdata.sources.hf): rows then go through the adapters above.
    if path.is_dir() and hf.is_saved_dataset(path):
        return "hf", "a folder written by datasets save_to_disk"
    if ext == ".parquet":
        check_input_file(path)
        return "parquet", "extension .parquet"
    if ext == ".xls":
        raise ConversionError(
            f"{path}: old binary .xls workbooks are not supported; save it as .xlsx in Excel"
        )
    if ext in _EXTENSIONS:
        check_input_file(path)
        return _EXTENSIONS[ext], f"extension {ext}"
    head = check_input_file(path)
    if head.startswith(b"PK\x03\x04"):
        return "xlsx", "the file is a zip archive, as .xlsx workbooks are"
    if looks_binary(head):
        kind = "a PNG image" if head.startswith(b"\x89PNG") else "a binary file"
        raise ConversionError(f"{path}:1: looks like {kind}, not JSON, CSV or Excel data")
    line, value = first_value(path, encoding=encoding or "utf-8")
    if not isinstance(value, dict):
        raise RecordError(
            f"{path}:{line}: expected a JSON object per record, got {type_name(value)}",
            reason="not an object",
        )
    record = apply_mapping(value, mapping)
    if (
        mapping
        and {"instruction", "output"} & set(mapping.values())
        and "conversations" not in record
    ):
        return "alpaca", "--map names Alpaca fields"
    for fmt, matches in _MATCHERS:
        why = matches(record)
        if why:
            return fmt, why
    keys = ", ".join(map(repr, value)) or "none"
    raise ConversionError(
        f"{path}:{line}: cannot tell the format from the first record (keys: {keys}); "
        f"use --from {'|'.join(FORMATS)} and --map KEY=FIELD"
    )


def _h(text: str) -> int:
    # A stable 64-bit hash (Python's str hash changes per process).
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class IdAllocator:
    """Unique, deterministic ids across several inputs without remembering every id.

    Generated ids are ``<stem>-<index>`` with a stem unique per input, so they cannot collide
    with each other; only ids that come from the data are remembered (as 64-bit hashes), and an
    id taken twice gets ``.2``, ``.3``... appended. Memory grows only with records that carry
    their own ``id``.
    """

    def __init__(self) -> None:
        self._own: set[int] = set()
        self._stems: set[str] = set()

    def stem(self, path: Path) -> str:
        """A stem for ``path``'s generated ids, distinct from every earlier input's."""
        base = path.stem or "record"
        stem, n = base, 1
        while stem in self._stems:
            n += 1
            stem = f"{base}.{n}"
        self._stems.add(stem)
        return stem

    def _generated_shape(self, rid: str) -> bool:
        parts = rid.split("-")
        return any(
            len(parts) > k
            and all(p.isdigit() for p in parts[-k:])
            and "-".join(parts[:-k]) in self._stems
            for k in (1, 2)
        )

    def own(self, rid: str) -> str:
        """Reserve an id that came from the data (disambiguated if taken)."""
        candidate, n = rid, 1
        while _h(candidate) in self._own or self._generated_shape(candidate):
            n += 1
            candidate = f"{rid}.{n}"
        self._own.add(_h(candidate))
        return candidate

    def generated(self, rid: str) -> str:
        """Check a generated ``<stem>-<index>`` id against the data's own ids."""
        if not self._own:
            return rid
        candidate, n = rid, 1
        while _h(candidate) in self._own:
            n += 1
            candidate = f"{rid}.{n}"
        if n > 1:
            self._own.add(_h(candidate))
        return candidate


def iter_records(
    path: str | Path,
    *,
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    sheet: str | None = None,
    encoding: str | None = None,
    role_tags: dict[str, str] | None = None,
    ids: IdAllocator | None = None,
) -> Iterator[Conversation | RecordError]:
    """Stream conversations from one raw file; a bad record is yielded as its RecordError.

    Raises:
        ConversionError: for problems with the file as a whole (never skipped).
    """
    path = Path(path)
    if fmt == "auto":
        fmt, _ = detect_format(path, mapping=mapping, encoding=encoding)
    if fmt not in FORMATS:
        raise ConversionError(
            f"--from {fmt!r}: unknown format (expected auto or one of {', '.join(FORMATS)})"
        )
    if sheet is not None and fmt != "xlsx":
        raise ConversionError(f"{path}: --sheet only applies to .xlsx workbooks, this is {fmt}")
    ids = ids or IdAllocator()
    stem = ids.stem(path)
    for item in _raw_conversations(path, fmt, mapping, sheet, encoding or "utf-8", role_tags, stem):
        if isinstance(item, RecordError):
            yield item
            continue
        for conv, own in item:
            conv.id = ids.own(conv.id) if own else ids.generated(conv.id)
            yield conv


def _raw_conversations(
    path: Path,
    fmt: str,
    mapping: dict[str, str] | None,
    sheet: str | None,
    encoding: str,
    role_tags: dict[str, str] | None,
    stem: str,
) -> Iterator[list[tuple[Conversation, bool]] | RecordError]:
    """Per raw record: its conversations with "id came from the data" flags, or its error."""
    if fmt in hf.HF_FORMATS:
        yield from hf.iter_hf(path, mapping=mapping, role_tags=role_tags, stem=stem)
        return
    if fmt in ("csv", "tsv", "xlsx"):
        if fmt == "xlsx":
            from sftdata.sources.xlsx import iter_sheet

            rows = iter_sheet(path, sheet=sheet, mapping=mapping, stem=stem)
        else:
            from sftdata.sources.delimited import iter_table

            delimiter = "," if fmt == "csv" else "\t"
            rows = iter_table(
                path, delimiter=delimiter, encoding=encoding, mapping=mapping, stem=stem
            )
        yield from rows
        return
    adapter: Any = {"alpaca": alpaca, "sharegpt": sharegpt, "openai": openai, "lf_v1": lf_v1}[fmt]
    index = 0
    for item in iter_json(path, encoding=encoding):
        if isinstance(item, RecordError):
            index += 1
            yield item
            continue
        line, value = item
        where = f"{path}:{line}"
        own = record_id(value) if isinstance(value, dict) else None
        if isinstance(value, dict):
            value = apply_mapping(value, mapping)
        kwargs: dict[str, Any] = {"role_tags": role_tags} if fmt == "sharegpt" else {}
        yield run_adapter(
            adapter,
            value,
            own=own,
            where=where,
            source=source_of(path, line=line),
            rid=own or f"{stem}-{index}",
            **kwargs,
        )
        index += 1


def read_conversations(
    path: str | Path,
    *,
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    sheet: str | None = None,
    encoding: str | None = None,
    role_tags: dict[str, str] | None = None,
) -> Iterator[Conversation]:
    """Stream canonical conversations from a raw file of any supported format.

    Args:
        path: the raw file.
        fmt: ``"auto"`` or one of :data:`FORMATS`.
        mapping: raw field/column name → canonical field, e.g. ``{"问题": "instruction"}``.
        sheet: worksheet name for ``xlsx`` (default: the first sheet).
        encoding: text encoding of CSV/TSV/JSON files (default UTF-8).
        role_tags: LLaMA-Factory ``tags`` for ShareGPT (``role_tag``, ``user_tag``, ...).

    Raises:
        ConversionError: at the first bad record or file problem, naming file and line/row.
    """
    for item in iter_records(
        path, fmt=fmt, mapping=mapping, sheet=sheet, encoding=encoding, role_tags=role_tags
    ):
        if isinstance(item, RecordError):
            raise item
        yield item
