"""ShareGPT / Vicuna records: ``conversations`` of ``{"from", "value"}`` turns.

Roles follow FastChat and LLaMA-Factory: ``human``/``user``, ``gpt``/``assistant``, ``system``,
``function_call`` (an assistant turn whose value is the JSON call ``{"name", "arguments"}`` or a
list of them: it becomes ``tool_calls`` with empty content) and ``observation`` (a ``tool``
turn). ``tools`` may be a JSON string (LLaMA-Factory's Glaive export). LLaMA-Factory's
``tags`` (``role_tag``, ``content_tag``, ``user_tag``, ...) rename the keys and role values.
"""

from __future__ import annotations

from typing import Any

from sftdata.conversation import Conversation, Message, Source
from sftdata.jsonfile import json_problem, loads_strict
from sftdata.sources.base import (
    RecordError,
    parse_tools,
    require_object,
    string_field,
    tool_call,
    type_name,
)

DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}

#: Role values understood without any tags (FastChat, LLaMA-Factory, OpenAI spellings).
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
}


def matches(record: dict[str, Any]) -> str | None:
    """Why ``record`` looks like ShareGPT, or None."""
    conv = record.get("conversations")
    if isinstance(conv, list):
        return 'first record has "conversations"'
    msgs = record.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "from" in msgs[0]:
        return 'first record has "messages" with "from"/"value" turns'
    return None


def _roles(tags: dict[str, str]) -> dict[str, str]:
    roles = dict(ROLE_ALIASES)
    for key, role in (
        ("user_tag", "user"),
        ("assistant_tag", "assistant"),
        ("observation_tag", "tool"),
        ("function_tag", "function_call"),
        ("system_tag", "system"),
    ):
        if key in tags:
            roles[tags[key]] = role
    return roles


def _calls(value: str, where: str) -> list[dict[str, Any]]:
    try:
        parsed = loads_strict(value)
    except ValueError as e:
        raise RecordError(
            f"{where}: function_call value is not valid JSON ({json_problem(e)})",
            reason="bad tool call",
        ) from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise RecordError(f"{where}: function_call value is an empty list", reason="bad tool call")
    return [tool_call(item, where) for item in items]


def convert(
    value: Any,
    *,
    where: str,
    source: Source,
    rid: str,
    role_tags: dict[str, str] | None = None,
) -> list[Conversation]:
    """One conversation from a raw ShareGPT record."""
    record = require_object(value, where)
    tags = {**DEFAULT_TAGS, **(role_tags or {})}
    key = "conversations" if "conversations" in record else "messages"
    turns = record.get(key)
    if turns is None:
        keys = ", ".join(map(str, record)) or "none"
        raise RecordError(
            f"{where}: record has no 'conversations' (keys: {keys})", reason="missing field"
        )
    if not isinstance(turns, list) or not turns:
        raise RecordError(
            f"{where}: {key!r} must be a non-empty list of turns, got {type_name(turns)}",
            reason="wrong type",
        )
    roles = _roles(tags)
    role_key, content_key = tags["role_tag"], tags["content_tag"]
    messages: list[Message] = []
    system = string_field(record, "system", where, required=False)
    if system and system.strip():
        messages.append(Message("system", system))
    for i, turn in enumerate(turns):
        here = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(
                f"{here} must be an object, got {type_name(turn)}", reason="wrong type"
            )
        raw_role = turn.get(role_key)
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            known = ", ".join(sorted(roles))
            raise RecordError(
                f"{here}: unknown role {role_key}={raw_role!r} (known: {known})",
                reason="unknown role",
            )
        if content_key not in turn:
            raise RecordError(f"{here}: turn has no {content_key!r}", reason="missing field")
        content = turn[content_key]
        if not isinstance(content, str):
            raise RecordError(
                f"{here}: {content_key!r} must be a string, got {type_name(content)}",
                reason="wrong type",
            )
        if role == "function_call":
            messages.append(Message("assistant", "", tool_calls=_calls(content, here)))
        else:
            messages.append(Message(role, content))
    tools = parse_tools(record.get("tools"), where)
    return [Conversation(id=rid, messages=messages, source=source, tools=tools)]
