"""OpenAI chat records: ``{"messages": [{"role", "content", "tool_calls"?}], "tools"?}``.

``content`` may be a string, ``null`` (an assistant turn that only calls tools) or a list of
``{"type": "text", "text"}`` parts. The legacy ``function`` role is a ``tool`` turn and
``developer`` a ``system`` turn. A per-message ``train`` boolean or axolotl-style ``weight``
(0/1) sets the message's train flag. An assistant's ``reasoning_content`` (OpenAI-compatible
servers, Qwen, DeepSeek), ``reasoning`` or ``thinking`` (gpt-oss) becomes its ``reasoning``;
a tool result's ``tool_call_id`` and ``name`` are kept, so parallel results pair with their calls.
"""

from __future__ import annotations

from typing import Any

from sftdata.conversation import ROLES, Conversation, Message, Source
from sftdata.sources.base import (
    RecordError,
    parse_tools,
    require_object,
    tool_call,
    type_name,
)

ROLE_ALIASES = {"developer": "system", "function": "tool"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _optional_text(msg: dict[str, Any], keys: tuple[str, ...], here: str) -> str | None:
    for key in keys:
        v = msg.get(key)
        if v is None:
            continue
        if not isinstance(v, str):
            raise RecordError(
                f"{here}: {key!r} must be a string, got {type_name(v)}", reason="wrong type"
            )
        return v
    return None


def matches(record: dict[str, Any]) -> str | None:
    """Why ``record`` looks like OpenAI messages, or None."""
    msgs = record.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "role" in msgs[0]:
        return 'first record has "messages" with "role"/"content"'
    return None


def _content(value: Any, here: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type_name(part)
                raise RecordError(
                    f"{here}: content[{j}] of type {kind!r} is not supported (text only)",
                    reason="unsupported content",
                )
        return "".join(texts)
    raise RecordError(
        f"{here}: 'content' must be a string, got {type_name(value)}", reason="wrong type"
    )


def _train(msg: dict[str, Any], role: str, here: str) -> bool | None:
    flag = msg.get("train")
    if flag is None and "weight" in msg:
        weight = msg["weight"]
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise RecordError(f"{here}: 'weight' must be a number", reason="wrong type")
        flag = weight > 0
    if flag is None:
        return None
    if not isinstance(flag, bool):
        raise RecordError(f"{here}: 'train' must be true or false", reason="wrong type")
    return None if flag == (role == "assistant") else flag


def convert(value: Any, *, where: str, source: Source, rid: str) -> list[Conversation]:
    """One conversation from a raw OpenAI-messages record."""
    record = require_object(value, where)
    msgs = record.get("messages")
    if msgs is None:
        keys = ", ".join(map(str, record)) or "none"
        raise RecordError(
            f"{where}: record has no 'messages' (keys: {keys})", reason="missing field"
        )
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(
            f"{where}: 'messages' must be a non-empty list, got {type_name(msgs)}",
            reason="wrong type",
        )
    messages: list[Message] = []
    for i, msg in enumerate(msgs):
        here = f"{where}: messages[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(
                f"{here} must be an object, got {type_name(msg)}", reason="wrong type"
            )
        raw_role = msg.get("role")
        role = ROLE_ALIASES.get(raw_role, raw_role) if isinstance(raw_role, str) else None
        if role not in ROLES:
            raise RecordError(
                f"{here}: unknown role {raw_role!r} (known: {', '.join(ROLES)})",
                reason="unknown role",
            )
        if "content" not in msg and not msg.get("tool_calls"):
            raise RecordError(f"{here}: message has no 'content'", reason="missing field")
        content = _content(msg.get("content"), here)
        calls = msg.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise RecordError(
                    f"{here}: 'tool_calls' must be a list, got {type_name(calls)}",
                    reason="wrong type",
                )
            calls = [tool_call(c, f"{here}: tool_calls[{k}]") for k, c in enumerate(calls)] or None
        reasoning = _optional_text(msg, REASONING_KEYS, here) if role == "assistant" else None
        is_tool = role == "tool"
        messages.append(
            Message(
                role,
                content,
                train=_train(msg, role, here),
                tool_calls=calls,
                reasoning=reasoning or None,
                tool_call_id=_optional_text(msg, ("tool_call_id",), here) if is_tool else None,
                name=_optional_text(msg, ("name",), here) if is_tool else None,
            )
        )
    tools = parse_tools(record.get("tools"), where)
    return [Conversation(id=rid, messages=messages, source=source, tools=tools)]
