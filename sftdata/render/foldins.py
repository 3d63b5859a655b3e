"""What a template cannot render natively is folded in, in documented ways, and counted
(``FOLD_INS``): a system message merged into the first user turn, tool results as a marked user
turn, tool calls as JSON lines in the reply, tool schemas after "Available tools:" in the system
message, reasoning as ``<think>…</think>`` before the reply."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sftdata.conversation import Conversation

TOOL_RESULT_HEADER = "Tool result"
"""Start of the user turn a tool result becomes for a template without a tool role."""


FOLD_INS = (
    "system_into_user",
    "tool_results_as_user",
    "tool_calls_into_content",
    "tools_into_system",
    "reasoning_into_content",
)
"""Kinds of documented fold-in, as counted in the pack summary and ``index.json``."""


@dataclass(frozen=True)
class Caps:
    """What a template renders natively (probed once per template)."""

    system: bool
    tool_role: bool
    tool_calls: bool
    tools: bool
    reasoning: bool
    args_as_string: bool


def _plain_tool_call(call: dict[str, Any]) -> str:
    fn = call["function"]
    obj = {"name": fn["name"], "arguments": fn["arguments"]}
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def _call_id(rid: str, i: int, k: int) -> str:
    # Templates that need ids (Mistral's wants nine alphanumerics) get a deterministic one.
    return hashlib.blake2b(f"{rid}\0{i}\0{k}".encode(), digest_size=8).hexdigest()[:9]


def _paired_call(call_id: str | None, calls: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """The call a tool result answers: the one with its ``tool_call_id``, else the ``k``-th."""
    if call_id:
        return next((c for c in calls if c.get("id") == call_id), {})
    return calls[k] if k < len(calls) else {}


def message_text(m: dict[str, Any]) -> str:
    """A template message's text: its string content, or its parts' text (:func:`as_parts`)."""
    c = m.get("content")
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c if isinstance(c, str) else ""


def as_parts(m: dict[str, Any]) -> dict[str, Any]:
    """A message with its text content as one ``{"type": "text"}`` part."""
    c = m.get("content")
    return {**m, "content": [{"type": "text", "text": c}]} if isinstance(c, str) else m


def template_messages(
    conv: Conversation, caps: Caps, *, parts: bool
) -> tuple[list[dict[str, Any]], list[Any] | None, list[int | None], list[str]]:
    """The messages and tools passed to a template that renders ``caps`` natively, with
    fold-ins applied (``parts``: content as a list of text parts, for templates that want it).

    Returns:
        (messages, tools, index of each template message in ``conv.messages`` or None for
        one made by a fold-in, fold-in kinds applied).
    """
    folds: list[str] = []
    msgs: list[dict[str, Any]] = []
    origin: list[int | None] = []
    pending_calls: list[dict[str, Any]] = []
    results = 0  # tool results since the last assistant turn (pairs them with its calls)
    for i, m in enumerate(conv.messages):
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant":
            d, pending_calls = _assistant_message(m, i, conv.id, caps, folds)
            results = 0
        elif m.role == "tool":
            paired = _paired_call(m.tool_call_id, pending_calls, results)
            results += 1
            if m.tool_call_id or paired:
                d["tool_call_id"] = m.tool_call_id or paired.get("id")
            if m.name or paired:
                d["name"] = m.name or paired["function"]["name"]
            if not caps.tool_role:
                head = (
                    f"{TOOL_RESULT_HEADER} ({d['name']})" if d.get("name") else TOOL_RESULT_HEADER
                )
                body = f"{head}:\n{m.content}"
                folds.append("tool_results_as_user")
                if (
                    msgs
                    and msgs[-1]["role"] == "user"
                    and origin[-1] is not None
                    and (conv.messages[origin[-1]].role == "tool")
                ):
                    msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + "\n\n" + body}
                    continue  # merged: this message shares the user turn of the one before
                d = {"role": "user", "content": body}
        msgs.append(d)
        origin.append(i)
    tools = conv.tools or None
    if tools and not caps.tools:
        _tools_into_system(msgs, origin, tools)
        tools = None
        folds.append("tools_into_system")
    if msgs and msgs[0]["role"] == "system" and not caps.system:
        _system_into_user(msgs, origin)
        folds.append("system_into_user")
    if parts:
        msgs = [as_parts(m) for m in msgs]
    return msgs, tools, origin, list(dict.fromkeys(folds))


def _assistant_message(
    m: Any, i: int, conv_id: str, caps: Caps, folds: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Assistant message ``i`` as the template sees it (reasoning and tool calls native or folded
    in, calls given ids), and its calls with their ids (tool results pair with them)."""
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.reasoning:
        if caps.reasoning:
            d["reasoning_content"] = d["thinking"] = m.reasoning
        else:
            d["content"] = f"<think>\n{m.reasoning}\n</think>\n\n{m.content}"
            folds.append("reasoning_into_content")
    if not m.tool_calls:
        return d, []
    calls = [
        {**c, "id": c.get("id") or _call_id(conv_id, i, k)} for k, c in enumerate(m.tool_calls)
    ]
    if not caps.tool_calls:
        lines = [_plain_tool_call(c) for c in calls]
        d["content"] = "\n".join(([d["content"]] if d["content"] else []) + lines)
        folds.append("tool_calls_into_content")
    elif caps.args_as_string:
        d["tool_calls"] = [
            {
                **c,
                "function": {
                    "name": c["function"]["name"],
                    "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False),
                },
            }
            for c in calls
        ]
    else:
        d["tool_calls"] = calls
    return d, calls


def _tools_into_system(msgs: list[dict[str, Any]], origin: list[int | None], tools: Any) -> None:
    """Tool schemas after "Available tools:" in the system message (made when there is none)."""
    block = "Available tools:\n" + json.dumps(tools, ensure_ascii=False)
    if msgs and msgs[0]["role"] == "system":
        sep = "\n\n" if msgs[0]["content"] else ""
        msgs[0] = {**msgs[0], "content": msgs[0]["content"] + sep + block}
    else:
        msgs.insert(0, {"role": "system", "content": block})
        origin.insert(0, None)


def _system_into_user(msgs: list[dict[str, Any]], origin: list[int | None]) -> None:
    """The system message merged into the first user turn (or made the first user turn)."""
    system = msgs.pop(0)["content"]
    origin.pop(0)
    if msgs and msgs[0]["role"] == "user":
        msgs[0] = {**msgs[0], "content": f"{system}\n\n{msgs[0]['content']}"}
    else:
        msgs.insert(0, {"role": "user", "content": system})
        origin.insert(0, None)
