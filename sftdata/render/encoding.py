"""Rendered samples -> token ids and train masks, with ONE batched call of the Rust tokenizer
for the whole chunk (C2's last step: a token is trained iff its characters overlap a trained
span of its sample)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from sftdata.render.control import SplitEncoder
from sftdata.render.masks import mask_by_edges, mask_from_offsets
from sftdata.render.samples import EncodedRecord, EncodedSample, RenderedRecord

NORMAL_FORMS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})
"""Normalizers that leave every ASCII text as it is: a Unicode composition or decomposition
always involves a character outside ASCII, and no ASCII character has a compatibility mapping."""


def _normal_forms_only(spec: dict[str, Any]) -> bool:
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_normal_forms_only(x) for x in spec.get("normalizers", []))
    return kind in NORMAL_FORMS


def ascii_twin(backend: Any) -> Any | None:
    """The same tokenizer without its normalizer, for ASCII texts, or None where that is not
    the same tokenizer on every ASCII text.

    Where the normalizer is only Unicode normal forms (Qwen2's NFC), it changes no ASCII text
    and no offset, yet it rebuilds every text's alignments, a measurable share of the Rust
    encode on mostly-ASCII records (benchmarks/README.md, "ASCII twin"). The twin shares
    ``backend``'s model, pre-tokenizer, post-processor and decoder and re-adds its added tokens
    in id order; it is used only where the added tokens came back under the same ids.
    """
    from tokenizers import Tokenizer

    normalizer = backend.normalizer
    if normalizer is None or backend.truncation is not None or backend.padding is not None:
        return None
    try:
        spec = json.loads(normalizer.__getstate__())
    except Exception:  # a custom (Python) normalizer does not serialize: keep the tokenizer
        return None
    if not _normal_forms_only(spec):
        return None
    twin = Tokenizer(backend.model)
    twin.pre_tokenizer = backend.pre_tokenizer
    twin.post_processor = backend.post_processor
    twin.decoder = backend.decoder
    added = backend.get_added_tokens_decoder()
    for i in sorted(added):
        token = added[i]
        (twin.add_special_tokens if token.special else twin.add_tokens)([token])
    return twin if twin.get_added_tokens_decoder() == added else None


def encode_texts(backend: Any, texts: list[str], twin: Any | None) -> list[Any]:
    """``backend.encode_batch(texts)`` without special tokens, the ASCII texts through
    ``twin`` (:func:`ascii_twin`) where there is one: the same encodings, in order."""
    if twin is None:
        return backend.encode_batch(texts, add_special_tokens=False)
    ascii_at: list[int] = []
    others: list[int] = []
    for i, t in enumerate(texts):
        (ascii_at if t.isascii() else others).append(i)
    out: list[Any] = [None] * len(texts)
    for idx, tok in ((ascii_at, twin), (others, backend)):
        encodings = tok.encode_batch([texts[i] for i in idx], add_special_tokens=False)
        for i, enc in zip(idx, encodings, strict=True):
            out[i] = enc
    return out


def encode_renders(
    backend: Any,
    renders: Sequence[RenderedRecord],
    split: SplitEncoder | None,
    *,
    offsets: bool = False,
    twin: Any | None = None,
) -> list[EncodedRecord]:
    """Tokenize every sample of ``renders`` (``backend``: a ``tokenizers.Tokenizer``); with
    ``offsets``, each sample keeps its tokens' character offsets; ``twin``: :func:`ascii_twin`
    of ``backend`` (or None).

    Samples whose record text holds control tokens under ``--special-text split`` (``hidden``
    set) go through ``split`` one by one; the rest through one ``encode_batch`` call. Token
    masks come from ``char_to_token`` at span edges (two lookups per span) rather than
    converting every token's offsets to Python (converting offsets alone costs about a third
    of the batch encode time).
    """
    flat = [s for r in renders for s in r.samples]
    plain = [s.text for s in flat if s.hidden is None]
    encodings = iter(encode_texts(backend, plain, twin))
    it = iter(flat)
    out = []
    for r in renders:
        samples = []
        for _ in r.samples:
            sample = next(it)
            if sample.hidden is not None:
                assert split is not None
                ids, offs = split.encode(sample.hidden)
                mask = mask_from_offsets(offs, sample.spans)
                samples.append(EncodedSample(ids, mask, offs if offsets else None))
                continue
            enc = next(encodings)
            ids = np.array(enc.ids, dtype=np.int32)
            mask = mask_by_edges(enc, len(ids), len(sample.text), sample.spans)
            offs = None
            if mask is None or offsets:
                offs = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
            if mask is None:
                mask = mask_from_offsets(offs, sample.spans)
            samples.append(EncodedSample(ids, mask, offs if offsets else None))
        out.append(EncodedRecord(samples=samples, render=r))
    return out


__all__ = ["ascii_twin", "encode_renders", "encode_texts"]
