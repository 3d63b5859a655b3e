"""Nothing dropped silently: after rendering (and folding in), everything the record holds must
be in the text the model trains on, or the record is refused with what is missing.

A text counts as rendered in any form a template writes it in: as it is, trimmed, or
JSON-escaped (Llama 3.1-4 write a tool result with ``| tojson``, so ``{"a": 1}`` appears as
``"{\"a\": 1}"``, exactly as the model sees it at inference)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from sftdata.conversation import Conversation


def forms(text: str) -> Iterator[str]:
    """The forms of ``text`` a template may write: as it is, trimmed, JSON-escaped (without
    and with ``ensure_ascii``)."""
    yield text
    trimmed = text.strip()
    if trimmed != text:
        yield trimmed
    escaped = json.dumps(trimmed, ensure_ascii=False)[1:-1]
    if escaped != trimmed:
        yield escaped
    ascii_ = json.dumps(trimmed)[1:-1]
    if ascii_ != escaped:
        yield ascii_


def find_text(text: str, needle: str, start: int = 0) -> tuple[int, int]:
    """(start, end) of the first form of ``needle`` found in ``text`` at/after ``start``, or
    (-1, -1); an empty needle is never found."""
    if not needle:
        return -1, -1
    for form in forms(needle):
        p = text.find(form, start) if form else -1
        if p >= 0:
            return p, p + len(form)
    return -1, -1


def not_rendered(conv: Conversation, texts: list[str]) -> str | None:
    """What of the record none of its samples' ``texts`` holds ("the content of message 3
    (tool)", ...), or None: every message's content and reasoning, every tool call's name and
    argument keys, every tool schema's name must be rendered somewhere."""
    only = texts[0] if len(texts) == 1 else None  # the usual case: one sample

    def found(needle: str) -> bool:
        needle = needle.strip()
        if not needle:
            return True
        if only is not None:
            return needle in only or find_text(only, needle)[0] >= 0
        return any(needle in t or find_text(t, needle)[0] >= 0 for t in texts)

    for i, m in enumerate(conv.messages):
        if not found(m.content):
            return f"the content of message {i} ({m.role})"
        if m.reasoning and not found(m.reasoning):
            return f"the reasoning of message {i}"
        for k, c in enumerate(m.tool_calls or []):
            fn = c["function"]
            if not found(fn["name"]) or not all(found(str(key)) for key in fn["arguments"]):
                return f"tool call {k} of message {i} ({fn['name']})"
    for k, t in enumerate(conv.tools or []):
        name = t.get("function", t).get("name") if isinstance(t, dict) else None
        if isinstance(name, str) and not found(name):
            return f"tool schema {k} ({name})"
    return None


__all__ = ["find_text", "forms", "not_rendered"]
