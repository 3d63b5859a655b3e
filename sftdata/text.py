"""Counts in words for summaries: ``1 record``, ``2,048 records``."""

from __future__ import annotations


def counted(count: int, noun: str) -> str:
    """``count`` with thousands separators and ``noun``, plural unless it is 1 (``s`` added)."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


__all__ = ["counted"]
