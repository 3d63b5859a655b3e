"""Pieces every source adapter shares: record errors, file checks, text decoding, field mapping.

Adapters turn one raw record into canonical conversations and raise :class:`RecordError` for a
bad record (convert may skip and count it with ``--skip-invalid``); problems with the whole file
(missing, a folder, empty, binary, wrong encoding, broken JSON array, missing sheet or columns)
raise a plain :class:`~sftdata.errors.ConversionError`, which is never skipped.
"""

from __future__ import annotations

import codecs
import datetime as _dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftdata.conversation import (
    Conversation,
    Message,
    Source,
    normalize_tool_calls,
    split_reasoning,
)
from sftdata.errors import ConversionError, RecordError
from sftdata.jsonfile import json_problem, loads_strict

#: Canonical fields a ``--map SRC=DST`` may target.
MAP_TARGETS = (
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "conversations",
    "messages",
    "tools",
    "id",
)

#: How many bytes are sniffed at the start of a file (binary check, format detection).
SNIFF_BYTES = 8192

ENCODING_HINT = "pass --encoding (Chinese CSV/Excel exports are often GBK: try --encoding gb18030)"


def check_input_file(path: Path) -> bytes:
    """Refuse a missing path, a folder, an empty or binary file; return the first bytes.

    Raises:
        ConversionError: naming ``path`` and what is wrong.
    """
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if path.is_dir():
        raise ConversionError(f"{path}: is a folder, expected a data file")
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    if not head.strip():
        raise ConversionError(f"{path}: is empty (no records)")
    return head


def looks_binary(head: bytes) -> bool:
    """True for data no text encoding we read would produce (NUL bytes outside UTF-16/32)."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    return b"\x00" in head


def refuse_binary(path: Path, head: bytes, what: str) -> None:
    """Raise a clear error when a text format was asked of a binary file."""
    if looks_binary(head):
        kind = "a PNG image" if head.startswith(b"\x89PNG") else "a binary file"
        raise ConversionError(f"{path}:1: looks like {kind}, not {what} text")


def is_ascii_compatible(encoding: str) -> bool:
    """Whether ``\\n`` is the single byte 0x0A in ``encoding`` (so binary lines split correctly)."""
    try:
        encoded = "a\n".encode(encoding)
    except LookupError:
        raise ConversionError(f"--encoding {encoding!r}: unknown encoding") from None
    return encoded.removeprefix(codecs.BOM_UTF8) == b"a\n"


def decode_error(path: Path, line: int, err: UnicodeDecodeError, encoding: str) -> ConversionError:
    """A one-line error for text that is not in ``encoding``, with the fix."""
    bad = err.object[err.start : err.start + 1].hex()
    encoding = "utf-8" if encoding.lower().replace("_", "-") == "utf-8-sig" else encoding
    return ConversionError(
        f"{path}:{line}: not valid {encoding} text (byte 0x{bad}); {ENCODING_HINT}"
    )


def locate_decode_error(path: Path, encoding: str) -> ConversionError:
    """Find the first line of ``path`` that does not decode (second pass, only after a failure)."""
    if not is_ascii_compatible(encoding):  # pragma: no cover (UTF-16/32 data is never cut by lines)
        return ConversionError(f"{path}: not valid {encoding} text; {ENCODING_HINT}")
    decoder = codecs.getincrementaldecoder(encoding)()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as e:
                return decode_error(path, lineno, e, encoding)
    return ConversionError(f"{path}: not valid {encoding} text; {ENCODING_HINT}")


def iter_text_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, text)``; a decoding error names its exact line."""
    if is_ascii_compatible(encoding):
        decoder = codecs.getincrementaldecoder(encoding)()
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = decoder.decode(raw)
                except UnicodeDecodeError as e:
                    raise decode_error(path, lineno, e, encoding) from None
                if lineno == 1:
                    text = text.lstrip("\ufeff")
                yield lineno, text
    else:  # UTF-16/32: let Python split lines; the line of a decoding error is approximate.
        lineno = 0
        try:
            with path.open("r", encoding=encoding) as f:
                for lineno, text in enumerate(f, start=1):
                    yield lineno, text.lstrip("\ufeff") if lineno == 1 else text
        except UnicodeDecodeError:
            raise locate_decode_error(path, encoding) from None


def apply_mapping(record: dict[str, Any], mapping: dict[str, str] | None) -> dict[str, Any]:
    """Rename raw keys onto canonical fields (``{"问题": "instruction"}``); others are kept."""
    if not mapping:
        return record
    out = {k: v for k, v in record.items() if k not in mapping}
    for src, dst in mapping.items():
        if src in record:
            out[dst] = record[src]
    return out


def parse_mapping(text: str) -> dict[str, str]:
    """Parse ``SRC=DST,SRC=DST`` (the ``--map`` option) into a dict, checking every target.

    Raises:
        ConversionError: for a malformed pair or an unknown target field.
    """
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        src, sep, dst = part.partition("=")
        src, dst = src.strip(), dst.strip()
        if not sep or not src or not dst:
            raise ConversionError(f"--map {part!r}: expected SRC=DST, e.g. 问题=instruction")
        if dst not in MAP_TARGETS:
            raise ConversionError(
                f"--map {part!r}: unknown target {dst!r} (expected one of {', '.join(MAP_TARGETS)})"
            )
        mapping[src] = dst
    return mapping


def record_id(record: dict[str, Any]) -> str | None:
    """The record's own id (string or integer), or None."""
    rid = record.get("id")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int):
        return str(rid)
    if isinstance(rid, str) and rid.strip():
        return rid
    return None


def type_name(value: Any) -> str:
    """JSON's name for a Python value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def require_object(value: Any, where: str) -> dict[str, Any]:
    """The record itself must be a JSON object."""
    if not isinstance(value, dict):
        raise RecordError(
            f"{where}: expected a JSON object per record, got {type_name(value)}",
            reason="not an object",
        )
    return value


def string_field(
    record: dict[str, Any], key: str, where: str, *, required: bool, what: str | None = None
) -> str | None:
    """Get ``record[key]`` as a string; a missing required key or a non-string is a RecordError."""
    name = what or repr(key)
    if key not in record or record[key] is None:
        if required:
            keys = ", ".join(map(str, record)) or "none"
            raise RecordError(
                f"{where}: record has no {name} (keys: {keys}); map one with --map KEY={key}",
                reason="missing field",
            )
        return None
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(
            f"{where}: {name} must be a string, got {type_name(value)}", reason="wrong type"
        )
    return value


def parse_tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """Tools as a list of OpenAI-style ``{"type": "function", "function": {...}}`` objects.

    ShareGPT exports (LLaMA-Factory, Glaive) store ``tools`` as a JSON *string* of bare function
    schemas; those are parsed and wrapped. An empty value means no tools.
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = loads_strict(value)
        except ValueError as e:
            raise RecordError(
                f"{where}: 'tools' is a string but not valid JSON ({json_problem(e)})",
                reason="wrong type",
            ) from None
        if value in (None, [], {}):
            return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError(
            f"{where}: 'tools' must be a list of objects, got {type_name(value)}",
            reason="wrong type",
        )
    return [t if "type" in t else {"type": "function", "function": t} for t in value]


def tool_call(value: Any, where: str) -> dict[str, Any]:
    """One call ``{"name", "arguments"}`` or OpenAI's ``{"id"?, "function": {...}}`` → the
    canonical shape, ``arguments`` as a JSON object (a JSON string of one is parsed: templates
    apply ``tojson`` to it, so a string would be rendered double-encoded)."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        call = value
    elif isinstance(value, dict):
        call = {"type": "function", "function": value}
    else:
        raise RecordError(
            f"{where}: a tool call must be an object with 'name' and 'arguments', got {type_name(value)}",
            reason="wrong type",
        )
    name = call["function"].get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecordError(f"{where}: a tool call has no 'name'", reason="missing field")
    try:
        return normalize_tool_calls([call], "tool call")[0]
    except ConversionError as e:
        detail = str(e).split(".function.", 1)[-1]
        raise RecordError(f"{where}: {detail}", reason="bad tool call") from None


def cell_text(value: Any) -> str:
    """A spreadsheet/CSV cell as text: numbers as Excel shows them, dates ISO, empty → ""."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    return str(value)


def set_system(messages: list[Message], system: str) -> list[Message]:
    """Replace the leading system message's text, or insert one (``--system``)."""
    if messages and messages[0].role == "system":
        return [Message(role="system", content=system), *messages[1:]]
    return [Message(role="system", content=system), *messages]


def source_of(
    path: Path, *, line: int | None = None, sheet: str | None = None, row: int | None = None
) -> Source:
    """The ``source`` of a record: the path as the user gave it, plus line or sheet/row."""
    from sftdata.inputs import shown

    return Source(file=shown(path), line=line, row=row, sheet=sheet)


def run_adapter(
    adapter: Any, value: Any, *, own: str | None, **kwargs: Any
) -> list[tuple[Conversation, bool]] | RecordError:
    """``adapter.convert(value, **kwargs)`` as the item protocol of ``sftdata.sources``.

    Returns:
        The record's conversations, each flagged whether its id came from the data (``own``),
        or the record's RecordError (yielded, so ``--skip-invalid`` can count it).
    """
    try:
        convs = adapter.convert(value, **kwargs)
    except RecordError as e:
        return e
    for c in convs:
        c.messages = [split_reasoning(m) for m in c.messages]
    return [(c, own is not None) for c in convs]
