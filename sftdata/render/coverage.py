"""Nothing dropped silently: after rendering (and folding in), everything the record holds must
be in the text the model trains on, or the record is refused with what is missing."""

from __future__ import annotations

from sftdata.conversation import Conversation


def not_rendered(conv: Conversation, texts: list[str]) -> str | None:
    """What of the record none of its samples' ``texts`` holds ("the content of message 3
    (tool)", ...), or None: every message's content and reasoning, every tool call's name and
    argument keys, every tool schema's name must be rendered somewhere."""
    only = texts[0] if len(texts) == 1 else None  # the usual case: one sample

    def found(needle: str) -> bool:
        needle = needle.strip()
        if only is not None:
            return not needle or needle in only
        return not needle or any(needle in t for t in texts)

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


__all__ = ["not_rendered"]
