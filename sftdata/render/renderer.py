"""Chat-template rendering with exact label masks (DESIGN §2, invariant C2).

What is trained, for each trained assistant turn, is exactly what the model must generate at
inference: from the end of the generation prompt for the preceding messages
(``render(messages[:i], add_generation_prompt=True)``) through the stop token that ends the turn
(reasoning blocks, channel headers and tool-call markup included). It is derived by construction:

1. the turn's start is the length of the generation-prompt render of the conversation prefix,
   and the render of the prefix including the turn says what the turn renders as (templates with
   ``{% generation %}`` blocks are rendered the same way: on trl's training templates the blocks
   also wrap layout after the stop token, e.g. the newline after ``<|im_end|>``, which the model
   never generates);
2. the turn ends at the first stop token after its start: the tokenizer's EOS, the model folder's
   ``generation_config.json`` EOS ids, or the template's own end-of-turn (the special token it
   writes right after an assistant reply). When the template writes none inside the turn, a stop
   token opening the next turn is trained (GLM stops on ``<|user|>``/``<|observation|>``) and
   nothing else of it.

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

Nothing is dropped silently. The template's capabilities are probed once (system role, tool role,
tool calls, tool schemas, reasoning); what it cannot render natively is folded in, in documented
ways, and counted (``FOLD_INS``): a system message merged into the first user turn, tool results
as a marked user turn, tool calls as JSON lines in the reply, tool schemas after "Available
tools:" in the system message, reasoning as ``<think>…</think>`` before the reply. After
rendering, every message's content and reasoning, every tool call's name and every tool schema's
name must be in the text, or the record is refused with the reason. ``strict`` refuses instead of
folding in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from sftdata.conversation import Conversation
from sftdata.errors import ConfigError, TemplateError
from sftdata.render.coverage import not_rendered
from sftdata.render.foldins import as_parts, template_messages
from sftdata.render.masks import mask_by_edges, mask_from_offsets, subtract
from sftdata.render.probe import PROBE, probe_caps
from sftdata.render.samples import Encoded, EncodedRecord, RecordRender, Rendered
from sftdata.templates import DEFAULT_TEMPLATE_DATE, load_template
from sftdata.tokenizer import stop_tokens

TRAIN_ON = ("all-assistant", "last-assistant", "everything")


# ------------------------------------------------------------------------------------ helpers


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


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

    Raises:
        TemplateError: unknown template, Jinja syntax error (file:line), ``auto`` without a
            chat_template, or a template that cannot render a plain user/assistant exchange.
        ConfigError: ``train_on`` not one of :data:`TRAIN_ON`.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str = "auto",
        train_on: str = "all-assistant",
        template_date: str = DEFAULT_TEMPLATE_DATE,
        strict: bool = False,
    ):
        if train_on not in TRAIN_ON:
            raise ConfigError(f"train_on {train_on!r} is not one of {', '.join(TRAIN_ON)}")
        self.train_on = train_on
        self.strict = strict
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
        added = self._backend_tok.get_added_tokens_decoder().values()
        special = sorted({t.content for t in added if t.content}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, special))) if special else None
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
        eot = self._first_special(one, one.index(a) + len(a))
        stops = [*stop_tokens(tokenizer), *([eot] if eot else [])]
        self.stop_tokens: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        """Strings that end a trained turn: EOS, generation-config EOS ids, template end-of-turn."""
        self._stop_re = (
            re.compile("|".join(map(re.escape, sorted(self.stop_tokens, key=len, reverse=True))))
            if self.stop_tokens
            else None
        )
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

    def _first_special(self, text: str, at: int) -> str | None:
        """The special token right after ``at`` (layout whitespace allowed), or None."""
        if self._special_re is None:
            return None
        j = at
        while j < len(text) and text[j].isspace():
            j += 1
        m = self._special_re.match(text, j)
        return m.group(0) if m else None

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

    def _refuse(self, conv: Conversation, out: RecordRender, reason: str, why: str) -> None:
        out.samples = []
        out.reason = reason
        out.refusal = f"{conv.source}: template {self.name}: record {conv.id!r}: {why}"

    def render_record(self, conv: Conversation) -> RecordRender:
        """Render one record into its samples and trained spans, or say why it is refused."""
        out = RecordRender()
        msgs, tools, origin, folds = self.template_messages(conv)
        out.fold_ins = folds
        if folds and self.strict:
            self._refuse(conv, out, "strict", f"needs fold-in {', '.join(folds)} (--strict)")
            return out
        blocks: list[tuple[int, int]] | None = None
        try:
            if self._backend.exact_blocks:
                text, blocks = self._backend.render_blocks(msgs, tools)
            else:
                text = self._backend.render(msgs, tools, False)
        except Exception as e:
            self._refuse(conv, out, "template_error", f"{type(e).__name__}: {_one_line(e)}")
            return out
        # one block per assistant message (our templates' invariant; else derive by prefixes)
        block_of: dict[int, tuple[int, int]] = {}
        if blocks is not None:
            assistants = [j for j, d in enumerate(msgs) if d["role"] == "assistant"]
            if len(blocks) == len(assistants):
                block_of = dict(zip(assistants, blocks, strict=True))
        flags = self._flags(conv)
        everything = self.train_on == "everything"
        spans: list[tuple[int, int]] = []
        excluded: list[tuple[int, int]] = []
        extra: list[Rendered] = []
        cursor = 0
        try:
            for j, d in enumerate(msgs):
                i = origin[j]
                flag = flags[i] if i is not None else None
                wanted = flag is True if not everything else flag is False
                if not wanted:
                    continue
                block = block_of.get(j)
                if block is not None and block[0] >= cursor:
                    s, e = block
                    if self._stop_re is None or not self._stop_re.search(text, s, e):
                        out.no_stop += 1
                elif d["role"] == "assistant":
                    s, e, sample = self._assistant_turn(msgs, tools, j, text, cursor, out, _text(d))
                    if sample is not None:
                        if not everything:
                            extra.append(sample)
                        continue
                else:
                    s, e = self._locate_content(text, _text(d), cursor)
                    if s < 0:
                        continue  # checked as "not rendered" below
                (excluded if everything else spans).append((s, e))
                cursor = e
        except _Fallback as f:
            self._refuse(conv, out, "not_rendered", str(f))
            return out
        if everything:
            spans = subtract([(0, len(text))], excluded)
        out.samples = [Rendered(text, [(s, e) for s, e in spans if e > s]), *extra]
        out.split_turns = len(extra)
        missing = not_rendered(conv, [s.text for s in out.samples])
        if missing:
            self._refuse(conv, out, "not_rendered", f"the template did not render {missing}")
        return out

    def _assistant_turn(
        self,
        msgs: list[dict[str, Any]],
        tools: Any,
        j: int,
        text: str,
        cursor: int,
        out: RecordRender,
        original: str,
    ) -> tuple[int, int, Rendered | None]:
        """(start, end, None) of turn ``j`` inside ``text``, or (start, end, its own sample)."""
        last = j == len(msgs) - 1
        prompt = self._backend.render(msgs[:j], tools, True) if j else ""
        whole = text if last else self._backend.render(msgs[: j + 1], tools, False)
        s = len(prompt)
        if not whole.startswith(prompt):
            # The generation prompt is not a prefix of the turn's own render (DeepSeek-R1 and
            # Nemotron open "<think>" in the prompt that the rendered turn closes or drops): the
            # turn is trained from where its render departs from the prompt.
            out.fallback = True
            s = _common_prefix(prompt, whole)
            if s < cursor:
                raise _Fallback(
                    f"assistant message {j}: the template renders the conversation before it "
                    "differently with and without a generation prompt, so its label mask cannot "
                    "be derived"
                )
        follow = text if text.startswith(whole) else None
        # A reply that itself holds a stop token's text ("... </s> ok") is searched past.
        after = s
        if self._stop_re is not None and self._stop_re.search(original):
            k = whole.find(original, s)
            after = k + len(original) if k >= 0 else s
        e = self._stop_end(whole, s, len(whole), out, follow=follow, search_from=after)
        if text.startswith(whole[:e]) and s >= cursor:
            return s, e, None
        return s, e, Rendered(whole[:e], [(s, e)])

    def _stop_end(
        self,
        text: str,
        start: int,
        end: int,
        out: RecordRender,
        *,
        search_from: int | None = None,
        follow: str | None = None,
    ) -> int:
        """End of the turn rendered as ``text[start:end]``: through its first stop token; else
        through a stop token that opens what follows it (in ``follow``, the whole record's text
        of which ``text`` is a prefix, or in ``text``), after layout whitespace only; else the
        turn's text without trailing layout (counted in ``no_stop``)."""
        if self._stop_re is not None:
            m = self._stop_re.search(text, start if search_from is None else search_from, end)
            if m:
                return m.end()
            after = text if follow is None else follow
            j = end
            while j < len(after) and after[j].isspace():
                j += 1
            m = self._stop_re.match(after, j)
            if m:
                return m.end()
        out.no_stop += 1
        e = end
        while e > start and text[e - 1].isspace():
            e -= 1
        return e

    @staticmethod
    def _locate_content(text: str, content: str, cursor: int) -> tuple[int, int]:
        """Where ``content`` (or its stripped text: templates may strip) is at/after ``cursor``."""
        if not content:
            return -1, -1
        p = text.find(content, cursor)
        if p >= 0:
            return p, p + len(content)
        stripped = content.strip()
        p = text.find(stripped, cursor) if stripped else -1
        return (p, p + len(stripped)) if p >= 0 else (-1, -1)

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
        self, convs: Sequence[Conversation], *, skip_invalid: bool = False
    ) -> list[EncodedRecord]:
        """Render and tokenize records with ONE batched call of the Rust tokenizer.

        A refused record raises its TemplateError, or with ``skip_invalid`` comes back with no
        samples and its ``render.refusal`` set.

        Token masks come from ``char_to_token`` at span edges (two lookups per span) rather than
        converting every token's offsets to Python (converting offsets alone costs about a third
        of the batch encode time).
        """
        renders = [self.render_record(c) for c in convs]
        if not skip_invalid:
            for r in renders:
                if r.refusal is not None:
                    raise TemplateError(r.refusal)
        flat = [s for r in renders for s in r.samples]
        encodings = self._backend_tok.encode_batch([s.text for s in flat], add_special_tokens=False)
        it = iter(zip(flat, encodings, strict=True))
        out = []
        for r in renders:
            samples = []
            for _ in r.samples:
                sample, enc = next(it)
                ids = np.array(enc.ids, dtype=np.int32)
                mask = mask_by_edges(enc, len(ids), len(sample.text), sample.spans)
                if mask is None:
                    mask = mask_from_offsets(
                        np.array(enc.offsets, dtype=np.int64).reshape(-1, 2), sample.spans
                    )
                samples.append(Encoded(input_ids=ids, train_mask=mask))
            out.append(EncodedRecord(samples=samples, render=r))
        return out


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo = 0
    while lo < n and a[lo] == b[lo]:
        lo += 1
    return lo


def _text(m: dict[str, Any]) -> str:
    c = m.get("content")
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c if isinstance(c, str) else ""


class _Fallback(Exception):
    """A turn that no derivation could place (the record is refused)."""


# --------------------------------------------------------------------------------- span -> tokens
