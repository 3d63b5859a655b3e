"""The second renderer: trained spans derived again with transformers' own
``apply_chat_template`` (its own Jinja environment), from renders of conversation prefixes and ONE
tokenization of each sample's text, independently of ``sftdata.render`` (the C2 tests use it as
their oracle; ``sftdata audit`` as a check of every record).

For each trained assistant turn ``i`` of the messages a template sees:

- its start is the end of ``apply_chat_template(messages[:i], add_generation_prompt=True)``;
- ``apply_chat_template(messages[:i+1])`` is what the turn renders as when it is the last; the turn
  ends through the first stop token after its start (tokenizer EOS, the generation config's EOS
  ids, the template's end-of-turn: the special token it writes right after a reply), or, when the
  template writes none inside the turn, through a stop token that opens the next turn;
- where the whole conversation's render holds the turn exactly so, it is trained there; otherwise
  the turn is a sample of its own (the prefix through the turn).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from sftdata.conversation import Conversation
from sftdata.render import Renderer

PINNED: dict[str, datetime] = {"date": datetime(2024, 1, 1)}
"""The date templates see (``strftime_now``, ``date_string``): sftdata's default
``--template-date`` unless a caller sets the renderer's."""


class _PinnedDatetime(datetime):
    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        return PINNED["date"]


def _render(tok: Any, msgs: list[dict[str, Any]], tools: Any, gen: bool) -> str:
    import transformers.utils.chat_template_utils as ctu

    # transformers' strftime_now reads datetime.now(): pinned to the renderer's template date.
    ctu.datetime = _PinnedDatetime  # type: ignore[misc]
    return tok.apply_chat_template(
        msgs,
        tools=tools,
        tokenize=False,
        add_generation_prompt=gen,
        date_string=PINNED["date"].strftime("%d %b %Y"),
    )


MARKER = re.compile(
    r"<\|[^<>|\s]+\|>|<｜[^<>｜\s]+｜>|<\|[^<>|\s]+>|<[^<>|\s]+\|>|</?[A-Za-z][\w▁.:-]*>"
)


def control_tokens(tok: Any) -> list[str]:
    """The tokenizer's special added tokens and its added tokens written like markers, longest
    first (what C8 says never comes from a record's text)."""
    found = {
        t.content
        for t in tok.added_tokens_decoder.values()
        if t.content and (t.special or MARKER.fullmatch(t.content))
    }
    return sorted(found, key=len, reverse=True)


def _controls_after(text: str, at: int, controls: list[str]) -> list[str]:
    """The control tokens written one after another at ``at`` (layout whitespace before)."""
    j = len(text[:at]) + (len(text[at:]) - len(text[at:].lstrip()))
    run = []
    while True:
        t = next((c for c in controls if text.startswith(c, j)), None)
        if t is None:
            return run
        run.append(t)
        j += len(t)


def _probe_render(tok: Any, msgs: list[dict[str, Any]]) -> str:
    try:
        text = _render(tok, msgs, None, False)
    except Exception:
        text = ""
    if "xyzzy" not in text:
        text = _render(
            tok, [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in msgs], None,
            False,
        )  # fmt: skip
    return text


def stop_strings(tok: Any, folder: Path | None) -> list[str]:
    """EOS, the generation config's EOS ids, and the template's end of turn: the last of the
    control tokens it writes right after a probe reply."""
    stops = [tok.eos_token]
    cfg = folder / "generation_config.json" if folder is not None else None
    if cfg is not None and cfg.is_file():
        ids = json.loads(cfg.read_text())["eos_token_id"]
        stops += [tok.convert_ids_to_tokens(i) for i in ([ids] if isinstance(ids, int) else ids)]
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "xyzzy"}]
    text = _probe_render(tok, probe)
    run = _controls_after(text, text.index("xyzzy") + 5, control_tokens(tok))
    if run:
        stops.append(run[-1])
    return [s for s in dict.fromkeys(stops) if s]


def appended_token(tok: Any, stops: list[str]) -> str | None:
    """The stop token C2 appends after a reply the template ends with none: the stop token the
    template writes next when a user turn follows, else EOS, else the first stop token."""
    controls = control_tokens(tok)
    usable = [s for s in stops if s in controls]
    probe = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "xyzzy"},
        {"role": "user", "content": "again"},
    ]
    try:
        text = _probe_render(tok, probe)
        nxt = _controls_after(text, text.index("xyzzy") + 5, controls)
    except Exception:
        nxt = []
    if nxt and nxt[0] in usable:
        return nxt[0]
    if tok.eos_token in usable:
        return tok.eos_token
    return usable[0] if usable else None


def _first_stop(text: str, start: int, end: int, stops: list[str]) -> int | None:
    best = None
    for s in stops:
        k = text.find(s, start, end)
        if k >= 0 and (best is None or k < best[0] or (k == best[0] and len(s) > best[1])):
            best = (k, len(s))
    return None if best is None else best[0] + best[1]


def _reply_end(turn: str, s: int, reply: str) -> int:
    e = max(len(turn.rstrip()), s)
    if reply[-1:].isspace() and turn.rfind(reply, s) >= 0:
        e = max(e, turn.rfind(reply, s) + len(reply))
    return e


def strings_in(x: Any) -> list[str]:
    """Every string in a JSON-like value, keys included."""
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [s for k, v in x.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(x, list):
        return [s for v in x for s in strings_in(v)]
    return []


def _own_strings(m: dict[str, Any]) -> list[str]:
    """A reply's own strings (content and every string of its tool calls), also JSON-escaped."""
    found = [text_of(m), *strings_in(m.get("tool_calls"))]
    return [f for s in found if s for f in {s, json.dumps(s, ensure_ascii=False)[1:-1]}]


def expected_samples(
    tok: Any,
    msgs: list[dict[str, Any]],
    tools: Any,
    trained: list[bool],
    stops: list[str],
    append: str | None = None,
    *,
    past_reply: bool = False,
) -> tuple[list[tuple[str, list[tuple[int, int]]]], bool, int]:
    """(text, trained character spans) of each sample the record must give, whole record first,
    whether a turn's generation prompt is not a prefix of its own render (DeepSeek-R1's
    prompt opens ``<think>`` that its render of the turn drops): such a turn is trained from where
    its render departs from the prompt, and how many replies get the ``append`` stop token (a
    reply after which the template writes no stop: it is inserted right after the reply).
    ``past_reply``: stops are looked for after the reply's own text (which may hold a stop
    token's text, encoded as plain text under ``--special-text split``)."""
    full = _render(tok, msgs, tools, False)
    spans: list[tuple[int, int]] = []
    inserts: list[int] = []
    own: list[tuple[str, list[tuple[int, int]]]] = []
    located = False
    appended = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not trained[i]:
            continue
        prompt = _render(tok, msgs[:i], tools, True) if i else ""
        turn = full if i + 1 == len(msgs) else _render(tok, msgs[: i + 1], tools, False)
        s = len(prompt)
        if not turn.startswith(prompt):
            located = True  # trained from where the turn's render departs from its prompt
            pairs = zip(prompt, turn, strict=False)
            s = next((k for k, (x, y) in enumerate(pairs) if x != y), min(len(prompt), len(turn)))
        after = s
        for mine in _own_strings(m) if past_reply else []:
            k = turn.find(mine, s)
            after = max(after, k + len(mine) if k >= 0 else s)
        e = _first_stop(turn, after, len(turn), stops)
        if e is None and full.startswith(turn):
            j = len(turn)
            while j < len(full) and full[j].isspace():
                j += 1
            e = next((j + len(x) for x in stops if full.startswith(x, j)), None)
        added = ""
        if e is None:
            e = _reply_end(turn, s, text_of(m))
            added = append or ""
            appended += bool(added)
        if full.startswith(turn[:e]) and (not spans or s >= spans[-1][1]):
            spans.append((s, e))
            if added:
                inserts.append(e)
        else:
            own.append((turn[:e] + added, [(s, e + len(added))]))
    for p in reversed(inserts):
        full = full[:p] + (append or "") + full[p:]
        n = len(append or "")
        spans = [(a + n * (a > p), b + n * (b >= p)) for a, b in spans]
    return [(full, spans), *own], located, appended


def text_of(m: dict[str, Any]) -> str:
    """A template message's text (string content or the text of its parts)."""
    c = m.get("content")
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c or ""


def token_mask(tok: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], np.ndarray]:
    """Ids of one tokenization of ``text`` and the tokens overlapping a span."""
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    return enc.ids, spans_mask(enc.offsets, spans)


def spans_mask(offsets: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    """The tokens (character ``offsets`` of each) that overlap a span."""
    offsets = np.array(offsets, dtype=np.int64).reshape(-1, 2)
    a = offsets[:, 0]
    b = np.maximum(offsets[:, 1], a + 1)  # an empty token still sits at its position
    mask = np.zeros(len(offsets), dtype=bool)
    for s, e in spans:
        mask |= (a < e) & (s < b)
    return mask


def trained_flags(r: Renderer, conv: Conversation, origin: list[int | None]) -> list[bool]:
    """Per template message: whether the renderer's policy trains it (its ``train_on`` and the
    messages' own ``train`` flags)."""
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    out = []
    for o in origin:
        m = None if o is None else conv.messages[o]
        if m is None or m.role != "assistant":
            out.append(False)
        elif m.train is not None:
            out.append(m.train)
        else:
            out.append(r.train_on == "all-assistant" or o == last)
    return out
