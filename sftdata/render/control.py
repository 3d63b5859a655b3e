"""Control tokens (C8): every control token in a shard comes from the template, never from the
text a record carries.

A tokenizer's *control tokens* are its special added tokens plus the added tokens written like
markers (``<think>``, ``<tool_call>``: Qwen declares them non-special, yet the Rust tokenizer
extracts them from any text all the same). Hugging Face tokenizers parse special tokens in any
text by default, so a reply holding ``<|im_end|>\\n<|im_start|>user`` would be encoded as a real
end of turn and a forged user turn, and trained. Three policies (``--special-text``):

- ``refuse`` (default): a record whose text holds a control token is refused, naming the place;
- ``split``: such text is encoded as plain text, as a tokenizer's ``split_special_tokens`` does,
  while the template's own markers stay control tokens (:class:`SplitEncoder`);
- ``keep``: the text is encoded as the tokenizer parses it (for users who mean it).

The template's *markers* (the control-looking strings it writes around roles and turns) must be
control tokens of the tokenizer, or the model would be trained to write them as plain-text
pieces and never to stop (:func:`marker_problem`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np

from sftdata.conversation import Conversation, Message
from sftdata.errors import TemplateError

SpecialText = Literal["refuse", "split", "keep"]
"""What ``pack`` does with a record whose text holds a control token (``--special-text``)."""
SPECIAL_TEXT: tuple[str, ...] = get_args(SpecialText)

MARKER_RE = re.compile(
    r"<\|[^<>|\s]{1,80}\|>"  # <|im_end|>, <|start_header_id|>, <|END_OF_TURN_TOKEN|>
    r"|<｜[^<>｜\s]{1,80}｜>"  # <｜User｜> (DeepSeek's full-width bars)
    r"|<\|[^<>|\s]{1,80}>|<[^<>|\s]{1,80}\|>"  # <|turn>, <turn|>
    r"|(?<!<)</?[A-Za-z][\w▁.:-]{0,80}>(?!>)"  # <start_of_turn>, </s>, <think>; not <<SYS>>
)
"""What a control token looks like when a template writes it (Llama-2's ``[INST]`` and
``<<SYS>>`` are plain text in its vocabulary, so bracket forms are not markers)."""


@dataclass(frozen=True)
class ControlTokens:
    """The control tokens of one tokenizer and a search over text for them."""

    tokens: dict[str, Any]
    """Control token text -> its ``tokenizers.AddedToken``."""
    ids: dict[str, int]
    """Control token text -> its id."""
    pattern: re.Pattern[str] | None
    """Matches any control token (longest first); None when the tokenizer has none."""

    @classmethod
    def of(cls, backend: Any) -> ControlTokens:
        """The control tokens of a ``tokenizers.Tokenizer``."""
        tokens: dict[str, Any] = {}
        ids: dict[str, int] = {}
        for i, t in sorted(backend.get_added_tokens_decoder().items()):
            if t.content and (t.special or MARKER_RE.fullmatch(t.content)):
                tokens.setdefault(t.content, t)
                ids.setdefault(t.content, i)
        pattern = None
        if tokens:
            alts = sorted(tokens, key=lambda s: (-len(s), s))
            pattern = re.compile("|".join(map(re.escape, alts)))
        return cls(tokens, ids, pattern)

    def search(self, text: str) -> str | None:
        """The first control token in ``text``, or None."""
        if self.pattern is None or not text:
            return None
        m = self.pattern.search(text)
        return m.group(0) if m else None


def record_texts(conv: Conversation) -> Iterator[tuple[str, str]]:
    """(where, text) of everything a record carries that a template may write: each message's
    content, reasoning, tool calls, name and tool_call_id, and the tool schemas."""
    for i, m in enumerate(conv.messages):
        where = f"message {i} ({m.role})"
        yield f"{where} content", m.content
        if m.reasoning:
            yield f"{where} reasoning", m.reasoning
        for k, call in enumerate(m.tool_calls or []):
            yield f"{where} tool call {k}", json.dumps(call, ensure_ascii=False)
        if m.name:
            yield f"{where} name", m.name
        if m.tool_call_id:
            yield f"{where} tool_call_id", m.tool_call_id
    for k, tool in enumerate(conv.tools or []):
        yield f"tool schema {k}", json.dumps(tool, ensure_ascii=False)


def find_control(conv: Conversation, control: ControlTokens) -> tuple[str, str] | None:
    """(where, token) of the first control token in the record's own text, or None."""
    if control.pattern is None:
        return None
    for where, text in record_texts(conv):
        token = control.search(text)
        if token is not None:
            return where, token
    return None


def screen(
    conv: Conversation, control: ControlTokens, mode: str, tokenizer: str
) -> tuple[str | None, Conversation | None]:
    """(why the record is refused, None) or (None, the record with its control tokens hidden
    for ``split``) or (None, None): the record goes on as it is (``mode``: :data:`SPECIAL_TEXT`;
    ``tokenizer`` names it in the reason)."""
    if mode == "keep" or control.pattern is None:
        return None, None
    found = find_control(conv, control)
    if found is None:
        return None, None
    where, token = found
    if mode == "refuse":
        return (
            f"{where} holds {token!r}, a special token of {tokenizer} (a forged control token if "
            "trained); --special-text split encodes such text as plain text, --special-text "
            "keep as the token"
        ), None
    if uses_private_planes(conv):
        return (
            f"{where} holds {token!r} and characters of Unicode planes 15-16, which "
            "--special-text split uses for itself"
        ), None
    return None, hide_control(conv, control)


def renders_as(backend: Any, template_messages: tuple[Any, ...], hidden: str) -> bool:
    """Whether the record (its ``template_messages``) renders as ``hidden`` with the record's own
    control tokens put back: a template that transforms the text (case, slicing, escaping)
    would break the split encoding."""
    msgs, tools, *_ = template_messages
    try:
        return bool(backend.render(msgs, tools, False) == restore(hidden))
    except Exception:  # the template fails on the record itself: not the same render
        return False


def check_markers(
    render: Callable[..., str | Exception],
    one: str,
    control: ControlTokens,
    template: str,
    tokenizer: str,
) -> None:
    """Refuse a template whose markers around roles and turns are not control tokens of the
    tokenizer: ``render(messages, tools, gen)`` renders probes (``one``: user and reply).

    Raises:
        TemplateError: naming the marker, the template and the tokenizer.
    """
    from sftdata.render.probe import PROBE

    u = {"role": "user", "content": PROBE["user"]}
    a = {"role": "assistant", "content": PROBE["assistant"]}
    renders = [one]
    for msgs, gen in (
        ([{"role": "system", "content": PROBE["system"]}, u, a], False),
        ([u, a, u], True),
    ):
        out = render(msgs, None, gen)
        if isinstance(out, str):
            renders.append(out)
    bad = marker_problem(renders, list(PROBE.values()), control)
    if bad is not None:
        raise TemplateError(
            f"{template}: {bad} is not a special token of {tokenizer}: pick the model's own "
            "tokenizer or a template for it"
        )


def marker_problem(rendered: list[str], probes: list[str], control: ControlTokens) -> str | None:
    """The first marker the template writes (in ``rendered``, probe renders whose contents are
    ``probes``) that is not a control token of the tokenizer, or None."""
    for text in rendered:
        for p in probes:
            text = text.replace(p, " ")
        for m in MARKER_RE.finditer(text):
            if m.group(0) not in control.tokens:
                return m.group(0)
    return None


# -- split: control tokens in the record's text encoded as plain text -------------------------

_SENTINEL = 0xF0000
"""Plane 15 (private use): a control token inside the record's text is rendered as the same
number of characters here (``ord(c) + _SENTINEL``), so the template's own markers are the only
control tokens in the render and every position stays where it is."""
_PLACEHOLDER = 0x100000
"""Plane 16 (private use): one character per control token, extracted by the split encoder's
tokenizer in place of the template's markers."""


def _sentinel(token: str) -> str | None:
    if any(ord(c) > 0xFFFD for c in token):
        return None
    return "".join(chr(_SENTINEL + ord(c)) for c in token)


@functools.cache
def _restore_table() -> dict[int, int]:
    # built on first use (only --special-text split needs it): 65,534 entries, a hundredth of
    # a second of every command's start otherwise
    return {_SENTINEL + o: o for o in range(0xFFFE)}


def restore(text: str) -> str:
    """A render of :func:`hide_control` text with the record's own characters put back."""
    return text.translate(_restore_table())


def uses_private_planes(conv: Conversation) -> bool:
    """Whether the record's text holds characters of planes 15-16, which the split encoding
    uses for itself."""
    return any(max(t, default="\0") >= chr(_SENTINEL) for _, t in record_texts(conv))


def hide_control(conv: Conversation, control: ControlTokens) -> Conversation:
    """The record with every control token in its own text replaced by sentinel characters of
    the same length (see :data:`_SENTINEL`)."""
    assert control.pattern is not None
    pattern = control.pattern

    def hide(text: str) -> str:
        return pattern.sub(lambda m: _sentinel(m.group(0)) or m.group(0), text)

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return hide(x)
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return {walk(k): walk(v) for k, v in x.items()}
        return x

    def message(m: Message) -> Message:
        return replace(
            m,
            content=hide(m.content),
            reasoning=None if m.reasoning is None else hide(m.reasoning),
            tool_calls=None if m.tool_calls is None else walk(m.tool_calls),
            name=None if m.name is None else hide(m.name),
            tool_call_id=None if m.tool_call_id is None else hide(m.tool_call_id),
        )

    return Conversation(
        conv.id,
        [message(m) for m in conv.messages],
        conv.source,
        tools=None if conv.tools is None else walk(conv.tools),
        extra=conv.extra,
    )


class SplitEncoder:
    """Encodes a render in which the record's own control-token text is hidden
    (:func:`hide_control`) so that only the template's markers become control tokens.

    One call of a copy of the Rust tokenizer in which every control token is special and
    ``encode_special_tokens`` is on (so none is extracted from text, as ``split_special_tokens``
    does) and each template marker is replaced by a one-character placeholder added token with
    the marker's own flags (lstrip, rstrip, single_word): the text between markers is cut and
    normalised exactly where the tokenizer cuts it at the markers, so ids equal the plain
    encoding wherever the record holds no control token (tested on real vocabularies), and the
    placeholders' ids and offsets are mapped back.
    """

    def __init__(self, backend: Any, control: ControlTokens) -> None:
        from tokenizers import AddedToken, Tokenizer

        state = json.loads(backend.to_str())
        for t in state.get("added_tokens", []):
            if t.get("content") in control.tokens:
                t["special"] = True
        tok = Tokenizer.from_str(json.dumps(state))
        self._control = control
        self._holder: dict[str, str] = {}
        holders = []
        for k, (text, t) in enumerate(sorted(control.tokens.items())):
            ch = chr(_PLACEHOLDER + k)
            self._holder[text] = ch
            holders.append(
                AddedToken(
                    ch,
                    single_word=t.single_word,
                    lstrip=t.lstrip,
                    rstrip=t.rstrip,
                    normalized=False,
                    special=False,
                )
            )
        tok.add_tokens(holders)
        tok.encode_special_tokens = True
        self._tok = tok
        size = tok.get_vocab_size(with_added_tokens=True)
        self._id_map = np.arange(size, dtype=np.int64)
        for text, ch in self._holder.items():
            self._id_map[tok.token_to_id(ch)] = control.ids[text]

    def encode(self, hidden: str) -> tuple[np.ndarray, np.ndarray]:
        """(int32 ids, int64 offsets[n, 2] in the restored text) of a render whose record text
        is hidden; the template's control tokens in it are encoded as themselves."""
        pattern = self._control.pattern
        assert pattern is not None
        parts: list[str] = []
        where: list[int] = []  # placeholder positions in the encoded text
        grow: list[int] = []  # characters each placeholder stands for, less one
        at = n = 0
        for m in pattern.finditer(hidden):
            parts.append(hidden[at : m.start()])
            n += m.start() - at
            parts.append(self._holder[m.group(0)])
            where.append(n)
            grow.append(len(m.group(0)) - 1)
            n += 1
            at = m.end()
        parts.append(hidden[at:])
        enc = self._tok.encode(restore("".join(parts)), add_special_tokens=False)
        ids = self._id_map[np.asarray(enc.ids, dtype=np.int64)].astype(np.int32)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        if where:
            pos = np.asarray(where, dtype=np.int64)
            shift = np.concatenate([[0], np.cumsum(grow)])
            offsets = offsets + shift[np.searchsorted(pos, offsets, side="left")]
        return ids, offsets


__all__ = [
    "MARKER_RE",
    "SPECIAL_TEXT",
    "ControlTokens",
    "SpecialText",
    "SplitEncoder",
    "check_markers",
    "find_control",
    "hide_control",
    "marker_problem",
    "record_texts",
    "renders_as",
    "restore",
    "screen",
    "uses_private_planes",
]
