"""The audit's tasks, run in the pack's bounded workers (``sftdata.pack.workers``): a raw block
of canonical JSONL lines -> one :class:`~sftdata.audit.facts.Facts` per record, and the record
viewer's data for the records a report lists."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from sftdata.audit.facts import Facts, signatures, text_facts
from sftdata.conversation import Conversation
from sftdata.errors import first_line
from sftdata.pack.encode import RawChunk, get_renderer, parse_chunk, renderer_key
from sftdata.pack.options import PackOptions


@dataclass(frozen=True)
class Settings:
    """What one audit task computes besides the render."""

    split: str = "train"
    """The split the task's records belong to."""
    every: int = 1
    """The second renderer checks records whose line number is a multiple of this (0: none)."""
    minhash: bool = True
    """Compute MinHash signatures (near duplicates, leakage)."""
    ngrams: bool = False
    """Compute word n-gram hashes (contamination)."""


_SECOND: dict[str, Any] = {}  # per process: the second renderer for a renderer key


def second_renderer(opts: PackOptions) -> tuple[Any, list[str], str | None] | None:
    """transformers' tokenizer with the renderer's template, the stop strings and the appended
    stop the second renderer derives (None: a FastChat template, which has no Jinja text)."""
    key = renderer_key(opts)
    if _SECOND.get("key") != key:
        from sftdata.audit.oracle import PINNED, appended_token, stop_strings
        from sftdata.pack.encode import loaded_tokenizer
        from sftdata.tokenizer import load_tokenizer, resolve_spec

        renderer = get_renderer(opts)
        value = None
        if not renderer.name.startswith("fastchat:"):
            # the class AutoTokenizer picked when the snapshot was taken, loaded directly
            hf = load_tokenizer(opts.tokenizer, cls=loaded_tokenizer().tokenizer_class or None)
            hf.chat_template = renderer.template_text
            PINNED["date"] = datetime.fromisoformat(renderer.template_date)
            folder = resolve_spec(opts.tokenizer)
            stops = stop_strings(hf, folder if folder.is_dir() else None)
            append = appended_token(hf, stops) if opts.missing_stop == "append" else None
            value = (hf, stops, append)
        _SECOND.update(key=key, value=value)
    return _SECOND["value"]


def _pieces(hf: Any, ids: list[int], where: np.ndarray) -> str:
    text = "".join(hf.decode(ids[k : k + 1]) for k in where[:12])
    return text[:80] + ("…" if len(text) > 80 or len(where) > 12 else "")


def _expected(opts: PackOptions, conv: Conversation) -> list[tuple[str, Any]] | str:
    """The second renderer's samples of ``conv`` (text, trained spans), or why it has none."""
    from sftdata.audit.oracle import expected_samples, trained_flags

    hf, stops, append = second_renderer(opts)  # type: ignore[misc]
    renderer = get_renderer(opts)
    msgs, tools, origin, _ = renderer.template_messages(conv)
    flags = trained_flags(renderer, conv, origin)
    try:
        want, _, _ = expected_samples(
            hf, msgs, tools, flags, stops, append, past_reply=opts.special_text == "split"
        )
    except Exception as e:  # the second renderer's own Jinja refuses what ours rendered
        return f"transformers cannot render it ({first_line(e)})"
    return want


def crosscheck(opts: PackOptions, pairs: list[tuple[Conversation, Any]]) -> list[str | None]:
    """For each (record, its encoding, with offsets): how its samples differ from the second
    renderer's, in one line, or None.

    The second renderer's spans are compared token by token with ours for every record. Its
    texts are tokenized by transformers' tokenizer (in one batch) where they differ from ours,
    and for the first of every :data:`TOKENIZE_EVERY` records, which checks that tokenizer
    agrees with ours; elsewhere the texts are ours character for character and our tokens'
    offsets stand for them."""
    second = second_renderer(opts) if pairs else None
    if second is None:
        return [None] * len(pairs)
    hf = second[0]
    wants = [_expected(opts, conv) for conv, _ in pairs]
    tokenize = [
        not isinstance(w, str) and (k % TOKENIZE_EVERY == 0 or not _same_texts(enc, w))
        for k, ((_, enc), w) in enumerate(zip(pairs, wants, strict=True))
    ]
    texts = [t for w, yes in zip(wants, tokenize, strict=True) if yes for t, _ in w]
    encodings = iter(hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    out: list[str | None] = []
    for (_, enc), want, yes in zip(pairs, wants, tokenize, strict=True):
        if isinstance(want, str):
            out.append(want)
            continue
        if yes:
            theirs = [(e.ids, e.offsets) for e in (next(encodings) for _ in want)]
        else:
            theirs = [(None, s.offsets) for s in enc.samples]  # our own tokens
        out.append(_compare(hf, enc, want, theirs))
    return out


TOKENIZE_EVERY = 16
"""transformers' tokenizer reads the second renderer's texts for the first of every this many
records :func:`crosscheck` is given (and wherever they differ from ours)."""


def _same_texts(enc: Any, want: list[tuple[str, Any]]) -> bool:
    """Whether the second renderer's sample texts are ours character for character (a sample
    tokenized by the control-text encoder, or without offsets, never counts as the same)."""
    return len(enc.samples) == len(want) and all(
        s.offsets is not None and r.hidden is None and r.text == text
        for s, r, (text, _) in zip(enc.samples, enc.render.samples, want, strict=True)
    )


def _compare(
    hf: Any, enc: Any, want: list[tuple[str, Any]], theirs: list[tuple[list[int] | None, Any]]
) -> str | None:
    """How ``enc`` differs from the second renderer's samples ``want`` given their tokens
    (``theirs``: ids and offsets per sample; ids None: ours, the same text)."""
    from sftdata.audit.oracle import spans_mask

    if len(enc.samples) != len(want):
        return f"{len(enc.samples)} samples here, {len(want)} by the second renderer"
    for k, (got, (_, spans), (ids, offsets)) in enumerate(
        zip(enc.samples, want, theirs, strict=True)
    ):
        if ids is not None and got.input_ids.tolist() != ids:
            return f"sample {k}: its text differs from transformers' render of the template"
        mask = spans_mask(offsets, spans)
        if not np.array_equal(got.train_mask, mask):
            ids = got.input_ids.tolist()
            ours = _pieces(hf, ids, np.flatnonzero(got.train_mask & ~mask))
            other = _pieces(hf, ids, np.flatnonzero(mask & ~got.train_mask))
            return (
                f"sample {k}: trained only here: {ours!r}; only by the second renderer: {other!r}"
            )
    return None


def _record_lines(raw: RawChunk) -> list[int]:
    """The line of each record of ``raw`` (its non-blank lines, as ``parse_chunk`` reads them)."""
    return [k for k, b in enumerate(raw.data.splitlines(), start=raw.first_line) if b.strip()]


def audit_chunk(raw: RawChunk, opts: PackOptions, settings: Settings) -> list[Facts]:
    """The facts of every record of ``raw``."""
    convs = parse_chunk(raw)
    records = get_renderer(opts).encode_batch(
        convs, skip_invalid=True, offsets=bool(settings.every)
    )
    lines = _record_lines(raw)
    out = []
    for conv, rec, line in zip(convs, records, lines, strict=True):
        rr = rec.render
        lens = [len(s.input_ids) for s in rec.samples]
        f = Facts(
            id=conv.id, where=str(conv.source), file=raw.path, line=line, split=settings.split,
            tokens=max(lens, default=0), total=sum(lens),
            trained=sum(int(np.count_nonzero(s.train_mask)) for s in rec.samples),
            refusal=rr.refusal, reason=rr.reason, fold_ins=tuple(rr.fold_ins),
            appended=rr.appended, no_stop=rr.no_stop,
        )  # fmt: skip
        f.checked = rr.refusal is None and bool(settings.every) and line % settings.every == 0
        out.append(f)
    shingles = text_facts(convs, out, ngrams=settings.ngrams)
    if settings.minhash:
        for f, sig in zip(out, signatures(shingles), strict=True):
            f.minhash = sig
    pairs = [(c, r) for c, r, f in zip(convs, records, out, strict=True) if f.checked]
    mismatches = iter(crosscheck(opts, pairs))
    for f in out:
        if f.checked:
            f.mismatch = next(mismatches)
    return out


def record_views(raw: RawChunk, opts: PackOptions) -> list[dict[str, Any]]:
    """The record viewer's data for each record of ``raw``: per sample, its tokens as text with
    whether each is trained and whether it is a stop token."""
    from sftdata.pack.encode import loaded_tokenizer

    renderer = get_renderer(opts)
    backend = loaded_tokenizer().backend_tokenizer
    stops = {backend.token_to_id(t) for t in renderer.stop_tokens} - {None}
    convs = parse_chunk(raw)
    lines = _record_lines(raw)
    out = []
    encoded = renderer.encode_batch(convs, skip_invalid=True)
    for conv, rec, line in zip(convs, encoded, lines, strict=True):
        samples = []
        for s in rec.samples:
            ids = s.input_ids.tolist()
            pieces = [backend.decode([i], skip_special_tokens=False) for i in ids]
            samples.append(
                {
                    "pieces": pieces,
                    "trained": s.train_mask.astype(int).tolist(),
                    "stops": [int(i in stops) for i in ids],
                }
            )
        out.append(
            {
                "id": conv.id,
                "where": str(conv.source),
                "file": raw.path,
                "line": line,
                "samples": samples,
                "refusal": rec.render.refusal,
            }
        )
    return out


__all__ = ["Settings", "audit_chunk", "crosscheck", "record_views", "second_renderer"]
