"""The canonical conversation record (``schemas/conversation.v2.json``) and its in-memory model.

Every source adapter produces :class:`Conversation` objects; every later stage (validate,
render, pack, export) consumes them. ``source`` always points back at the raw record so any
later error can name the file and line/row it came from.

Version 2 (written by ``convert``) keeps what chat templates need from tool-using and reasoning
data: tool-call ``arguments`` as JSON objects (templates apply ``tojson`` to them, so a string
would be rendered double-encoded), tool-call ``id``, ``tool_call_id``/``name`` on tool results,
and ``reasoning`` on assistant turns. Version 1 files are still read: their argument strings are
parsed and a leading ``<think>…</think>`` in an assistant reply becomes its ``reasoning``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sftdata.errors import ConversionError
from sftdata.jsonfile import invalid_json, loads_strict

SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)
"""Versions of the canonical record this code reads (it writes :data:`SCHEMA_VERSION`)."""
ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
    reasoning: str | None = None
    tool_call_id: str | None = None
    name: str | None = None

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
        if self.reasoning is not None:
            d["reasoning"] = self.reasoning
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
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
        """One JSON line (no trailing newline), UTF-8 text kept as is.

        Raises:
            ConversionError: naming the record's source where it holds NaN or Infinity (in tool
                schemas or call arguments), which JSON cannot carry.
        """
        try:
            return json.dumps(
                self.to_dict(), ensure_ascii=False, separators=(",", ":"), allow_nan=False
            )
        except ValueError:
            raise ConversionError(
                f"{self.source}: record {self.id!r} holds NaN or Infinity, which JSON cannot carry"
            ) from None

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
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise ConversionError(
                f"{where}: schema_version {version!r} is not supported (this reads versions "
                f"{', '.join(map(str, READ_VERSIONS))})"
            )
        rid = d.get("id")
        if not isinstance(rid, str) or not rid:
            raise ConversionError(f"{where}: 'id' must be a non-empty string")
        raw_messages = d.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise ConversionError(f"{where}: 'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw_messages):
            here = f"{where}: messages[{i}]"
            if not isinstance(m, dict):
                raise ConversionError(f"{here} must be an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ConversionError(f"{here}.role {role!r} is not one of {ROLES}")
            if not isinstance(content, str):
                raise ConversionError(f"{here}.content must be a string")
            train = m.get("train")
            if train is not None and not isinstance(train, bool):
                raise ConversionError(f"{here}.train must be true or false")
            tool_calls = m.get("tool_calls")
            if tool_calls is not None:
                tool_calls = normalize_tool_calls(tool_calls, f"{here}.tool_calls")
            extras: dict[str, str | None] = {}
            for key in ("reasoning", "tool_call_id", "name"):
                v = m.get(key) if version >= 2 else None
                if v is not None and not isinstance(v, str):
                    raise ConversionError(f"{here}.{key} must be a string")
                extras[key] = v
            msg = Message(role=role, content=content, train=train, tool_calls=tool_calls, **extras)
            messages.append(split_reasoning(msg) if version == 1 else msg)
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


def normalize_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls in the canonical shape ``{"id"?, "type": "function", "function": {"name",
    "arguments": {...}}}``; ``arguments`` given as a JSON string (OpenAI's wire format) is parsed.

    Raises:
        ConversionError: naming ``where`` and the call for a missing name or arguments that are
            not a JSON object (or a string holding one).
    """
    if not isinstance(calls, list):
        raise ConversionError(f"{where} must be a list")
    out = []
    for k, c in enumerate(calls):
        here = f"{where}[{k}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            raise ConversionError(f"{here} must be an object with a 'function' object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ConversionError(f"{here}.function.name must be a non-empty string")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = loads_strict(args) if args.strip() else {}
            except ValueError as e:
                raise ConversionError(
                    f"{here}.function.arguments is not valid JSON ({invalid_json(e)[14:-1]})"
                ) from None
        if not isinstance(args, dict):
            raise ConversionError(
                f"{here}.function.arguments must be a JSON object, got {type(args).__name__}"
            )
        call: dict[str, Any] = {}
        if c.get("id") is not None:
            if not isinstance(c["id"], str):
                raise ConversionError(f"{here}.id must be a string")
            call["id"] = c["id"]
        call["type"] = "function"
        call["function"] = {"name": name, "arguments": args}
        out.append(call)
    return out


def split_reasoning(m: Message) -> Message:
    """An assistant reply that opens with ``<think>…</think>`` (DeepSeek-R1, Qwen3 outputs) as
    ``reasoning`` plus the answer after it; any other message unchanged."""
    if m.role != "assistant" or m.reasoning is not None:
        return m
    text = m.content.lstrip()
    if not text.startswith(THINK_OPEN) or THINK_CLOSE not in text:
        return m
    inner, _, answer = text[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return replace(m, content=answer.lstrip("\n"), reasoning=inner.strip("\n"))


def parse_jsonl_line(line: str, *, path: str, lineno: int) -> Conversation:
    """One canonical JSONL line as a Conversation (its source defaults to ``path:lineno``).

    Raises:
        ConversionError: naming ``path:lineno`` for invalid JSON or a bad record.
    """
    where = f"{path}:{lineno}"
    if lineno == 1:  # a BOM (Windows editors) is skipped, as validate skips it
        line = line.lstrip("\ufeff")
    try:
        d = loads_strict(line)
    except ValueError as e:
        raise ConversionError(f"{where}: {invalid_json(e)}") from None
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
