"""Trained character spans -> trained tokens (C2's last step): a token is trained iff its
character span overlaps a trained span, on the tokenization of the whole sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def subtract(spans: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = spans
    for hs, he in holes:
        nxt = []
        for s, e in out:
            if he <= s or hs >= e:
                nxt.append((s, e))
                continue
            if s < hs:
                nxt.append((s, hs))
            if he < e:
                nxt.append((he, e))
        out = nxt
    return out


def mask_from_offsets(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Reference rule: a token is trained iff its ``[start, end)`` overlaps a trained span.

    Zero-width tokens count as covering their start character. ``offsets`` is int[n, 2].
    """
    n = len(offsets)
    if not spans or n == 0:
        return np.zeros(n, dtype=bool)
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    ends = np.array([e for _, e in spans], dtype=np.int64)
    tok_start = offsets[:, 0]
    tok_end = np.maximum(offsets[:, 1], tok_start + 1)
    k = np.searchsorted(ends, tok_start, side="right")  # first span ending after the token start
    ok = k < len(spans)
    mask = np.zeros(n, dtype=bool)
    mask[ok] = starts[k[ok]] < tok_end[ok]
    return mask


def mask_by_edges(
    enc: Any, n: int, text_len: int, spans: list[tuple[int, int]]
) -> np.ndarray | None:
    """Same rule as :func:`mask_from_offsets` via two ``char_to_token`` lookups per span.

    Returns None when a span edge falls on a character no token covers (the caller then uses
    the offsets).
    """
    mask = np.zeros(n, dtype=bool)
    for s, e in spans:
        first = enc.char_to_token(s)
        if first is None:
            return None
        if e >= text_len:
            last = n - 1
        else:
            t = enc.char_to_token(e)
            if t is None:
                return None
            last = t if enc.token_to_chars(t)[0] < e else t - 1
        mask[first : last + 1] = True
    return mask
