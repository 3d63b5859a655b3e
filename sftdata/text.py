"""Summaries in words: counts (``1 record``, ``2,048 records``) and the stop set."""

from __future__ import annotations

import functools
from typing import Any


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` with thousands separators and ``noun``, plural unless it is 1 (``plural``, or
    ``s`` added)."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def stop_line(stops: list[dict[str, Any]], appended: str | None, count: int) -> str:
    """``stop tokens <|im_end|> (template), <|endoftext|> (eos); appended after 12 replies:
    <|endoftext|>`` from an index's ``template.stops`` (pack summary, ``inspect``)."""
    listed = ", ".join(f"{s['token']} ({', '.join(s['from'])})" for s in stops)
    text = f"stop tokens {listed or 'none'}"
    if count:
        text += f"; appended after {counted(count, 'reply', 'replies')}: {appended}"
    return text


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring in one line, for a config dataclass (``--help-config``).

    Cached: every click option of a command built from a dataclass field asks for its class's
    docs, and reading a class's source (``inspect.getsource`` tokenizes its whole module) each
    time cost a few hundredths of a second of every CLI start."""
    import inspect
    import re

    src = inspect.getsource(cls)
    return {
        name: " ".join(doc.split())
        for name, doc in re.findall(r'^    (\w+): [^\n]*\n    """(.*?)"""', src, flags=re.M | re.S)
    }


__all__ = ["counted", "field_docs", "stop_line"]
