"""What the audit keeps of each record (worker side): rendered and tokenized by the pack's
renderer, trained spans derived again by the second renderer (``sftdata.audit.oracle``), content
flags, an exact-duplicate key, a MinHash signature and the record's word n-gram hashes. The main
process only aggregates these (``sftdata.audit.checks``)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
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
    try:  # no Python frame per word: most words are known
        return np.fromiter(map(_WORD_HASH.get, ws), dtype=np.uint64, count=len(ws))
    except TypeError:  # a word this process has not hashed yet (None)
        return np.fromiter(map(_word_hash, ws), dtype=np.uint64, count=len(ws))


_MIX = np.uint64(0x9E3779B97F4A7C15)
_UNMIX = np.uint64(pow(0x9E3779B97F4A7C15, -1, 1 << 64))
"""The inverse of :data:`_MIX` modulo 2**64 (it is odd)."""
_POWERS: list[np.ndarray] = [np.ones(1, np.uint64), np.ones(1, np.uint64)]
"""``_MIX**k`` and ``_UNMIX**k`` for k = 0, 1, ..., grown as needed."""


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_POWERS[0]) < n:
        k = np.arange(max(n, 2 * len(_POWERS[0])))
        with np.errstate(over="ignore"):
            _POWERS[0] = np.cumprod(np.where(k > 0, _MIX, np.uint64(1)), dtype=np.uint64)
            _POWERS[1] = np.cumprod(np.where(k > 0, _UNMIX, np.uint64(1)), dtype=np.uint64)
    return _POWERS[0][:n], _POWERS[1][:n]


def ngram_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """uint64 hashes of the word ``n``-grams of ``text`` (stable across processes and runs; a
    text of fewer than ``n`` words gives one hash of all its words, or none if it has none)."""
    return _ngrams(_word_hashes(words(text)), n)


def _ngrams(h: np.ndarray, n: int) -> np.ndarray:
    return _grams(h, np.array([0]), np.array([len(h)]), n)[0]


def _grams(
    h: np.ndarray, starts: np.ndarray, ends: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n``-gram hashes of each segment ``h[starts[k]:ends[k]]`` of word hashes (a segment
    of fewer than ``n`` words gives one hash of all its words, an empty one none), and the
    segment each belongs to, for all segments at once."""
    lengths = ends - starts
    counts = np.where(lengths >= n, lengths - n + 1, (lengths > 0).astype(lengths.dtype))
    seg = np.repeat(np.arange(len(starts)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    j = starts[seg] + np.arange(len(seg)) - first
    end = j + np.minimum(lengths[seg], n)
    # The gram over h[j:end] is sum_i h[j+i] * MIX**(end-j-1-i) (mod 2**64), from one prefix sum
    # S of h[k] * UNMIX**k: (S[end] - S[j]) * MIX**(end-1). A few array operations whatever n is.
    mix, unmix = _powers(len(h) + 1)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        s = np.concatenate(([np.uint64(0)], np.cumsum(h * unmix[: len(h)], dtype=np.uint64)))
        return (s[end] - s[j]) * mix[end - 1], seg


def _split(values: np.ndarray, owner: np.ndarray, parts: int) -> list[np.ndarray]:
    """``values`` grouped by ``owner`` (non-decreasing) into ``parts`` arrays."""
    if not parts:
        return []
    return np.split(values, np.cumsum(np.bincount(owner, minlength=parts))[:-1])


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


def text_facts(
    convs: Sequence[Conversation], facts: Sequence[Facts], *, ngrams: bool
) -> list[np.ndarray]:
    """The text-only facts of a task's records (content flags, script, exact key; n-grams when
    asked), and each record's word shingle hashes, which :func:`signatures` turns into its
    MinHash. Words are hashed and shingled for all the records at once."""
    words_of: list[str] = []
    counts: list[int] = []  # words per message, every record's messages in turn
    for conv, f in zip(convs, facts, strict=True):
        norms = [normalise(m.content) for m in conv.messages]
        f.flags = content_flags(conv, norms)
        f.script = script_of(" ".join(m.content for m in conv.messages if m.role == "assistant"))
        key = "\x1e".join(f"{m.role}\x1f{n}" for m, n in zip(conv.messages, norms, strict=True))
        f.key = hashlib.blake2b(key.encode(), digest_size=16).digest()
        for n in norms:
            found = WORDS.findall(n)
            words_of += found
            counts.append(len(found))
    # one blake2b per distinct word, not per shingle
    h = _word_hashes(words_of)
    sizes = np.array(counts, dtype=np.int64)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    owner = np.repeat(np.arange(len(convs)), [len(c.messages) for c in convs])
    per_record = np.bincount(owner, weights=sizes, minlength=len(convs)).astype(np.int64)
    shingles, seg = _grams(h, np.cumsum(per_record) - per_record, np.cumsum(per_record), SHINGLE)
    if ngrams:
        prose = np.array([m.role in ("user", "assistant") for c in convs for m in c.messages], bool)
        grams, seg_n = _grams(h, starts[prose], ends[prose], NGRAM)
        rec = owner[prose][seg_n]
        order = np.lexsort((grams, rec))  # each record's n-grams sorted, then each once
        grams, rec = grams[order], rec[order]
        once = np.ones(len(grams), dtype=bool)
        once[1:] = (grams[1:] != grams[:-1]) | (rec[1:] != rec[:-1])
        for f, g in zip(facts, _split(grams[once], rec[once], len(convs)), strict=True):
            f.ngrams = g
    return _split(shingles, seg, len(convs))


BLOCK = 1024
"""Shingles permuted at once by :func:`signatures`, however long one record is: a block's work
array (BLOCK x NUM_PERM uint64s, 1 MiB) stays in the CPU's cache, which makes it several times
faster than blocks of 16k shingles (benchmarks/README, "sftdata audit")."""
_FMIX = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
_PERMUTATIONS: list[Any] = []


def _permutations() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """datasketch's permutations (a, b) for :data:`NUM_PERM`, seed 1 and :data:`SCHEME`, and an
    empty set's signature, made once per process."""
    from datasketch import MinHash

    if not _PERMUTATIONS:
        mh = MinHash(num_perm=NUM_PERM, seed=1, scheme=SCHEME)
        a, b = mh.permutations
        empty = mh.hashvalues.astype(np.uint64)  # a copy, in the signatures' dtype
        _PERMUTATIONS.append((a.astype(np.uint64), b.astype(np.uint64), empty))
    return _PERMUTATIONS[0]


def signatures(shingles: list[np.ndarray]) -> np.ndarray:
    """uint64[len(shingles), NUM_PERM]: each shingle set's MinHash signature, as datasketch's
    ``MinHash(num_perm=NUM_PERM, seed=1, scheme=SCHEME, hashfunc=identity).update_batch``
    computes it (MurmurHash3's 64-bit finaliser, then ``a * h + b`` modulo 2**64 per
    permutation, the minimum over the set), for a whole task in blocks rather than one MinHash
    object per record (the tests check the two agree)."""
    a, b, empty = _permutations()
    sig = np.tile(empty, (len(shingles), 1))
    lens = np.fromiter(map(len, shingles), dtype=np.int64, count=len(shingles))
    if not lens.sum():
        return sig
    h = np.concatenate(shingles).astype(np.uint64, copy=False)
    shift, m1, m2 = _FMIX
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        h = h ^ (h >> shift)
        h = h * m1
        h = h ^ (h >> shift)
        h = h * m2
        h = h ^ (h >> shift)
        starts = np.cumsum(lens) - lens
        owner = np.repeat(np.arange(len(shingles)), lens)
        for lo in range(0, len(h), BLOCK):
            hi = min(lo + BLOCK, len(h))
            # the pieces of records in this block: each record's first row here
            cuts = np.unique(np.concatenate(([lo], starts[(starts > lo) & (starts < hi)])))
            mins = np.minimum.reduceat(h[lo:hi, None] * a + b, cuts - lo, axis=0)
            np.minimum.at(sig, owner[cuts], mins)
    return sig


__all__ = [
    "NGRAM",
    "NUM_PERM",
    "SCHEME",
    "Facts",
    "content_flags",
    "ngram_hashes",
    "normalise",
    "script_of",
    "signatures",
    "text_facts",
    "words",
]
