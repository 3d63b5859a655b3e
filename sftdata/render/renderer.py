"""Chat-template rendering with exact label masks (invariant C2; README, "Pack").

What is trained, for each trained assistant turn, is exactly what the model must generate at
inference: from the end of the generation prompt for the preceding messages
(``render(messages[:i], add_generation_prompt=True)``) through the stop token that ends the turn
(reasoning blocks, channel headers and tool-call markup included). It is derived by construction:

1. the turn's start is the length of the generation-prompt render of the conversation prefix,
   and the render of the prefix including the turn says what the turn renders as (templates with
   ``{% generation %}`` blocks are rendered the same way: on trl's training templates the blocks
   also wrap layout after the stop token, e.g. the newline after ``<|im_end|>``, which the model
   never generates);
2. the turn ends through the first token of the stop set after it, or through one that opens
   the next turn, or the appended stop is inserted after it (``stops``; ``--missing-stop``).

A template that renders earlier turns differently from the last (Qwen3 and DeepSeek-R1 drop the
reasoning of earlier turns, gpt-oss ends them with ``<|end|>`` instead of ``<|return|>``) cannot
train those turns inside the whole record as the model will produce them, so each such turn
becomes a sample of its own: the prefix through that turn, rendered as the template renders a last
turn (counted as ``split_turns``). Only when neither derivation applies (a template whose
generation prompt is not a prefix of its own render, as DeepSeek-R1's prompt opens ``<think>``)
is the turn trained from where its render departs from the prompt, and the record is counted
under ``fallback``.

The whole text of a sample is tokenized once and a token is trained iff its character span
overlaps a trained span: no prompt prefix is tokenized separately, so BPE merges across a
boundary cannot shift the mask.

Nothing is dropped silently: the template's capabilities are probed once (``probe``), what it
cannot render natively is folded in and counted (``foldins``; ``strict`` refuses instead), all
the record holds must be in the text (``coverage``); control tokens come only from the template
(``control``, C8); a record's renders share one CPU floor (``templates.bounds.cpu_floor``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal, get_args

from sftdata.conversation import Conversation
from sftdata.errors import ConfigError, TemplateError, first_line
from sftdata.render.control import (
    SPECIAL_TEXT,
    ControlTokens,
    SplitEncoder,
    check_markers,
    renders_as,
    restore,
    screen,
)
from sftdata.render.coverage import find_text, not_rendered
from sftdata.render.encoding import ascii_twin, encode_renders
from sftdata.render.foldins import as_parts, message_text, template_messages
from sftdata.render.masks import subtract
from sftdata.render.probe import PROBE, probe_caps
from sftdata.render.samples import EncodedRecord, RenderedRecord, RenderedSample
from sftdata.render.stops import (
    MISSING_STOP,
    NoStop,
    insert_stops,
    no_stop_error,
    probe_stops,
    reply_end,
    stop_end,
    stop_pattern,
)
from sftdata.templates import DEFAULT_TEMPLATE_DATE, bounds, load_template
from sftdata.tokenizer import tokenizer_name

TrainOn = Literal["all-assistant", "last-assistant", "everything"]
"""Which turns are trained when a message carries no ``train`` flag."""
TRAIN_ON: tuple[str, ...] = get_args(TrainOn)


# ------------------------------------------------------------------------------------ helpers


def _one_line(e: Exception) -> str:
    if isinstance(e, MemoryError):  # under a pack worker's address-space bound (pack/bounds.py)
        return (
            "the render ran out of memory (SFTPIPE_WORKER_MEMORY_MB raises a pack worker's bound)"
        )
    return first_line(e)


class Renderer:
    """Render canonical conversations with a chat template and compute exact train masks.

    Args:
        tokenizer: a fast tokenizer (``sftdata.tokenizer.load_tokenizer``) or its
            ``TokenizerSnapshot`` (``load_snapshot``).
        template: ``auto`` (the tokenizer's chat_template), a built-in name,
            ``fastchat:NAME`` or a path to a ``.jinja`` file.
        train_on: one of :data:`TRAIN_ON`; per-message ``train`` flags always win.
        template_date: the date templates see (``strftime_now``, ``date_string``).
        strict: refuse a record that would need a fold-in instead of folding it in.
        special_text: one of :data:`SPECIAL_TEXT`: a record whose own text holds a control
            token is refused, encoded as plain text, or kept as the tokenizer parses it.
        missing_stop: one of :data:`MISSING_STOP`: a trained reply after which the template
            writes no stop gets the appended stop, fails the pack, or is trained without one.

    Raises:
        TemplateError: unknown template, Jinja syntax error (file:line), ``auto`` without a
            chat_template, a template that cannot render a plain user/assistant exchange, or
            one whose markers are not control tokens of the tokenizer.
        ConfigError: ``train_on``, ``special_text`` or ``missing_stop`` not one of its choices.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str = "auto",
        train_on: str = "all-assistant",
        template_date: str = DEFAULT_TEMPLATE_DATE,
        strict: bool = False,
        special_text: str = "refuse",
        missing_stop: str = "append",
    ):
        for key, value, choices in (
            ("train_on", train_on, TRAIN_ON),
            ("special_text", special_text, SPECIAL_TEXT),
            ("missing_stop", missing_stop, MISSING_STOP),
        ):
            if value not in choices:
                raise ConfigError(f"{key} {value!r} is not one of {', '.join(choices)}")
        self.train_on = train_on
        self.strict = strict
        self.special_text = special_text
        self.missing_stop = missing_stop
        self.tokenizer_name = tokenizer_name(tokenizer)
        self.template_date = template_date
        self._backend_tok = tokenizer.backend_tokenizer
        self._specials = {
            "bos_token": tokenizer.bos_token or "",
            "eos_token": tokenizer.eos_token or "",
            "unk_token": tokenizer.unk_token or "",
            "pad_token": tokenizer.pad_token or "",
        }
        self.name, self.template_text, self._backend = load_template(
            str(template), tokenizer, specials=self._specials, date=template_date
        )
        self._twin = ascii_twin(self._backend_tok)
        self.control = ControlTokens.of(self._backend_tok)
        """The tokenizer's control tokens (``sftdata.render.control``)."""
        self._split: SplitEncoder | None = None
        u, a = PROBE["user"], PROBE["assistant"]
        self._parts = False
        one = self._try([{"role": "user", "content": u}, {"role": "assistant", "content": a}])
        if isinstance(one, Exception) or a not in one:
            # Multimodal templates (LLaVA, Idefics3, SmolVLM) read content as a list of parts.
            parts = self._try(
                [
                    {"role": "user", "content": [{"type": "text", "text": u}]},
                    {"role": "assistant", "content": [{"type": "text", "text": a}]},
                ]
            )
            if isinstance(parts, str) and a in parts:
                one, self._parts = parts, True
        if isinstance(one, Exception):
            raise TemplateError(
                f"template {self.name}: cannot render a probe conversation: "
                f"{type(one).__name__}: {_one_line(one)}"
            )
        if a not in one or u not in one:
            raise TemplateError(
                f"template {self.name}: does not render a plain user/assistant conversation with "
                "the message contents verbatim, so label masks cannot be derived from it"
            )
        check_markers(self._try, one, self.control, f"template {self.name}", self.tokenizer_name)
        self.stops, self.append_stop = probe_stops(self._try, one, tokenizer, self.control)
        """The stop set (``sftdata.render.stops``: each token with its id and sources) and the
        stop token inserted after a reply the template ends with none (None: none)."""
        self.stop_tokens: tuple[str, ...] = tuple(x.token for x in self.stops)
        """The stop set's strings: EOS, generation-config EOS ids, the template's end of turn."""
        self._stop_re = stop_pattern(self.stops)
        self.caps = probe_caps(self._try)
        minimal = self._try([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
        text = minimal if isinstance(minimal, str) else one.replace(u, "").replace(a, "")
        self.fixed_overhead: int = len(self._backend_tok.encode(text, add_special_tokens=False))
        """Tokens the template adds around a minimal one-turn record (empty user and reply)."""

    def with_train_on(self, train_on: str) -> Renderer:
        """The same template and tokenizer, training ``train_on`` instead (nothing re-probed)."""
        import copy

        if train_on not in TRAIN_ON:
            raise ConfigError(f"train_on {train_on!r} is not one of {', '.join(TRAIN_ON)}")
        other = copy.copy(self)
        other.train_on = train_on
        return other

    # -- template capabilities ----------------------------------------------------------------

    def _try(
        self, msgs: list[dict[str, Any]], tools: Any = None, gen: bool = False
    ) -> str | Exception:
        if self._parts:
            msgs = [as_parts(m) for m in msgs]
        try:
            return self._backend.render(msgs, tools, gen)
        except Exception as e:  # any template failure: the caller decides whether it matters
            return e

    # -- the messages a template sees ---------------------------------------------------------

    def template_messages(
        self, conv: Conversation
    ) -> tuple[list[dict[str, Any]], list[Any] | None, list[int | None], list[str]]:
        """The messages and tools passed to the template, with fold-ins applied (see
        :func:`sftdata.render.foldins.template_messages`)."""
        return template_messages(conv, self.caps, parts=self._parts)

    # -- rendering ----------------------------------------------------------------------------

    def _flags(self, conv: Conversation) -> list[bool | None]:
        """Per message: True trained, False explicitly untrained, None untrained by policy."""
        msgs = conv.messages
        if self.train_on == "all-assistant":
            return [True if m.trained else (False if m.train is False else None) for m in msgs]
        if self.train_on == "last-assistant":
            last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=-1)
            return [
                m.train if m.train is not None else (True if i == last else None)
                for i, m in enumerate(msgs)
            ]
        return [m.train is not False for m in msgs]

    def _refuse(self, conv: Conversation, out: RenderedRecord, reason: str, why: str) -> None:
        out.samples = []
        out.reason = reason
        out.refusal = f"{conv.source}: template {self.name}: record {conv.id!r}: {why}"

    def render_record(self, conv: Conversation) -> RenderedRecord:
        """Render one record into its samples and trained spans, or say why it is refused.

        Raises:
            TemplateError: a trained reply would end without a stop token (``missing_stop``
                ``error``, or ``append`` with no token to append): the whole pack fails.
        """
        out = RenderedRecord()
        original = None
        why, hidden = screen(conv, self.control, self.special_text, self.tokenizer_name)
        if why is not None:
            self._refuse(conv, out, "control_token", why)
            return out
        if hidden is not None:
            original, conv = conv, hidden
        try:
            with bounds.cpu_floor():
                self._render_into(conv, out, original)
        except NoStop as x:
            raise TemplateError(f"{conv.source}: record {conv.id!r}: {x}") from None
        except bounds.TemplateBoundError as e:  # the floor went off between two renders
            self._refuse(conv, out, "template_error", f"TemplateBoundError: {_one_line(e)}")
        if original is not None and out.refusal is None:
            out.samples = [RenderedSample(restore(x.text), x.spans, x.text) for x in out.samples]
        return out

    def _render_into(
        self, conv: Conversation, out: RenderedRecord, original: Conversation | None
    ) -> None:
        msgs, tools, origin, folds = self.template_messages(conv)
        out.fold_ins = folds
        if folds and self.strict:
            self._refuse(conv, out, "strict", f"needs fold-in {', '.join(folds)} (--strict)")
            return
        blocks: list[tuple[int, int]] | None = None
        try:
            if self._backend.exact_blocks:
                text, blocks = self._backend.render_blocks(msgs, tools)
            else:
                text = self._backend.render(msgs, tools, False)
        except Exception as e:
            self._refuse(conv, out, "template_error", f"{type(e).__name__}: {_one_line(e)}")
            return
        if original is not None and not renders_as(self._backend, self.template_messages(original), text):  # fmt: skip
            self._refuse(conv, out, "control_token", "the template changes the text around a special token inside it, so --special-text split cannot encode it as plain text")  # fmt: skip
            return
        block_of = _blocks_of(msgs, blocks)
        flags = self._flags(conv)
        everything = self.train_on == "everything"
        spans: list[tuple[int, int]] = []
        excluded: list[tuple[int, int]] = []
        inserts: list[int] = []
        extra: list[RenderedSample] = []
        cursor = 0
        try:
            for j, d in enumerate(msgs):
                i = origin[j]
                flag = flags[i] if i is not None else None
                wanted = flag is True if not everything else flag is False
                if everything and not wanted and d["role"] == "assistant" and flag is not False:
                    # trained as part of everything: only its stop is looked after
                    s, e, at, _ = self._assistant_turn(msgs, tools, j, text, cursor, out, i)
                    if at is not None and s >= cursor:
                        inserts.append(at)
                    cursor = max(cursor, e)
                    continue
                if not wanted:
                    continue
                block = block_of.get(j)
                if (
                    block is not None
                    and block[0] >= cursor
                    and self._stop_re is not None
                    and self._stop_re.search(text, *block)
                ):
                    s, e = block
                elif d["role"] == "assistant":
                    s, e, at, sample = self._assistant_turn(msgs, tools, j, text, cursor, out, i)
                    if sample is not None:
                        if not everything:
                            extra.append(sample)
                        continue
                    if at is not None:
                        inserts.append(at)
                else:
                    s, e = find_text(text, message_text(d), cursor)  # as written, trimmed, escaped
                    if s < 0:
                        continue  # checked as "not rendered" below
                (excluded if everything else spans).append((s, e))
                cursor = e
        except _Fallback as f:
            self._refuse(conv, out, "not_rendered", str(f))
            return
        except NoStop:
            raise
        except Exception as e:  # a prefix render it fails on (only with the generation prompt)
            self._refuse(conv, out, "template_error", f"{type(e).__name__}: {_one_line(e)}")
            return
        stop = self.append_stop or ""
        text, moved = insert_stops(text, spans + excluded, inserts, stop)
        spans, excluded = moved[: len(spans)], moved[len(spans) :]
        out.appended += len(inserts)
        if everything:
            spans = subtract([(0, len(text))], excluded)
        out.samples = [RenderedSample(text, [(s, e) for s, e in spans if e > s]), *extra]
        out.split_turns = len(extra)
        missing = not_rendered(conv, [x.text for x in out.samples])
        if missing:
            self._refuse(conv, out, "not_rendered", f"the template did not render {missing}")

    def _assistant_turn(
        self,
        msgs: list[dict[str, Any]],
        tools: Any,
        j: int,
        text: str,
        cursor: int,
        out: RenderedRecord,
        i: int | None,
    ) -> tuple[int, int, int | None, RenderedSample | None]:
        """(start, end, where the appended stop goes or None, None) of turn ``j`` inside
        ``text``, or (start, end, None, its own sample); ``i`` is its message in the record."""
        last = j == len(msgs) - 1
        prompt = self._backend.render(msgs[:j], tools, True) if j else ""
        whole = text if last else self._backend.render(msgs[: j + 1], tools, False)
        s = len(prompt)
        if not whole.startswith(prompt):
            # The generation prompt is not a prefix of the turn's own render (DeepSeek-R1 and
            # Nemotron open "<think>" in the prompt that the rendered turn closes or drops): the
            # turn is trained from where its render departs from the prompt.
            out.fallback = True
            s = len(os.path.commonprefix([prompt, whole]))  # noqa: RUF071 - text, not paths
            if s < cursor:
                raise _Fallback(
                    f"assistant message {j}: the template renders the conversation before it "
                    "differently with and without a generation prompt, so its label mask cannot "
                    "be derived"
                )
        follow = text if text.startswith(whole) else None
        original = message_text(msgs[j])
        # A reply that itself holds a stop token's text ("... </s> ok") is searched past.
        after = s
        if self._stop_re is not None and self._stop_re.search(original):
            k = whole.find(original, s)
            after = k + len(original) if k >= 0 else s
        e = stop_end(self._stop_re, whole, s, len(whole), follow=follow, search_from=after)
        at = None
        if e is None:
            e = reply_end(whole, s, len(whole), original)
            if self.missing_stop == "allow":
                out.no_stop += 1
            else:
                no_stop_error(self.missing_stop, self.append_stop, j if i is None else i, self)
                at = e
        if text.startswith(whole[:e]) and s >= cursor:
            return s, e, at, None
        if at is None:
            return s, e, None, RenderedSample(whole[:e], [(s, e)])
        out.appended += 1
        stop = self.append_stop or ""
        return s, e, None, RenderedSample(whole[:e] + stop, [(s, e + len(stop))])

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The whole record's text and trained spans (split turns are not included).

        Raises:
            TemplateError: naming ``conv.source`` when the record is refused.
        """
        r = self.render_record(conv)
        if r.refusal is not None:
            raise TemplateError(r.refusal)
        return r.samples[0].text, r.samples[0].spans

    # -- tokenizing ---------------------------------------------------------------------------

    def encode(self, conv: Conversation) -> EncodedRecord:
        """Render and tokenize one record (see :meth:`encode_batch`)."""
        return self.encode_batch([conv])[0]

    def encode_batch(
        self, convs: Sequence[Conversation], *, skip_invalid: bool = False, offsets: bool = False
    ) -> list[EncodedRecord]:
        """Render and tokenize records with ONE batched call of the Rust tokenizer.

        A refused record raises its TemplateError, or with ``skip_invalid`` comes back with no
        samples and its ``render.refusal`` set. ``offsets``: samples keep their tokens' offsets.

        Masks: ``sftdata.render.encoding.encode_renders``.
        """
        renders = [self.render_record(c) for c in convs]
        if not skip_invalid:
            for r in renders:
                if r.refusal is not None:
                    raise TemplateError(r.refusal)
        if self._split is None and any(x.hidden for r in renders for x in r.samples):
            self._split = SplitEncoder(self._backend_tok, self.control)
        return encode_renders(
            self._backend_tok, renders, self._split, offsets=offsets, twin=self._twin
        )


def _blocks_of(
    msgs: list[dict[str, Any]], blocks: list[tuple[int, int]] | None
) -> dict[int, tuple[int, int]]:
    """Message index -> its ``{% generation %}`` block: one block per assistant message (our
    templates' invariant; else none, and the spans are derived by prefixes)."""
    assistants = [j for j, d in enumerate(msgs) if d["role"] == "assistant"]
    if blocks is None or len(blocks) != len(assistants):
        return {}
    return dict(zip(assistants, blocks, strict=True))


class _Fallback(Exception):
    """A turn that no derivation could place (the record is refused)."""
