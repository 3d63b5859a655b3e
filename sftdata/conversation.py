"""The canonical conversation record (``schemas/conversation.v1.json``) and its in-memory model.

Every source adapter produces :class:`Conversation` objects; every later stage (validate,
render, pack, export) consumes them. ``source`` always points back at the raw record so any
later error can name the file and line/row it came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdata.errors import ConversionError

SCHEMA_VERSION = 1
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record came from: a file plus a 1-based line, or a sheet and 1-based row."""

    file: str
    line: int | None = None
    row: int | None = None
    sheet: str | None = None

    def __str__(self) -> str:
        if self.sheet is not None:
            return f"{self.file}:{self.sheet}:row {self.row}"
        if self.row is not None:
            return f"{self.file}:row {self.row}"
        if self.line is not None:
            return f"{self.file}:{self.line}"
        return self.file

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file}
        if self.line is not None:
            d["line"] = self.line
        if self.sheet is not None:
            d["sheet"] = self.sheet
        if self.row is not None:
            d["row"] = self.row
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Source:
        return cls(
            file=str(d.get("file", "")), line=d.get("line"), row=d.get("row"), sheet=d.get("sheet")
        )


@dataclass(frozen=True, slots=True)
class Message:
    """One turn. ``train=None`` means the default: trained iff the role is ``assistant``."""

    role: str
    content: str
    train: bool | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @property
    def trained(self) -> bool:
        """Whether this message's tokens are trained under the default policy / its own flag."""
        return self.role == "assistant" if self.train is None else self.train

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.train is not None:
            d["train"] = self.train
        if self.tool_calls is not None:
            d["tool_calls"] = self.tool_calls
        return d


@dataclass(slots=True)
class Conversation:
    """A canonical record: an id, ordered messages, optional tool schemas, and its source."""

    id: str
    messages: list[Message]
    source: Source
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "id": self.id,
            "messages": [m.to_dict() for m in self.messages],
        }
        if self.tools is not None:
            d["tools"] = self.tools
        d["source"] = self.source.to_dict()
        return d

    def to_json(self) -> str:
        """One JSON line (no trailing newline), UTF-8 text kept as is."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    def content_key(self) -> str:
        """A key equal for records with the same messages and tools (for ``--dedup``)."""
        return json.dumps(
            [[m.to_dict() for m in self.messages], self.tools], ensure_ascii=False, sort_keys=True
        )

    @classmethod
    def from_dict(
        cls, d: Any, *, where: str, fallback_source: Source | None = None
    ) -> Conversation:
        """Build from a parsed canonical JSON object, raising ConversionError naming ``where``.

        Only type checks needed to build the object happen here; ``sftdata.validate`` reports
        every schema and structural problem of a file at once.
        """
        if not isinstance(d, dict):
            raise ConversionError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConversionError(
                f"{where}: schema_version {version!r} is not supported (this is version {SCHEMA_VERSION})"
            )
        rid = d.get("id")
        if not isinstance(rid, str) or not rid:
            raise ConversionError(f"{where}: 'id' must be a non-empty string")
        raw_messages = d.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise ConversionError(f"{where}: 'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw_messages):
            if not isinstance(m, dict):
                raise ConversionError(f"{where}: messages[{i}] must be an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ConversionError(f"{where}: messages[{i}].role {role!r} is not one of {ROLES}")
            if not isinstance(content, str):
                raise ConversionError(f"{where}: messages[{i}].content must be a string")
            train = m.get("train")
            if train is not None and not isinstance(train, bool):
                raise ConversionError(f"{where}: messages[{i}].train must be true or false")
            tool_calls = m.get("tool_calls")
            if tool_calls is not None and not isinstance(tool_calls, list):
                raise ConversionError(f"{where}: messages[{i}].tool_calls must be a list")
            messages.append(Message(role=role, content=content, train=train, tool_calls=tool_calls))
        tools = d.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ConversionError(f"{where}: 'tools' must be a list")
        src = d.get("source")
        source = (
            Source.from_dict(src)
            if isinstance(src, dict)
            else (fallback_source or Source(file=where))
        )
        return cls(id=rid, messages=messages, source=source, tools=tools)


def parse_jsonl_line(line: str, *, path: str, lineno: int) -> Conversation:
    """One canonical JSONL line as a Conversation (its source defaults to ``path:lineno``).

    Raises:
        ConversionError: naming ``path:lineno`` for invalid JSON or a bad record.
    """
    where = f"{path}:{lineno}"
    if lineno == 1:  # a BOM (Windows editors) is skipped, as validate skips it
        line = line.lstrip("\ufeff")
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    return Conversation.from_dict(d, where=where, fallback_source=Source(file=path, line=lineno))


def read_jsonl_numbered(path: str | Path) -> Iterator[tuple[int, Conversation]]:
    """Stream ``(line number, conversation)`` pairs of a canonical JSONL file, skipping blanks.

    Raises:
        ConversionError: naming ``path:line`` for unreadable files, invalid JSON or bad records.
    """
    path = Path(path)
    try:
        # Binary, decoded per line: a text-mode reader decodes 8 KiB ahead, so its
        # UnicodeDecodeError cannot tell which line holds the bad byte.
        f = path.open("rb")
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConversionError(f"{path}: is a folder, expected a .jsonl file") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConversionError(f"{path}:{lineno}: not valid UTF-8 text") from None
            if line.strip():
                yield lineno, parse_jsonl_line(line, path=str(path), lineno=lineno)


def read_jsonl(path: str | Path) -> Iterator[Conversation]:
    """Stream canonical conversations from a JSONL file, one line at a time.

    Raises:
        ConversionError: naming ``path:line`` for unreadable files, invalid JSON or bad records.
    """
    for _, conv in read_jsonl_numbered(path):
        yield conv
