"""Stops (C2, C8): where each trained reply ends, and the stop token appended after a reply the
template ends with none.

The *stop set* is every token at which the model's generation stops: the tokenizer's EOS, every
``eos_token_id`` of the model folder's ``generation_config.json``, and the template's own end of
turn — the last of the control tokens it writes right after a reply (Command R7B writes
``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``: the end of turn is ``<|END_OF_TURN_TOKEN|>``, and
``<|END_RESPONSE|>`` is an end marker trained before it).

A trained reply runs through the first stop-set token the template writes after it, or through a
stop-set token that opens what follows it (GLM-4 ends a reply by generating the next turn's
``<|user|>``). Where the template writes none (GLM-4's final reply, templates whose replies end
at the next plain-text header), the *appended stop* is inserted right after the reply, trained,
as LLaMA-Factory's ``efficient_eos`` templates do. Which token (:func:`appended_stop`): the
stop-set token the template writes next, where it opens the following turn, so that every reply
of a record ends alike; else the tokenizer's EOS; else the first stop-set token that is a control
token.

``--missing-stop`` says what happens to a reply without a stop: ``append`` (default; the pack
fails when there is no token to append), ``error`` (the pack fails: the template must write
every stop itself), ``allow`` (trained as the template renders it, counted as ``no_stop``: for
completion training without stops).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sftdata.render.control import ControlTokens
from sftdata.tokenizer import stop_sources

MissingStop = Literal["append", "error", "allow"]
"""What ``pack`` does with a trained reply after which the template writes no stop token."""
MISSING_STOP: tuple[str, ...] = get_args(MissingStop)


@dataclass(frozen=True)
class Stop:
    """One token of the stop set."""

    token: str
    """Its text."""
    id: int | None
    """Its id (None: not a single token of the tokenizer)."""
    sources: tuple[str, ...]
    """Where it comes from: ``eos``, ``generation_config``, ``template``."""

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "id": self.id, "from": list(self.sources)}


def end_markers(text: str, at: int, control: ControlTokens) -> list[str]:
    """The control tokens written one after another right after ``at`` (layout whitespace
    allowed before the first)."""
    if control.pattern is None:
        return []
    j = at
    while j < len(text) and text[j].isspace():
        j += 1
    run = []
    while (m := control.pattern.match(text, j)) is not None and m.end() > j:
        run.append(m.group(0))
        j = m.end()
    return run


def stop_set(tok: Any, backend: Any, template_eot: str | None) -> tuple[Stop, ...]:
    """The stop set of a tokenizer and template (EOS first, then the generation config's ids,
    then the template's end of turn), each with its id and sources."""
    found: dict[str, list[str]] = {t: list(s) for t, s in stop_sources(tok)}
    if template_eot:
        found.setdefault(template_eot, []).append("template")
    return tuple(Stop(t, backend.token_to_id(t), tuple(s)) for t, s in found.items() if t)


def appended_stop(
    stops: tuple[Stop, ...], control: ControlTokens, eos: str | None, next_turn: list[str]
) -> str | None:
    """The token appended after a reply the template ends with no stop (module docstring):
    ``next_turn`` is :func:`end_markers` after a probe reply that a user turn follows."""
    usable = [s.token for s in stops if s.token in control.tokens]
    if next_turn and next_turn[0] in usable:
        return next_turn[0]
    if eos in usable:
        return eos
    return usable[0] if usable else None


def probe_stops(
    render: Callable[..., str | Exception], one: str, tok: Any, control: ControlTokens
) -> tuple[tuple[Stop, ...], str | None]:
    """The stop set and the appended stop of a template: ``render(messages, tools, gen)``
    renders probes, ``one`` is its render of a user turn and a reply."""
    from sftdata.render.probe import PROBE

    u = {"role": "user", "content": PROBE["user"]}
    a = {"role": "assistant", "content": PROBE["assistant"]}
    reply = PROBE["assistant"]
    run = end_markers(one, one.index(reply) + len(reply), control)
    stops = stop_set(tok, tok.backend_tokenizer, run[-1] if run else None)
    two = render([u, a, {"role": "user", "content": PROBE["system"]}], None, False)
    following = []
    if isinstance(two, str) and reply in two:
        following = end_markers(two, two.index(reply) + len(reply), control)
    return stops, appended_stop(stops, control, tok.eos_token, following)


class NoStop(Exception):
    """A trained reply that would end without a stop token (the renderer fails the pack)."""


def no_stop_error(mode: str, append: str | None, message: int, renderer: Any) -> None:
    """A reply the template ends with no stop, under ``--missing-stop`` ``mode`` (not
    ``allow``): nothing when ``append`` can be appended, else the error that stops the pack.

    Raises:
        NoStop: naming the message, the template and the tokenizer.
    """
    if mode == "append" and append is not None:
        return
    why = (
        f"{renderer.tokenizer_name} has no stop token to append (no EOS among its special tokens)"
        if mode == "append"
        else f"--missing-stop error (the default, append, would append {append!r})"
    )
    raise NoStop(
        f"the reply in message {message} ends without a stop token: template {renderer.name} "
        f"writes none after it and {why}; pass --missing-stop allow to train replies without one"
    )


def stop_pattern(stops: tuple[Stop, ...]) -> re.Pattern[str] | None:
    """Matches any stop-set token (longest first)."""
    texts = sorted({s.token for s in stops}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def stop_end(
    stop_re: re.Pattern[str] | None,
    text: str,
    start: int,
    end: int,
    *,
    search_from: int | None = None,
    follow: str | None = None,
) -> int | None:
    """End of the turn rendered as ``text[start:end]``: through its first stop token (from
    ``search_from``); else through a stop token that opens what follows it (in ``follow``, the
    whole record's text of which ``text`` is a prefix, or in ``text``), after layout whitespace
    only; else None."""
    if stop_re is None:
        return None
    m = stop_re.search(text, start if search_from is None else search_from, end)
    if m:
        return m.end()
    after = text if follow is None else follow
    j = end
    while j < len(after) and after[j].isspace():
        j += 1
    m = stop_re.match(after, j)
    return m.end() if m else None


def reply_end(text: str, start: int, end: int, reply: str) -> int:
    """Where the reply rendered in ``text[start:end]`` ends: its last character that is not
    layout whitespace, or later where the reply's own text ends in whitespace (a reply's
    trailing newline is part of what the model generates)."""
    e = end
    while e > start and text[e - 1].isspace():
        e -= 1
    if reply and reply[-1].isspace():
        k = text.rfind(reply, start, end)
        if k >= 0:
            e = max(e, k + len(reply))
    return e


def insert_stops(
    text: str, spans: list[tuple[int, int]], at: list[int], stop: str
) -> tuple[str, list[tuple[int, int]]]:
    """``text`` with ``stop`` inserted at each position of ``at`` (ascending), and ``spans``
    moved with it: a span that ends at an insertion takes the stop in."""
    if not at:
        return text, spans
    n = len(stop)
    pieces, prev = [], 0
    for p in at:
        pieces += [text[prev:p], stop]
        prev = p
    pieces.append(text[prev:])
    moved = [
        (s + n * sum(1 for p in at if p < s), e + n * sum(1 for p in at if p <= e))
        for s, e in spans
    ]
    return "".join(pieces), moved


__all__ = [
    "MISSING_STOP",
    "MissingStop",
    "NoStop",
    "Stop",
    "appended_stop",
    "end_markers",
    "insert_stops",
    "no_stop_error",
    "probe_stops",
    "reply_end",
    "stop_end",
    "stop_pattern",
    "stop_set",
]
