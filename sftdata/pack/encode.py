"""Encoding (worker side): canonical JSONL lines -> rendered, masked, tokenized records, one
``encode_batch`` call per chunk, with the zero-trained and overflow policies applied."""

from __future__ import annotations

import gc
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftdata.conversation import Conversation, parse_jsonl_line, read_jsonl
from sftdata.errors import ConversionError, ValidationError
from sftdata.pack.cutoff import cutoff_keep, history_keep
from sftdata.pack.options import PackOptions


@dataclass
class Chunk:
    """One encoded chunk: flat tokens/masks of the kept records and the counts."""

    ids: np.ndarray  # int32, all kept records back to back
    mask: np.ndarray  # bool, same length
    lengths: np.ndarray  # int32 per kept record
    record_ids: list[str]
    owners: np.ndarray  # int64 per kept record: which input record of the chunk it came from
    n_in: int
    zero_trained: int
    overflow: int
    truncated: int
    stats: dict[str, Any] = field(default_factory=dict)
    overflow_tokens: int = 0
    """Tokens of the samples dropped as longer than seq_len."""
    truncated_tokens: int = 0
    """Tokens cut from truncated samples."""
    full_lengths: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    """Length of every sample with a trained token, before any cut (the length percentiles)."""


def renderer_key(opts: PackOptions) -> tuple[Any, ...]:
    """The options a renderer is built from (one renderer per key and process)."""
    return (
        opts.tokenizer, opts.template, opts.train_on, opts.template_date, opts.strict,
        opts.special_text, opts.missing_stop,
    )  # fmt: skip


_STATE: dict[str, Any] = {}  # per process: the renderer for a (tokenizer, template, train_on) key


def get_renderer(opts: PackOptions) -> Any:
    key = renderer_key(opts)
    if _STATE.get("key") != key:
        from sftdata.pack.vet import vet
        from sftdata.render import Renderer
        from sftdata.tokenizer_cache import load_snapshot

        tok = load_snapshot(opts.tokenizer)

        def build() -> Any:
            return Renderer(
                tok, template=opts.template, train_on=opts.train_on,
                template_date=opts.template_date, strict=opts.strict,
                special_text=opts.special_text, missing_stop=opts.missing_stop,
            )  # fmt: skip

        vet(opts, build, key)  # a user's tokenizer and template run under the OS bounds first
        _STATE["tok"] = tok
        _STATE["renderer"] = build()
        _STATE["key"] = key
    return _STATE["renderer"]


def loaded_tokenizer() -> Any:
    """The tokenizer :func:`get_renderer` loaded last in this process."""
    return _STATE["tok"]


def init_worker(opts: PackOptions) -> None:
    # Pool.terminate() stops workers with SIGTERM: they must die at once, not unwind through the
    # CLI's handler (clickutil) inherited by fork, which can leave the pool's queue lock held.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Under fork the parent's renderer is inherited and reused; under spawn it is built here.
    get_renderer(opts)
    # A chunk's records are thousands of small acyclic dicts and lists: with the default
    # threshold the cyclic collector runs every 700 allocations and rescans them each time
    # (profiled: a tenth of a worker's Python time). Collect every 50,000 instead; what the worker
    # inherited or loaded is frozen out of the scans.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@dataclass
class _EncodedChunk:
    """One chunk rendered and tokenized, before any policy: every sample's tokens back to back."""

    ids: np.ndarray
    mask: np.ndarray
    lens: np.ndarray
    """Tokens of each sample (int64)."""
    starts: np.ndarray
    """Where each sample starts in ``ids``."""
    sample_ids: list[str]
    owners: list[Conversation]
    """The record each sample came from."""
    owner_at: np.ndarray
    """Its index in the chunk."""
    n_in: int
    stats: dict[str, Any]

    def trained(self, upto: np.ndarray) -> np.ndarray:
        """Trained tokens among 1..upto-1 of each sample: the first token's label is always
        ignored once packed, so it never counts."""
        csum = self._csum
        return csum[self.starts + upto] - csum[np.minimum(self.starts + 1, self.starts + upto)]

    def __post_init__(self) -> None:
        self._csum = np.zeros(len(self.mask) + 1, dtype=np.int64)
        np.cumsum(self.mask, out=self._csum[1:])


def _encode(convs: Sequence[Conversation], opts: PackOptions) -> _EncodedChunk:
    """Render and tokenize one chunk with one ``encode_batch`` call (vectorised over the chunk:
    a per-record Python loop showed in the pack profile)."""
    records = get_renderer(opts).encode_batch(convs, skip_invalid=opts.skip_invalid)
    encoded = [s for r in records for s in r.samples]
    n = len(encoded)
    lens = np.fromiter((len(e.input_ids) for e in encoded), dtype=np.int64, count=n)
    starts = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(lens[:-1], out=starts[1:])
    return _EncodedChunk(
        ids=np.concatenate([e.input_ids for e in encoded] or [np.empty(0, np.int32)]).astype(
            np.int32, copy=False
        ),
        mask=np.concatenate([e.train_mask for e in encoded] or [np.empty(0, bool)]).astype(
            bool, copy=False
        ),
        lens=lens,
        starts=starts,
        sample_ids=[
            c.id if k == 0 else f"{c.id}#turn{k}"
            for c, r in zip(convs, records, strict=True)
            for k in range(len(r.samples))
        ],
        owners=[c for c, r in zip(convs, records, strict=True) for _ in r.samples],
        owner_at=np.fromiter(
            (k for k, r in enumerate(records) for _ in r.samples), dtype=np.int64, count=n
        ),
        n_in=len(records),
        stats=render_stats(records),
    )


def encode_chunk(
    convs: Sequence[Conversation], opts: PackOptions, *, keep_zero_trained: bool = False
) -> Chunk:
    """Encode one chunk and apply the drop/overflow policies (``keep_zero_trained``: keep the
    samples nothing is trained in, as ``stats`` counts them)."""
    enc = _encode(convs, opts)
    n, lens, starts, ids, mask = len(enc.lens), enc.lens, enc.starts, enc.ids, enc.mask
    convs = enc.owners  # the record of each sample
    if n == 0:
        return Chunk(
            ids=np.empty(0, np.int32), mask=np.empty(0, bool), lengths=np.empty(0, np.int32),
            record_ids=[], owners=np.empty(0, np.int64), n_in=enc.n_in, zero_trained=0,
            overflow=0, truncated=0, stats=enc.stats,
        )  # fmt: skip
    trained = enc.trained
    seq_len = opts.seq_len
    zero = np.zeros(n, bool) if keep_zero_trained else trained(lens) == 0
    over = (lens > seq_len) & ~zero
    if over.any() and opts.overflow == "error":
        i = int(np.flatnonzero(over)[0])
        raise ValidationError(
            f"{convs[i].source}: record {convs[i].id!r} has {int(lens[i])} tokens, more than "
            f"--seq-len {seq_len} (--overflow error; use drop, truncate or cutoff)"
        )
    new_lens = np.minimum(lens, seq_len)
    cuts: dict[int, np.ndarray] = {}
    if opts.overflow == "cutoff":
        for i in np.flatnonzero(over).tolist():
            own = slice(starts[i], starts[i] + lens[i])
            cuts[i] = _cutoff(get_renderer(opts), convs[i], ids[own], mask[own], opts)
            new_lens[i] = int(cuts[i].sum())
    if opts.overflow in ("truncate", "cutoff"):
        kept_trained = trained(new_lens)
        for i, k in cuts.items():
            kept_trained[i] = int(mask[starts[i] : starts[i] + lens[i]][k][1:].sum())
        cut_zero = over & (kept_trained == 0)
        keep = ~zero & ~cut_zero
        n_zero, n_over, n_trunc = int(zero.sum() + cut_zero.sum()), 0, int((over & keep).sum())
        over_tokens, cut_tokens = 0, int((lens - new_lens)[over & keep].sum())
    else:
        keep = ~zero & ~over
        n_zero, n_over, n_trunc = int(zero.sum()), int(over.sum()), 0
        over_tokens, cut_tokens = int(lens[over].sum()), 0
    if keep.all() and not over.any():  # the usual chunk: every token is kept
        kept_ids, kept_mask = ids, mask
    else:
        rec_of_token = np.repeat(np.arange(n), lens)
        pos = np.arange(len(ids), dtype=np.int64) - starts[rec_of_token]
        tok_keep = keep[rec_of_token] & (pos < seq_len)
        for i, k in cuts.items():
            tok_keep[starts[i] : starts[i] + lens[i]] = k & keep[i]
        kept_ids, kept_mask = ids[tok_keep], mask[tok_keep]
    return Chunk(
        ids=kept_ids,
        mask=kept_mask,
        lengths=new_lens[keep].astype(np.int32),
        record_ids=[c for c, k in zip(enc.sample_ids, keep.tolist(), strict=True) if k],
        owners=enc.owner_at[keep],
        n_in=enc.n_in,
        zero_trained=n_zero,
        overflow=n_over,
        truncated=n_trunc,
        stats=enc.stats,
        overflow_tokens=over_tokens,
        truncated_tokens=cut_tokens,
        full_lengths=lens[~zero].astype(np.int32),
    )


def _cutoff(
    renderer: Any, conv: Conversation, ids: np.ndarray, mask: np.ndarray, opts: PackOptions
) -> np.ndarray:
    """Which tokens of one over-long sample ``--overflow cutoff`` keeps. Under
    ``last-assistant`` (LLaMA-Factory's ``mask_history``) the pairs are those of every reply,
    read off the same record rendered with every reply trained (the same text, so the same
    ids); a sample that render does not give as is (a re-rendered history turn) is cut by the
    forward rule."""
    if opts.train_on == "last-assistant":
        every = renderer.with_train_on("all-assistant").encode(conv)
        for sample in every.samples:
            if len(sample.input_ids) == len(ids) and np.array_equal(sample.input_ids, ids):
                return history_keep(sample.train_mask, opts.seq_len)
    return cutoff_keep(mask, opts.seq_len)


REFUSAL_EXAMPLES = 20
"""Refused records listed by name in the pack summary and index (the rest are counted)."""


def render_stats(records: Sequence[Any]) -> dict[str, Any]:
    """Fold-ins, refusals, split turns, fallbacks, stop-less turns and appended stops of
    encoded records."""
    folds: dict[str, int] = {}
    refused: dict[str, int] = {}
    examples: list[str] = []
    split = fallback = no_stop = appended = 0
    for r in records:
        rr = r.render
        for kind in rr.fold_ins:
            folds[kind] = folds.get(kind, 0) + 1
        if rr.refusal is not None:
            refused[rr.reason] = refused.get(rr.reason, 0) + 1
            if len(examples) < REFUSAL_EXAMPLES:
                examples.append(rr.refusal)
        split += rr.split_turns
        fallback += int(rr.fallback)
        no_stop += rr.no_stop
        appended += rr.appended
    return {
        "fold_ins": folds,
        "refused": refused,
        "examples": examples,
        "split_turns": split,
        "fallback": fallback,
        "no_stop": no_stop,
        "appended_stops": appended,
    }


def merge_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key in ("fold_ins", "refused"):
        for k, v in part.get(key, {}).items():
            total[key][k] = total[key].get(k, 0) + v
    room = REFUSAL_EXAMPLES - len(total["examples"])
    total["examples"].extend(part.get("examples", [])[:room])
    for key in ("split_turns", "fallback", "no_stop", "appended_stops"):
        total[key] += part.get(key, 0)


def read_chunks(inputs: Sequence[Path], size: int) -> Iterator[list[Conversation]]:
    """Canonical records of ``inputs`` in order, in lists of ``size``."""
    chunk: list[Conversation] = []
    for path in inputs:
        for conv in read_jsonl(path):
            chunk.append(conv)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class RawChunk:
    """Up to ``chunk_size`` raw lines of one input file, parsed where they are encoded."""

    path: str
    first_line: int
    data: bytes


def read_raw_chunks(
    inputs: Sequence[Path], size: int, *, limit: int | None = None
) -> Iterator[RawChunk]:
    """Raw line blocks of ``inputs`` in order, at most ``limit`` records in all (``--max-samples``,
    blank lines not counted): the main process only splits lines, so JSON parsing happens in the
    workers (it is a noticeable share of a single-process pack)."""
    taken = 0
    for path in inputs:
        try:
            f = path.open("rb")
        except OSError as e:
            raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
        with f:
            first, lines = 1, []
            for lineno, line in enumerate(f, start=1):
                if limit is not None and line.strip():
                    if taken == limit:
                        break
                    taken += 1
                lines.append(line)
                if len(lines) == size:
                    yield RawChunk(str(path), first, b"".join(lines))
                    first, lines = lineno + 1, []
            if lines:
                yield RawChunk(str(path), first, b"".join(lines))
        if limit is not None and taken == limit:
            return


def parse_chunk(chunk: RawChunk) -> list[Conversation]:
    """Canonical records of a raw block, with ``read_jsonl``'s ``path:line`` errors."""
    out = []
    for lineno, raw in enumerate(chunk.data.splitlines(), start=chunk.first_line):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConversionError(f"{chunk.path}:{lineno}: not valid UTF-8 text") from None
        if line.strip():
            out.append(parse_jsonl_line(line, path=chunk.path, lineno=lineno))
    return out


def encode_raw(chunk: RawChunk, opts: PackOptions, keep_zero_trained: bool = False) -> Chunk:
    return encode_chunk(parse_chunk(chunk), opts, keep_zero_trained=keep_zero_trained)
