"""Header handling shared by the CSV/TSV and XLSX adapters: tables are Alpaca-like rows.

Common headers map themselves (``question``/``context``/``answer``, ``prompt``/``response``,
``问题``/``背景``/``回应`` ...); ``--map HEADER=FIELD`` maps anything else and wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sftdata.conversation import Conversation, Source
from sftdata.errors import ConversionError, RecordError
from sftdata.jsonfile import json_problem, loads_strict
from sftdata.sources import alpaca
from sftdata.sources.base import cell_text

TABLE_FIELDS = ("instruction", "input", "output", "system", "history", "id")

#: Headers (case-insensitive, trimmed) that need no --map.
AUTO_HEADERS = {
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "system": "system",
    "history": "history",
    "id": "id",
    "question": "instruction",
    "prompt": "instruction",
    "query": "instruction",
    "context": "input",
    "answer": "output",
    "response": "output",
    "问题": "instruction",
    "指令": "instruction",
    "背景": "input",
    "输入": "input",
    "上下文": "input",
    "回应": "output",
    "回答": "output",
    "答案": "output",
    "输出": "output",
}


def resolve_columns(
    headers: Sequence[str], mapping: dict[str, str] | None, *, where: str
) -> dict[str, int]:
    """Map canonical field → column index, or explain which column is missing.

    Raises:
        ConversionError: naming ``where`` (file, sheet, header row) and the headers found.
    """
    found = ", ".join(h for h in headers if h) or "none"
    columns: dict[str, int] = {}
    explicit = dict(mapping or {})
    for src, dst in explicit.items():
        if dst not in TABLE_FIELDS:
            raise ConversionError(
                f"--map {src}={dst}: a table column can only map to {', '.join(TABLE_FIELDS)}"
            )
        if src not in headers:
            raise ConversionError(
                f"{where}: --map names column {src!r}, but the headers are: {found}"
            )
        columns[dst] = headers.index(src)
    auto: dict[str, list[str]] = {}
    for i, h in enumerate(headers):
        field = AUTO_HEADERS.get(h.strip().lower())
        if field and field not in explicit.values() and h not in explicit:
            auto.setdefault(field, []).append(h)
            columns.setdefault(field, i)
    for field, names in auto.items():
        if len(names) > 1:
            raise ConversionError(
                f"{where}: columns {', '.join(map(repr, names))} could all be {field!r}; "
                f"choose one with --map {names[0]}={field}"
            )
    for field in ("instruction", "output"):
        if field not in columns:
            raise ConversionError(
                f"{where}: no column for {field!r} (headers found: {found}); "
                f"name one with --map HEADER={field}"
            )
    return columns


def is_blank(cells: Sequence[Any]) -> bool:
    """A row with no visible content (skipped, not counted)."""
    return all(cell_text(c).strip() == "" for c in cells)


def header_width(headers: Sequence[str]) -> int:
    """Columns the header names: up to its last non-empty cell."""
    return max((i + 1 for i, h in enumerate(headers) if h), default=0)


def row_conversation(
    cells: Sequence[Any],
    columns: dict[str, int],
    *,
    where: str,
    source: Source,
    rid: str,
    width: int,
) -> tuple[Conversation, bool]:
    """One conversation from a table row, and whether its id came from an ``id`` column.

    Raises:
        RecordError: the row has text in cells past the header's ``width`` (an unquoted
            delimiter or a shifted row: cutting it to fit would keep a wrong answer).
    """
    extra = [i for i in range(width, len(cells)) if cell_text(cells[i]).strip()]
    if extra:
        raise RecordError(
            f"{where}: the row has text in {len(extra)} cell(s) past the header's {width} "
            "columns (an unquoted delimiter or a shifted row?)",
            reason="extra cells",
        )
    record: dict[str, Any] = {}
    for field, i in columns.items():
        record[field] = cell_text(cells[i]) if i < len(cells) else ""
    own_id = record.pop("id", "").strip()
    history = record.pop("history", "")
    if history.strip():
        try:
            record["history"] = loads_strict(history)
        except ValueError as e:
            raise RecordError(
                f"{where}: the history cell is not JSON [[question, answer], ...] "
                f"({json_problem(e)})",
                reason="wrong type",
            ) from None
    return alpaca.build(record, where=where, source=source, rid=own_id or rid), bool(own_id)
