"""Check canonical JSONL files: JSON Schema plus the structural rules a chat template relies on.

Every problem is reported (not just the first) as ``file:line: what is wrong``; a line that is
not JSON is reported and validation goes on with the next line. The same structural rules run in
``convert``, so what ``convert`` writes always validates clean.

Rules beyond the schema: a known ``schema_version``; an optional system turn only first; the
first other turn is the user's; an assistant turn follows a user or tool turn; a tool turn
follows an assistant turn with ``tool_calls`` or another tool turn; a user turn follows the
system prompt or an assistant turn; the record does not end on an unanswered user or tool turn;
at least one trained assistant turn; no empty content (an assistant turn may be empty only when
it calls tools); ids unique within the file. With a tokenizer (``--tokenizer``), no text of a
record holds one of its control tokens (C8: ``pack`` refuses such a record by default).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdata.conversation import READ_VERSIONS, ROLES, Source
from sftdata.jsonfile import invalid_json, load_schema, loads_strict


@dataclass(frozen=True)
class Problem:
    """One problem: ``line`` is 1-based (0 for the file as a whole); ``source`` the raw record."""

    file: str
    line: int
    message: str
    source: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        tail = f" (from {self.source})" if self.source else ""
        return f"{where}: {self.message}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "message": self.message,
            "source": self.source,
        }


@dataclass
class ValidationReport:
    """The outcome for one file: records read and every problem found."""

    file: str
    records: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "records": self.records,
            "ok": self.ok,
            "problems": [p.to_dict() for p in self.problems],
        }


def _validator(version: int):
    return load_schema(f"conversation.v{version}")


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


_RECORD_KEYS = frozenset({"schema_version", "id", "messages", "tools", "source"})
_MESSAGE_KEYS = {
    1: frozenset({"role", "content", "train", "tool_calls"}),
    2: frozenset({"role", "content", "train", "tool_calls", "reasoning", "tool_call_id", "name"}),
}
_CALL_KEYS = frozenset({"id", "type", "function"})
_SOURCE_KEYS = frozenset({"file", "line", "row", "sheet"})
_ROLES = frozenset(ROLES)


def _positive_int(v: Any) -> bool:
    return type(v) is int and v >= 1


def _fast_valid(record: dict[str, Any]) -> bool:
    """True only for records the schema accepts (checked by a test against jsonschema).

    jsonschema alone dominated ``validate`` on large files (profiled); anything this check does
    not pass goes to jsonschema for the messages, so the verdict is always jsonschema's.
    """
    if not _RECORD_KEYS.issuperset(record) or type(record.get("schema_version")) is not int:
        return False
    rid, msgs = record.get("id"), record.get("messages")
    version = record["schema_version"]
    if version not in _MESSAGE_KEYS or not isinstance(rid, str) or not rid:
        return False
    if not isinstance(msgs, list) or not msgs:
        return False
    keys = _MESSAGE_KEYS[version]
    for m in msgs:
        if not isinstance(m, dict) or not keys.issuperset(m):
            return False
        if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            return False
        if "train" in m and not isinstance(m["train"], bool):
            return False
        if version >= 2 and not all(
            isinstance(m[k], str) for k in ("reasoning", "tool_call_id", "name") if k in m
        ):
            return False
        calls = m.get("tool_calls", [])
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            return False
        if version >= 2 and not all(_canonical_call(c) for c in calls):
            return False
    tools = record.get("tools", [])
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return False
    if "source" in record:
        src = record["source"]
        if not isinstance(src, dict) or not _SOURCE_KEYS.issuperset(src):
            return False
        if not isinstance(src.get("file"), str):
            return False
        if "line" in src and not _positive_int(src["line"]):
            return False
        if "row" in src and not _positive_int(src["row"]):
            return False
        if "sheet" in src and not isinstance(src["sheet"], str):
            return False
    return True


def _canonical_call(c: dict[str, Any]) -> bool:
    fn = c.get("function")
    return (
        _CALL_KEYS.issuperset(c)
        and c.get("type") == "function"
        and isinstance(c.get("id", ""), str)
        and isinstance(fn, dict)
        and set(fn) == {"name", "arguments"}
        and isinstance(fn["name"], str)
        and bool(fn["name"])
        and isinstance(fn["arguments"], dict)
    )


def schema_problems(record: Any) -> list[str]:
    """Messages for every JSON Schema violation of one parsed record."""
    if isinstance(record, dict) and _fast_valid(record):
        return []
    version = record.get("schema_version") if isinstance(record, dict) else None
    out = []
    for err in sorted(
        _validator(version if version in READ_VERSIONS else READ_VERSIONS[-1]).iter_errors(record),
        key=lambda e: list(map(str, e.absolute_path)),
    ):
        where = _path(err.absolute_path)
        out.append(f"{where}: {err.message}" if where else err.message)
    return out


def _is_trained(m: dict[str, Any]) -> bool:
    train = m.get("train")
    return m.get("role") == "assistant" if not isinstance(train, bool) else train


def structure_problems(messages: Any, version: int = READ_VERSIONS[-1]) -> list[str]:
    """Messages for every structural rule a list of message dicts breaks (see module doc)."""
    if not isinstance(messages, list):
        return []
    msgs = [m if isinstance(m, dict) else {} for m in messages]
    out: list[str] = []
    prev: dict[str, Any] | None = None
    for i, m in enumerate(msgs):
        role, content = m.get("role"), m.get("content")
        calls = m.get("tool_calls")
        here = f"messages[{i}] ({role})"
        if isinstance(content, str) and not content.strip():
            if role != "assistant":
                out.append(f"{here}: content is empty")
            elif not calls:
                out.append(
                    f"{here}: empty answer (an assistant turn may be empty only with tool_calls)"
                )
        if calls and role != "assistant":
            out.append(f"{here}: only assistant turns may have tool_calls")
        if isinstance(calls, list):
            for k, c in enumerate(calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if (
                    not isinstance(fn, dict)
                    or not isinstance(fn.get("name"), str)
                    or not fn["name"]
                ):
                    out.append(f"{here}: tool_calls[{k}] needs function.name")
                elif version == 1 and not isinstance(fn.get("arguments", ""), str):
                    out.append(f"{here}: tool_calls[{k}].function.arguments must be a JSON string")
                elif version == 1:
                    try:
                        parsed = loads_strict(fn.get("arguments") or "{}")
                    except ValueError as e:
                        parsed = e
                    if not isinstance(parsed, dict):
                        out.append(
                            f"{here}: tool_calls[{k}].function.arguments is not a JSON object"
                        )
        if m.get("reasoning") is not None and role != "assistant":
            out.append(f"{here}: only assistant turns may have reasoning")
        prev_role = prev.get("role") if prev else None
        if role == "system":
            if i:
                out.append(f"{here}: a system turn may only come first")
        elif role == "user":
            if prev_role == "user":
                out.append(f"{here}: two user turns in a row")
            elif prev_role == "tool":
                out.append(
                    f"{here}: a user turn after a tool result; the assistant must answer it first"
                )
        elif role == "assistant":
            if prev_role in (None, "system"):
                out.append(f"{here}: the conversation must start with a user turn")
            elif prev_role == "assistant":
                out.append(f"{here}: two assistant turns in a row")
        elif role == "tool":
            if prev_role in (None, "system"):
                out.append(f"{here}: the conversation must start with a user turn")
            elif not (prev_role == "tool" or (prev_role == "assistant" and prev.get("tool_calls"))):
                out.append(f"{here}: a tool result must follow an assistant turn with tool_calls")
        prev = m
    if msgs and msgs[-1].get("role") in ("user", "tool"):
        what = "a user turn" if msgs[-1].get("role") == "user" else "a tool result"
        out.append(f"messages[{len(msgs) - 1}]: ends with {what} that has no answer")
    if not any(m.get("role") == "assistant" and _is_trained(m) for m in msgs):
        out.append("no trained assistant turn (nothing to learn from this record)")
    return out


def record_problems(record: Any) -> list[str]:
    """Every schema and structural problem of one parsed canonical record."""
    if not isinstance(record, dict):
        return [f"expected a JSON object, got {type(record).__name__}"]
    version = record.get("schema_version")
    if version not in READ_VERSIONS or isinstance(version, bool):
        known = ", ".join(map(str, READ_VERSIONS))
        return [f"schema_version {version!r} is not supported (this reads versions {known})"]
    return schema_problems(record) + structure_problems(record.get("messages"), version)


def _source_text(record: Any) -> str | None:
    src = record.get("source") if isinstance(record, dict) else None
    if not isinstance(src, dict) or not isinstance(src.get("file"), str):
        return None
    # Worded by Source itself so validate names a raw record exactly as every later stage does.
    return str(
        Source(src["file"], line=src.get("line"), row=src.get("row"), sheet=src.get("sheet"))
    )


def validate_file(
    path: str | Path, *, control: Any = None, tokenizer: str = ""
) -> ValidationReport:
    """Validate one canonical JSONL file, streaming it line by line.

    ``control`` (a ``sftdata.render.ControlTokens`` of the tokenizer named ``tokenizer``) adds
    the control-token check to every structurally valid record.

    Memory stays flat in file size except for one 8-byte hash per record (duplicate ids) and
    the problems found.
    """
    path = Path(path)
    report = ValidationReport(file=str(path))

    def problem(line: int, message: str, source: str | None = None) -> None:
        report.problems.append(Problem(str(path), line, message, source))

    if not path.exists():
        problem(0, "no such file")
        return report
    if path.is_dir():
        problem(0, "is a folder, expected a .jsonl file")
        return report
    seen: dict[bytes, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem(
                    lineno,
                    f"not valid UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1})",
                )
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            report.records += 1
            try:
                record = loads_strict(text)
            except ValueError as e:
                problem(lineno, invalid_json(e))
                continue
            source = _source_text(record)
            found = record_problems(record)
            for msg in found:
                problem(lineno, msg, source)
            if control is not None and not found:
                bad = _control_problem(text, str(path), lineno, control, tokenizer)
                if bad:
                    problem(lineno, bad, source)
            rid = record.get("id") if isinstance(record, dict) else None
            if isinstance(rid, str):
                key = hashlib.blake2b(rid.encode(), digest_size=8).digest()
                if key in seen:
                    problem(lineno, f"duplicate id {rid!r} (first on line {seen[key]})", source)
                else:
                    seen[key] = lineno
    if report.records == 0 and not report.problems:
        problem(0, "is empty (no records)")
    return report


def _control_problem(text: str, path: str, lineno: int, control: Any, tokenizer: str) -> str | None:
    from sftdata.conversation import parse_jsonl_line
    from sftdata.render import find_control

    found = find_control(parse_jsonl_line(text, path=path, lineno=lineno), control)
    if found is None:
        return None
    where, token = found
    return (
        f"{where} holds {token!r}, a special token of {tokenizer} (sftdata pack refuses it; "
        "--special-text split encodes it as plain text)"
    )


def github_annotation(p: Problem) -> str:
    """A GitHub Actions ``::error`` workflow command for one problem (escaped per the spec)."""

    def prop(s: str) -> str:
        return (
            s.replace("%", "%25")
            .replace("\r", "%0D")
            .replace("\n", "%0A")
            .replace(":", "%3A")
            .replace(",", "%2C")
        )

    def data(s: str) -> str:
        return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    msg = p.message + (f" (from {p.source})" if p.source else "")
    loc = f"file={prop(p.file)}" + (f",line={p.line}" if p.line else "")
    return f"::error {loc}::{data(msg)}"
