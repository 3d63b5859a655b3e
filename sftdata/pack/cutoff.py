"""``--overflow cutoff``: cut an over-long record the way LLaMA-Factory applies ``cutoff_len``.

LLaMA-Factory does not cut a record at its end: it walks the record's (prompt, answer) pairs in
order with the room left, gives the answer its whole length when it takes under half of the room,
else leaves the prompt whole when the prompt takes under half, else splits the room in proportion
to the two lengths, keeps the head of each part, and stops at the first pair that finds no room
(``infer_seqlen`` and the supervised processor in its ``data/processor`` package). A pair here is
a run of untrained tokens followed by the run of trained tokens after it, which is what a
(source, target) pair of LLaMA-Factory's template is once rendered; a record trained everywhere
(``train_on: everything``) is one pair with no prompt, so it is cut at its end.

With ``mask_history`` (``train_on: last-assistant``) LLaMA-Factory walks the pairs from the last
one back ("high priority for last turns"), so the trained reply keeps its room and the oldest
turns are the ones cut; the pairs are then those of every assistant reply, trained or not
(:func:`history_keep`).
"""

from __future__ import annotations

import numpy as np


def split_room(prompt: int, answer: int, room: int) -> tuple[int, int]:
    """Tokens kept of a ``prompt``/``answer`` pair given ``room`` tokens: (prompt, answer)."""
    if 2 * answer < room:
        answer_room = room
    elif 2 * prompt < room:
        answer_room = room - prompt
    else:
        answer_room = int(room * (answer / (prompt + answer)))
    kept_answer = min(answer_room, answer)
    return min(max(room - kept_answer, 0), prompt), kept_answer


def pairs(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, first trained position, end) of each untrained-then-trained run pair of ``mask``."""
    m = mask.astype(np.int8)
    # A pair starts where a trained token is followed by an untrained one (and at 0).
    starts = [0, *(np.flatnonzero((m[:-1] == 1) & (m[1:] == 0)) + 1).tolist()]
    ends = [*starts[1:], len(m)]
    out = []
    for s, e in zip(starts, ends, strict=True):
        trained = np.flatnonzero(m[s:e])
        out.append((s, s + int(trained[0]) if len(trained) else e, e))
    return out


def cutoff_keep(mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Which tokens of a record (``mask``: trained flags) LLaMA-Factory's cut keeps in
    ``seq_len``."""
    return _keep(pairs(mask), len(mask), seq_len)


def history_keep(replies: np.ndarray, seq_len: int) -> np.ndarray:
    """:func:`cutoff_keep` under ``mask_history``: the pairs of ``replies`` (the tokens of every
    assistant reply flagged, as ``train_on: all-assistant`` marks them) walked from the last,
    each keeping its head."""
    return _keep(pairs(replies)[::-1], len(replies), seq_len)


def _keep(walk: list[tuple[int, int, int]], n: int, seq_len: int) -> np.ndarray:
    """The tokens kept of ``n`` when the (start, mid, end) pairs get the room in ``walk`` order."""
    keep = np.zeros(n, dtype=bool)
    used = 0
    for start, mid, end in walk:
        if used >= seq_len:
            break
        n_prompt, n_answer = split_room(mid - start, end - mid, seq_len - used)
        keep[start : start + n_prompt] = True
        keep[mid : mid + n_answer] = True
        used += n_prompt + n_answer
    return keep


__all__ = ["cutoff_keep", "history_keep", "pairs", "split_room"]
