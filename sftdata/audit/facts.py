"""What the audit keeps of each record (worker side): rendered and tokenized by the pack's
renderer, trained spans derived again by the second renderer (``sftdata.audit.oracle``), content
flags, an exact-duplicate key, a MinHash signature and the record's word n-gram hashes. The main
process only aggregates these (``sftdata.audit.checks``)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from sftdata.conversation import Conversation

NUM_PERM = 128
"""MinHash permutations (the signature's length): Jaccard estimates within about ±0.09."""
SHINGLE = 3
"""Words per MinHash shingle."""
SCHEME = "affine64"
"""datasketch's MinHash permutation scheme, named so signatures made in the workers and read back
in the main process agree (datasketch 2 asks for it)."""
NGRAM = 13
"""Words per contamination n-gram (the usual decontamination length, after GPT-3)."""

WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+")
"""A word: a run of letters/digits, or one CJK character (those scripts write no spaces)."""
REFUSAL = re.compile(
    r"^\s*(i'?m sorry,? but (i|as)|i (cannot|can't|am unable to|won't) (help|assist|provide|"
    r"comply|do that|fulfil)|as an ai( language model)?,? i|i apologi[sz]e,? but i (cannot|can't)|"
    r"抱歉，?我(无法|不能)|作为一个?(人工智能|ai)|对不起，?我(无法|不能))",
    re.IGNORECASE,
)
"""Refusal boilerplate at the start of a reply (English and Chinese phrasings)."""
SCRIPTS = (
    ("cjk", re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]")),
    ("cyrillic", re.compile(r"[\u0400-\u04ff]")),
    ("arabic", re.compile(r"[\u0600-\u06ff]")),
    ("latin", re.compile(r"[A-Za-z\u00c0-\u024f]")),
)


@dataclass
class Facts:
    """One record as the audit sees it."""

    id: str
    where: str
    """Where the record came from (its source: the raw file and line ``convert`` read)."""
    file: str
    """The canonical JSONL file it is in."""
    line: int
    """Its line there."""
    split: str
    """``train``, or ``validation`` for a record of ``--validation``."""
    tokens: int = 0
    """Tokens of its longest sample."""
    total: int = 0
    """Tokens of all its samples."""
    trained: int = 0
    """Trained tokens of all its samples."""
    refusal: str | None = None
    """Why pack would refuse it (one line), or None."""
    reason: str | None = None
    """The refusal's kind (``sftdata.render.REFUSALS``)."""
    fold_ins: tuple[str, ...] = ()
    appended: int = 0
    """Replies after which pack inserts the stop token (the template writes none)."""
    no_stop: int = 0
    """Trained replies left without a stop token (``--missing-stop allow``)."""
    mismatch: str | None = None
    """How the second renderer's trained tokens differ, or None (also None: not checked)."""
    checked: bool = False
    """The second renderer looked at it."""
    flags: tuple[str, ...] = ()
    """Content checks it trips (``empty_reply``, ``echo_reply``, ``refusal_reply``)."""
    script: str = ""
    """The script most of its replies' letters are written in ("" none)."""
    key: bytes = b""
    """Exact-duplicate key: a hash of its messages' normalised text."""
    minhash: Any = None
    """uint64[NUM_PERM] MinHash signature of its word shingles (None: not computed)."""
    ngrams: Any = None
    """uint64 hashes of its word n-grams (None: not computed)."""


def normalise(text: str) -> str:
    """Case-folded, NFKC, whitespace collapsed: what "the same text" means for duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def words(text: str) -> list[str]:
    """The words of ``text`` after :func:`normalise`."""
    return WORDS.findall(normalise(text))


_WORD_HASH: dict[str, int] = {}
"""Per process: each word's hash, computed once (a data set's words repeat from record to record)."""


def _word_hash(w: str) -> int:
    h = _WORD_HASH.get(w)
    if h is None:
        if len(_WORD_HASH) >= 1 << 20:  # bounded: a memo, not a vocabulary
            _WORD_HASH.clear()
        h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        _WORD_HASH[w] = h
    return h


def _word_hashes(ws: list[str]) -> np.ndarray:
    return np.fromiter(map(_word_hash, ws), dtype=np.uint64, count=len(ws))


_MIX = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """uint64 hashes of the word ``n``-grams of ``text`` (stable across processes and runs; a
    text of fewer than ``n`` words gives one hash of all its words, or none if it has none)."""
    return _ngrams(_word_hashes(words(text)), n)


def _ngrams(h: np.ndarray, n: int) -> np.ndarray:
    if len(h) == 0:
        return h
    if len(h) < n:
        n = len(h)
    out = np.zeros(len(h) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        for j in range(n):
            out = out * _MIX + h[j : len(h) - n + 1 + j]
    return out


SCRIPT_SAMPLE = 400
"""Characters of a record's replies whose letters decide its script."""


def script_of(text: str) -> str:
    """The script most letters of ``text`` (its first :data:`SCRIPT_SAMPLE` characters) are
    written in ("" when it has none)."""
    text = text[:SCRIPT_SAMPLE]
    counts = [(len(rx.findall(text)), name) for name, rx in SCRIPTS]
    best = max(counts)
    return best[1] if best[0] else ""


def content_flags(conv: Conversation, norms: list[str] | None = None) -> tuple[str, ...]:
    """The content checks a record trips, each once (``norms``: its messages' :func:`normalise`
    where already computed)."""
    norms = norms if norms is not None else [normalise(m.content) for m in conv.messages]
    flags: set[str] = set()
    prompt = ""
    for m, norm in zip(conv.messages, norms, strict=True):
        if m.role == "user":
            prompt = norm
        if m.role != "assistant" or not m.trained:
            continue
        if not norm and not m.tool_calls:
            flags.add("empty_reply")
        elif norm and norm == prompt:
            flags.add("echo_reply")
        if REFUSAL.match(m.content or ""):
            flags.add("refusal_reply")
    return tuple(sorted(flags))


def text_facts(conv: Conversation, facts: Facts, *, minhash: bool, ngrams: bool) -> None:
    """The text-only facts of ``conv``: content flags, script, exact key, MinHash, n-grams."""
    norms = [normalise(m.content) for m in conv.messages]
    facts.flags = content_flags(conv, norms)
    facts.script = script_of(" ".join(m.content for m in conv.messages if m.role == "assistant"))
    key = "\x1e".join(f"{m.role}\x1f{n}" for m, n in zip(conv.messages, norms, strict=True))
    facts.key = hashlib.blake2b(key.encode(), digest_size=16).digest()
    if not (minhash or ngrams):
        return
    hashes = [_word_hashes(WORDS.findall(n)) for n in norms]
    if minhash:
        # word 3-shingles hashed from each word's hash (one blake2b per distinct word, not per
        # shingle), handed to datasketch as they are (identity hash), permutations made once
        mh = _minhash()
        mh.update_batch(np.unique(_ngrams(np.concatenate(hashes), SHINGLE)).tolist())
        facts.minhash = mh.hashvalues.astype(np.uint64)
    if ngrams:
        parts = [_ngrams(h, NGRAM) for h, m in zip(hashes, conv.messages, strict=True)
                 if m.role in ("user", "assistant") and len(h)]  # fmt: skip
        facts.ngrams = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)


_PERMUTATIONS: list[Any] = []


def _identity(x: int) -> int:
    return x


def _minhash() -> Any:
    """An empty MinHash whose permutations are computed once per process."""
    from datasketch import MinHash

    if not _PERMUTATIONS:
        _PERMUTATIONS.append(MinHash(num_perm=NUM_PERM, seed=1, scheme=SCHEME).permutations)
    return MinHash(
        num_perm=NUM_PERM, seed=1, hashfunc=_identity, permutations=_PERMUTATIONS[0], scheme=SCHEME
    )


__all__ = [
    "NGRAM",
    "NUM_PERM",
    "SCHEME",
    "Facts",
    "content_flags",
    "ngram_hashes",
    "normalise",
    "script_of",
    "text_facts",
    "words",
]
