"""LLaMA-Factory v1 JSON lines: ``{"messages": [{"role", "content": [{"type", "value"}],
"loss_weight"}]}``.

Text parts are joined; a ``tool_call`` part holds the JSON call ``{"name", "arguments"}``.
``loss_weight`` becomes the message's ``train`` flag (trained iff the weight is > 0); a flag equal
to the role's default is left out so records read the same as from any other format.
"""

from __future__ import annotations

from typing import Any

from sftdata.conversation import ROLES, Conversation, Message, Source
from sftdata.errors import RecordError
from sftdata.jsonfile import json_problem, loads_strict
from sftdata.sources.base import parse_tools, require_object, tool_call, type_name


def matches(record: dict[str, Any]) -> str | None:
    """Why ``record`` looks like LLaMA-Factory v1, or None."""
    msgs = record.get("messages")
    if not isinstance(msgs, list):
        return None
    for m in msgs:
        if isinstance(m, dict) and (
            isinstance(m.get("content"), list)
            and any(isinstance(p, dict) and "value" in p for p in m["content"])
        ):
            return 'first record has "messages" whose "content" is a list of {type, value} parts'
        if isinstance(m, dict) and "loss_weight" in m:
            return 'first record has "messages" with "loss_weight"'
    return None


def _parts(parts: Any, here: str) -> tuple[str, list[dict[str, Any]] | None]:
    if isinstance(parts, str):
        return parts, None
    if not isinstance(parts, list):
        raise RecordError(
            f"{here}: 'content' must be a list of {{type, value}} parts, got {type_name(parts)}",
            reason="wrong type",
        )
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        where = f"{here}: content[{j}]"
        if not isinstance(part, dict):
            raise RecordError(
                f"{where} must be an object, got {type_name(part)}", reason="wrong type"
            )
        kind, value = part.get("type"), part.get("value")
        if kind not in ("text", "tool_call"):
            raise RecordError(
                f"{where}: part of type {kind!r} is not supported (text and tool_call only)",
                reason="unsupported content",
            )
        if not isinstance(value, str):
            raise RecordError(
                f"{where}: 'value' must be a string, got {type_name(value)}", reason="wrong type"
            )
        if kind == "text":
            texts.append(value)
        else:
            try:
                calls.append(tool_call(loads_strict(value), where))
            except ValueError as e:
                raise RecordError(
                    f"{where}: tool_call value is not valid JSON ({json_problem(e)})",
                    reason="bad tool call",
                ) from None
    return "".join(texts), calls or None


def convert(value: Any, *, where: str, source: Source, rid: str) -> list[Conversation]:
    """One conversation from a raw v1 record."""
    record = require_object(value, where)
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(
            f"{where}: 'messages' must be a non-empty list, got {type_name(msgs)}",
            reason="missing field" if msgs is None else "wrong type",
        )
    messages: list[Message] = []
    for i, msg in enumerate(msgs):
        here = f"{where}: messages[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(
                f"{here} must be an object, got {type_name(msg)}", reason="wrong type"
            )
        role = msg.get("role")
        if role not in ROLES:
            raise RecordError(
                f"{here}: unknown role {role!r} (known: {', '.join(ROLES)})", reason="unknown role"
            )
        if "content" not in msg:
            raise RecordError(f"{here}: message has no 'content'", reason="missing field")
        content, calls = _parts(msg["content"], here)
        train = None
        if "loss_weight" in msg:
            weight = msg["loss_weight"]
            if not isinstance(weight, (int, float)) or isinstance(weight, bool):
                raise RecordError(
                    f"{here}: 'loss_weight' must be a number, got {type_name(weight)}",
                    reason="wrong type",
                )
            trained = weight > 0
            train = None if trained == (role == "assistant") else trained
        messages.append(Message(role, content, train=train, tool_calls=calls))
    tools = parse_tools(record.get("tools"), where)
    return [Conversation(id=rid, messages=messages, source=source, tools=tools)]
