"""The pipeline behind ``sftdata pack``: canonical JSONL -> encoded records -> packed shards.

Stages, each streaming so memory stays flat in the number of records:

1. read canonical JSONL (``read_jsonl``) in chunks of ``chunk_size`` records;
2. encode each chunk with ONE ``Renderer.encode_batch`` call, in ``num_proc`` worker processes
   (results consumed in submission order, so the output never depends on ``num_proc``);
   apply the zero-trained and overflow policies there;
3. spill tokens and masks to flat files inside the work folder (only lengths and ids stay in
   memory: packing needs nothing else);
4. pick the validation split, pack each split (best-fit decreasing over the whole split),
   shuffle rows by ``seed``; the same workers then each gather a shard's rows from the spill
   and write that shard file (shards are independent; the index lists them in order);
5. write ``index.json`` last and atomically, then move the work folder into place.

Measured on 49,950 Alpaca records (9.99M Llama-2 tokens, seq_len 4096, 2 quiet cores, num_proc
2, tokenizer snapshot cached): 0.3 s start-up, 6.0 s encoding (the workers' ~11.5 CPU-s, of which
the Rust ``encode_batch`` is 9.5), 0.1 s packing, 0.45 s writing: 6.9 s, where the raw batch
tokenizer alone takes 5.6 s on the same rendered texts with its own 2 threads
(benchmarks/README.md).

All work happens in ``.<name>.partial`` beside the output folder; the output is only replaced
once everything succeeded, so an interrupted or failed pack leaves no ``index.json`` anywhere
(and a previous good output intact). A rerun clears a stale work folder and starts again.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import __version__
from sftdata.atomic import exclusive, replace_dir
from sftdata.conversation import Conversation, parse_jsonl_line, read_jsonl
from sftdata.errors import ConfigError, ConversionError, ShardError, ValidationError
from sftdata.inputs import refuse_overwriting, shown
from sftdata.pack import build_row, efficiency, pack_rows
from sftdata.render import TRAIN_ON
from sftdata.shards import INDEX_NAME, KIND, ShardReader, ShardWriter, write_index
from sftdata.templates import DEFAULT_TEMPLATE_DATE

OVERFLOW = ("drop", "truncate", "error")
MARKER = ".sftdata-pack"
SPILL_IDS, SPILL_MASK = ".spill-ids.bin", ".spill-mask.bin"
SHARD_BYTES = 64 << 20
"""Auto shard size: about this many bytes per shard file (3 int32 columns x seq_len per row)."""

Progress = Callable[[str, int, int | None], None]
"""``progress(stage, done, total)``: stage is "encode" (records) or "write" (rows)."""


@dataclass(frozen=True)
class PackOptions:
    """Everything that decides the bytes of the shards (plus ``num_proc``, which never does)."""

    seq_len: int
    """Row length in tokens."""
    tokenizer: str
    """``"tiny"``, a local HF tokenizer folder or a SentencePiece ``.model`` file."""
    template: str = "auto"
    """Chat template: auto, a built-in name (chatml, qwen2.5, llama3, ...), a LLaMA-Factory name, fastchat:NAME or a .jinja file."""
    train_on: str = "all-assistant"
    """Which turns are trained when a message carries no ``train`` flag."""
    overflow: str = "drop"
    """Records longer than seq_len: drop (counted), truncate (keep the first seq_len), error."""
    pack: bool = True
    """False: one record per row, padded (``--no-pack``)."""
    val_fraction: float | None = None
    """Fraction of kept records held out as the ``validation`` split."""
    val_count: int | None = None
    """Number of kept records held out as the ``validation`` split."""
    seed: int = 0
    """Seed of the validation pick and of the row shuffle."""
    shard_size: int | None = None
    """Rows per shard file; None: about 64 MB per file."""
    num_proc: int = 1
    """Encoding worker processes (does not change the output)."""
    chunk_size: int = 2000
    """Records per encode_batch call (does not change the output)."""
    template_date: str = DEFAULT_TEMPLATE_DATE
    """The date templates see (``strftime_now``, ``date_string``), pinned for reproducibility."""
    strict: bool = False
    """Refuse records that need a documented fold-in instead of folding them in."""
    skip_invalid: bool = False
    """Skip and count records the template cannot render (else the first one stops the pack)."""
    allow_long: bool = False
    """Allow a seq_len past the tokenizer's ``model_max_length`` / the model's positions."""

    def resolved_shard_size(self) -> int:
        """Rows per shard file after applying the automatic default."""
        if self.shard_size is not None:
            return self.shard_size
        return max(1, SHARD_BYTES // (12 * self.seq_len))

    def output_options(self) -> dict[str, Any]:
        """The options recorded in the index and fingerprinted (those that change the bytes)."""
        return {
            "train_on": self.train_on,
            "overflow": self.overflow,
            "pack": self.pack,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "val_count": self.val_count,
            "shard_size": self.resolved_shard_size(),
            "template_date": self.template_date,
            "strict": self.strict,
            "skip_invalid": self.skip_invalid,
        }


@dataclass
class PackReport:
    """What a pack did (or found already done)."""

    output: Path
    noop: bool
    records_in: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"zero_trained": 0, "overflow": 0})
    truncated: int = 0
    records: int = 0
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    packing_efficiency: float = 0.0
    splits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    fold_ins: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    refusal_examples: list[str] = field(default_factory=list)
    split_turns: int = 0
    fallback: int = 0
    no_stop: int = 0

    @classmethod
    def from_index(
        cls, output: Path, index: dict[str, Any], *, noop: bool, seconds: float
    ) -> PackReport:
        """The report of a pack whose ``index.json`` is ``index`` (a fresh or a no-op run)."""
        c = index["counts"]
        return cls(
            output=output,
            noop=noop,
            records_in=c["records_in"],
            dropped=dict(c["dropped"]),
            truncated=c["truncated"],
            records=c["records"],
            rows=c["rows"],
            tokens=c["tokens"],
            trained_tokens=c["trained_tokens"],
            packing_efficiency=c["packing_efficiency"],
            splits={k: v["rows"] for k, v in index["splits"].items()},
            seconds=seconds,
            fold_ins=dict(c.get("fold_ins", {})),
            refused=dict(c.get("refused", {})),
            refusal_examples=list(index.get("refusal_examples", [])),
            split_turns=c.get("split_turns", 0),
            fallback=c.get("fallback", 0),
            no_stop=c.get("no_stop", 0),
        )


# ------------------------------------------------------------------ encoding (worker side)


@dataclass
class _Chunk:
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


_STATE: dict[str, Any] = {}  # per process: the renderer for a (tokenizer, template, train_on) key


def _renderer_key(opts: PackOptions) -> tuple[Any, ...]:
    return (opts.tokenizer, opts.template, opts.train_on, opts.template_date, opts.strict)


def _get_renderer(opts: PackOptions) -> Any:
    key = _renderer_key(opts)
    if _STATE.get("key") != key:
        from sftdata.render import Renderer
        from sftdata.tokenizer import load_snapshot

        tok = load_snapshot(opts.tokenizer)
        _STATE["tok"] = tok
        _STATE["renderer"] = Renderer(
            tok,
            template=opts.template,
            train_on=opts.train_on,
            template_date=opts.template_date,
            strict=opts.strict,
        )
        _STATE["key"] = key
    return _STATE["renderer"]


def _init_worker(opts: PackOptions) -> None:
    # Pool.terminate() stops workers with SIGTERM: they must die at once, not unwind through the
    # CLI's handler (clickutil) inherited by fork, which can leave the pool's queue lock held.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Under fork the parent's renderer is inherited and reused; under spawn it is built here.
    _get_renderer(opts)
    # A chunk's records are thousands of small acyclic dicts and lists: with the default
    # threshold the cyclic collector runs every 700 allocations and rescans them each time
    # (profiled: ~10% of a worker's Python time). Collect every 50,000 instead; what the worker
    # inherited or loaded is frozen out of the scans.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def encode_chunk(
    convs: Sequence[Conversation], opts: PackOptions, *, keep_zero_trained: bool = False
) -> _Chunk:
    """Encode one chunk with one ``encode_batch`` call and apply the drop/overflow policies."""
    renderer = _get_renderer(opts)
    records = renderer.encode_batch(convs, skip_invalid=opts.skip_invalid)
    stats = render_stats(records)
    encoded = [s for r in records for s in r.samples]
    owners = [c for c, r in zip(convs, records, strict=True) for _ in r.samples]
    owner_at = np.fromiter(
        (k for k, r in enumerate(records) for _ in r.samples), dtype=np.int64, count=len(owners)
    )
    sample_ids = [
        c.id if k == 0 else f"{c.id}#turn{k}"
        for c, r in zip(convs, records, strict=True)
        for k in range(len(r.samples))
    ]
    convs = owners
    n = len(encoded)
    if n == 0:
        return _Chunk(
            np.empty(0, np.int32), np.empty(0, bool), np.empty(0, np.int32), [],
            np.empty(0, np.int64), len(records), 0, 0, 0, stats,
        )  # fmt: skip
    # Vectorised over the chunk (a per-record Python loop was ~4% of a pack, measured).
    lens = np.fromiter((len(e.input_ids) for e in encoded), dtype=np.int64, count=n)
    ids = np.concatenate([e.input_ids for e in encoded]).astype(np.int32, copy=False)
    mask = np.concatenate([e.train_mask for e in encoded]).astype(bool, copy=False)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    csum = np.zeros(len(mask) + 1, dtype=np.int64)
    np.cumsum(mask, out=csum[1:])

    def trained(upto: np.ndarray) -> np.ndarray:
        # Trained tokens among 1..upto-1 of each record: the first token's label is always
        # ignored once packed, so it never counts.
        return csum[starts + upto] - csum[np.minimum(starts + 1, starts + upto)]

    seq_len = opts.seq_len
    zero = np.zeros(n, bool) if keep_zero_trained else trained(lens) == 0
    over = (lens > seq_len) & ~zero
    if over.any() and opts.overflow == "error":
        i = int(np.flatnonzero(over)[0])
        raise ValidationError(
            f"{convs[i].source}: record {convs[i].id!r} has {int(lens[i])} tokens, more than "
            f"--seq-len {seq_len} (--overflow error; use drop or truncate)"
        )
    if opts.overflow == "truncate":
        cut_zero = over & (trained(np.minimum(lens, seq_len)) == 0)
        keep = ~zero & ~cut_zero
        n_zero, n_over, n_trunc = int(zero.sum() + cut_zero.sum()), 0, int((over & keep).sum())
    else:
        keep = ~zero & ~over
        n_zero, n_over, n_trunc = int(zero.sum()), int(over.sum()), 0
    if keep.all() and not over.any():  # the usual chunk: every token is kept
        kept_ids, kept_mask = ids, mask
    else:
        rec_of_token = np.repeat(np.arange(n), lens)
        pos = np.arange(len(ids), dtype=np.int64) - starts[rec_of_token]
        tok_keep = keep[rec_of_token] & (pos < seq_len)
        kept_ids, kept_mask = ids[tok_keep], mask[tok_keep]
    return _Chunk(
        ids=kept_ids,
        mask=kept_mask,
        lengths=np.minimum(lens, seq_len)[keep].astype(np.int32),
        record_ids=[c for c, k in zip(sample_ids, keep.tolist(), strict=True) if k],
        owners=owner_at[keep],
        n_in=len(records),
        zero_trained=n_zero,
        overflow=n_over,
        truncated=n_trunc,
        stats=stats,
    )


REFUSAL_EXAMPLES = 20
"""Refused records listed by name in the pack summary and index (the rest are counted)."""


def render_stats(records: Sequence[Any]) -> dict[str, Any]:
    """Fold-ins, refusals, split turns, fallbacks and stop-less turns of encoded records."""
    folds: dict[str, int] = {}
    refused: dict[str, int] = {}
    examples: list[str] = []
    split = fallback = no_stop = 0
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
    return {
        "fold_ins": folds,
        "refused": refused,
        "examples": examples,
        "split_turns": split,
        "fallback": fallback,
        "no_stop": no_stop,
    }


def _merge_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key in ("fold_ins", "refused"):
        for k, v in part.get(key, {}).items():
            total[key][k] = total[key].get(k, 0) + v
    room = REFUSAL_EXAMPLES - len(total["examples"])
    total["examples"].extend(part.get("examples", [])[:room])
    for key in ("split_turns", "fallback", "no_stop"):
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


def read_raw_chunks(inputs: Sequence[Path], size: int) -> Iterator[RawChunk]:
    """Raw line blocks of ``inputs`` in order: the main process only splits lines, so JSON
    parsing happens in the workers (measured: parsing is ~10% of a single-process pack)."""
    for path in inputs:
        try:
            f = path.open("rb")
        except OSError as e:
            raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
        with f:
            first, lines = 1, []
            for lineno, line in enumerate(f, start=1):
                lines.append(line)
                if len(lines) == size:
                    yield RawChunk(str(path), first, b"".join(lines))
                    first, lines = lineno + 1, []
            if lines:
                yield RawChunk(str(path), first, b"".join(lines))


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


def _encode_raw(chunk: RawChunk, opts: PackOptions) -> _Chunk:
    return encode_chunk(parse_chunk(chunk), opts)


class _Workers:
    """The ``num_proc`` worker processes of one pack, used for encoding and then for writing.

    ``ordered`` runs a function over tasks and yields the results in task order with a bounded
    look-ahead (``Pool.imap`` would read the whole input ahead into its queue), so the output
    never depends on ``num_proc``. With ``num_proc`` 1 the tasks run in this process.
    """

    def __init__(self, opts: PackOptions):
        self.opts = opts
        self._pool: Any = None
        self._old_env: str | None = None

    def __enter__(self) -> _Workers:
        if self.opts.num_proc > 1:
            import multiprocessing as mp

            # The workers each run one single-threaded tokenizer; this also silences the
            # tokenizers library's fork warning.
            self._old_env = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self._pool = ctx.Pool(
                self.opts.num_proc, initializer=_init_worker, initargs=(self.opts,)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            if self._old_env is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = self._old_env

    def ordered(self, fn: Callable[..., Any], tasks: Iterator[tuple[Any, ...]]) -> Iterator[Any]:
        """``fn(*task)`` for each task, in task order."""
        if self._pool is None:
            for task in tasks:
                yield fn(*task)
            return
        pending: deque = deque()
        for task in tasks:
            pending.append(self._pool.apply_async(fn, task))
            if len(pending) >= 2 * self.opts.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass(frozen=True)
class _ShardTask:
    """One shard file to write: its rows as (offset, length) of each record in the spill."""

    folder: str
    split: str
    number: int
    seq_len: int
    pad_id: int
    rows: list[list[tuple[int, int]]]
    record_ids: list[list[str]]


def _write_shard(task: _ShardTask) -> tuple[dict[str, Any], int, int]:
    """Gather, lay out and write one shard; return its index entry, tokens and trained tokens."""
    folder = Path(task.folder)
    # Records are read back with pread, not a memory map: mapped pages count towards RSS, which
    # would then grow with the dataset (5 bytes per token) instead of staying flat.
    fd_ids = os.open(folder / SPILL_IDS, os.O_RDONLY)
    fd_mask = os.open(folder / SPILL_MASK, os.O_RDONLY)
    try:
        writer = ShardWriter(
            folder, split=task.split, seq_len=task.seq_len, shard_size=len(task.rows),
            first_shard=task.number,
        )  # fmt: skip
        tokens = trained = 0
        for row, ids_of_row in zip(task.rows, task.record_ids, strict=True):
            segs = []
            for a, n in row:
                ids = np.frombuffer(os.pread(fd_ids, 4 * n, 4 * a), dtype=np.int32)
                mask = np.frombuffer(os.pread(fd_mask, n, a), dtype=np.bool_)
                tokens += n
                trained += int(np.count_nonzero(mask[1:]))
                segs.append((ids, mask))
            # The last add fills the writer (shard_size = rows), which writes the file.
            writer.add(build_row(segs, seq_len=task.seq_len, pad_id=task.pad_id), ids_of_row)
    finally:
        os.close(fd_ids)
        os.close(fd_mask)
    (entry,) = writer.shards
    return entry, tokens, trained


def _encoded_chunks(
    inputs: Sequence[Path], opts: PackOptions, workers: _Workers
) -> Iterator[_Chunk]:
    """Encoded chunks in input order."""
    chunks = read_raw_chunks(inputs, opts.chunk_size)
    return workers.ordered(_encode_raw, ((raw, opts) for raw in chunks))


# ------------------------------------------------------------------ folder handling


def _hash_inputs(inputs: Sequence[Path]) -> tuple[list[dict[str, Any]], int]:
    """sha256 and size of every input (and its line count, a progress total)."""
    out, lines = [], 0
    for p in inputs:
        if not p.is_file():
            raise ConfigError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
        h = hashlib.sha256()
        size = 0
        with p.open("rb") as f:
            while block := f.read(4 << 20):
                h.update(block)
                size += len(block)
                lines += block.count(b"\n")
        out.append({"file": Path(shown(p)).name, "bytes": size, "sha256": h.hexdigest()})
    return out, lines


def fingerprint(
    inputs: list[dict[str, Any]], tok_sha: str, tpl_sha: str, opts: PackOptions, seq_len: int
) -> str:
    """sha256 of everything that decides the output bytes; equal fingerprints => pack is a no-op."""
    payload = {
        "inputs": [[i["sha256"], i["bytes"]] for i in inputs],
        "tokenizer": tok_sha,
        "template": tpl_sha,
        "seq_len": seq_len,
        "options": opts.output_options(),
        "tool": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _existing_index(output: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError, RecursionError):
        d = json.loads((output / INDEX_NAME).read_text(encoding="utf-8"))
        if isinstance(d, dict) and d.get("kind") == KIND:
            return d
    return None


def _check_output(output: Path, inputs: Sequence[Path], *, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: exists and is not a folder")
    out = output.resolve()
    if out == Path(out.anchor) or out == Path.home().resolve():
        raise ConfigError(f"{output}: refusing to use this folder as a shard folder")
    refuse_overwriting(inputs, output)
    if not output.exists() or overwrite or _existing_index(output) is not None:
        return
    if any(output.iterdir()) and not (output / MARKER).exists():
        raise ShardError(
            f"{output}: exists and holds other files (not an sftdata shard folder); "
            "use --overwrite to replace it"
        )


# ------------------------------------------------------------------ the pipeline


def pack(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    opts: PackOptions,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PackReport:
    """Pack canonical JSONL files into a shard folder (see the module docstring).

    Raises:
        ConfigError, TemplateError, ValidationError, ConversionError, ShardError: one line each,
            naming the file/record/option; nothing is left behind.
    """
    t0 = time.perf_counter()
    inputs = [Path(p) for p in inputs]
    output = Path(output)
    _check_options(opts, inputs)
    in_meta, approx_records = _hash_inputs(inputs)
    _check_output(output, inputs, overwrite=overwrite)

    from sftdata.tokenizer import tokenizer_identity

    renderer = _get_renderer(opts)
    _check_length_limit(opts, getattr(_STATE["tok"], "max_length", None), opts.tokenizer)
    ident = tokenizer_identity(_STATE["tok"])
    if opts.seq_len <= renderer.fixed_overhead:
        raise ConfigError(
            f"--seq-len {opts.seq_len} is not larger than template {renderer.name!r}'s fixed "
            f"overhead of {renderer.fixed_overhead} tokens per record"
        )
    tpl_sha = hashlib.sha256(renderer.template_text.encode("utf-8")).hexdigest()
    stops = "\0".join(renderer.stop_tokens)
    tpl_key = f"{renderer.name}:{tpl_sha}:{stops}"
    fp = fingerprint(in_meta, ident["sha256"], tpl_key, opts, opts.seq_len)

    old = _existing_index(output)
    if old is not None and old.get("fingerprint") == fp:
        try:
            for split in old["splits"]:
                ShardReader(output, split=split, verify="full")
        except ShardError:
            pass  # damaged: rebuild below
        else:
            return PackReport.from_index(output, old, noop=True, seconds=time.perf_counter() - t0)

    with exclusive(output, writer="sftdata pack"):
        work = output.with_name(f".{output.name}.partial")
        try:  # the parent folder exists: exclusive() made it for its lock
            shutil.rmtree(work, ignore_errors=True)  # a stale one from a killed run
            work.mkdir()
        except OSError as e:
            raise ShardError(
                f"{e.filename or output}: cannot create the output ({e.strerror or e})"
            ) from None
        try:
            (work / MARKER).write_text(json.dumps({"kind": KIND, "fingerprint": fp}) + "\n")
            with _Workers(opts) as workers:
                index = _build(
                    inputs, work, opts, workers,
                    ident=ident, tok_spec=_spec_of(opts.tokenizer),
                    template={
                        "name": renderer.name, "sha256": tpl_sha, "date": opts.template_date,
                        "stop_tokens": list(renderer.stop_tokens),
                    },
                    in_meta=in_meta, fp=fp, approx_records=approx_records, progress=progress,
                )  # fmt: skip
            (work / MARKER).unlink()
            replace_dir(work, output)
        except OSError as e:  # disk full, permissions, ...: one line, nothing left behind
            shutil.rmtree(work, ignore_errors=True)
            raise ShardError(
                f"{e.filename or work}: cannot write the shards ({e.strerror or e})"
            ) from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return PackReport.from_index(output, index, noop=False, seconds=time.perf_counter() - t0)


def _spec_of(spec: str) -> str:
    return spec if spec == "tiny" else str(Path(spec).expanduser().resolve())


def _check_options(opts: PackOptions, inputs: Sequence[Path]) -> None:
    if not inputs:
        raise ConfigError("no input files given")
    if opts.seq_len < 2:
        raise ConfigError(f"--seq-len {opts.seq_len}: must be at least 2")
    # Writing a shard holds a few rows' int32 columns; a row must fit in memory many times over.
    need = ROW_BUFFERS * 4 * opts.seq_len
    if need > _physical_memory() // 4:
        raise ConfigError(
            f"--seq-len {opts.seq_len:,}: a row's buffers alone would take {need / 2**30:,.1f} GiB, "
            f"more than a quarter of this machine's memory"
        )
    if opts.overflow not in OVERFLOW:
        raise ConfigError(f"--overflow {opts.overflow!r}: must be one of {', '.join(OVERFLOW)}")
    if opts.train_on not in TRAIN_ON:
        raise ConfigError(f"--train-on {opts.train_on!r}: must be one of {', '.join(TRAIN_ON)}")
    if opts.val_fraction is not None and opts.val_count is not None:
        raise ConfigError("--val-fraction and --val-count: give at most one")
    if opts.val_fraction is not None and not 0 <= opts.val_fraction < 1:
        raise ConfigError(f"--val-fraction {opts.val_fraction}: must be in [0, 1)")
    if opts.val_count is not None and opts.val_count < 0:
        raise ConfigError(f"--val-count {opts.val_count}: must not be negative")
    if opts.shard_size is not None and opts.shard_size < 1:
        raise ConfigError(f"--shard-size {opts.shard_size}: must be at least 1")
    if opts.num_proc < 1:
        raise ConfigError(f"--num-proc {opts.num_proc}: must be at least 1")


ROW_BUFFERS = 6
"""int32 columns of one row held at once while a shard is written (ids, labels, positions and
their copies in the writer)."""


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        return 8 << 30


def _check_length_limit(opts: PackOptions, limit: int | None, tokenizer: str) -> None:
    if limit is not None and opts.seq_len > limit and not opts.allow_long:
        raise ConfigError(
            f"--seq-len {opts.seq_len:,} is more than {tokenizer}'s maximum length {limit:,} "
            "(model_max_length / max_position_embeddings); the model was not trained on longer "
            "rows: pack with a smaller --seq-len, or pass --allow-long"
        )


def _build(
    inputs: Sequence[Path],
    work: Path,
    opts: PackOptions,
    workers: _Workers,
    *,
    ident: dict[str, Any],
    tok_spec: str,
    template: dict[str, str],
    in_meta: list[dict[str, Any]],
    fp: str,
    approx_records: int,
    progress: Progress | None,
) -> dict[str, Any]:
    # 1-3: encode and spill. Only lengths and ids stay in memory.
    lengths_parts: list[np.ndarray] = []
    owner_parts: list[np.ndarray] = []
    record_ids: list[str] = []
    n_in = zero = over = trunc = 0
    stats: dict[str, Any] = render_stats([])
    ids_path, mask_path = work / SPILL_IDS, work / SPILL_MASK
    with ids_path.open("wb") as fi, mask_path.open("wb") as fm:
        for chunk in _encoded_chunks(inputs, opts, workers):
            chunk.ids.tofile(fi)
            chunk.mask.tofile(fm)  # bool: one byte per token
            lengths_parts.append(chunk.lengths)
            owner_parts.append(chunk.owners + n_in)
            record_ids.extend(chunk.record_ids)
            n_in += chunk.n_in
            zero += chunk.zero_trained
            over += chunk.overflow
            trunc += chunk.truncated
            _merge_stats(stats, chunk.stats)
            if progress:
                progress("encode", n_in, max(approx_records, n_in))
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.empty(0, np.int32)
    n = len(lengths)
    if n == 0:
        refused = sum(stats["refused"].values())
        raise ValidationError(
            f"{', '.join(map(str, inputs))}: no record left to write ({n_in} read: {zero} with zero "
            f"trained tokens, {over} longer than --seq-len {opts.seq_len}, {refused} refused by "
            "the template)"
        )
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])

    # 4: split, pack, shuffle, write.
    # The split is drawn over input records, so the samples one record gives (a turn the
    # template re-renders differently, README "Templates and masks") stay on one side of it.
    # Where every record gives one sample, groups are the samples and the draw is unchanged.
    _, group = np.unique(np.concatenate(owner_parts), return_inverse=True)
    n_groups = int(group.max()) + 1
    val_n = _val_size(opts, n_groups)
    if val_n >= n_groups:
        raise ConfigError(
            f"validation split of {val_n} records leaves no training record (of {n_groups})"
        )
    pick = np.random.default_rng([opts.seed, 0]).permutation(n_groups)[:val_n]
    is_val = np.isin(group, pick)
    members = {"train": np.flatnonzero(~is_val)}
    if val_n:
        members["validation"] = np.flatnonzero(is_val)

    pad_id = ident.get("pad_token_id")
    pad_id = 0 if pad_id is None else int(pad_id)
    shard_size = opts.resolved_shard_size()
    total_rows = 0
    plans = {}
    for k, (name, idx) in enumerate(members.items()):
        if opts.pack:
            rows = [
                idx[r].tolist()
                for r in map(np.asarray, pack_rows(lengths[idx], seq_len=opts.seq_len))
            ]
        else:
            rows = [[int(i)] for i in idx]
        order = np.random.default_rng([opts.seed, 1, k]).permutation(len(rows))
        plans[name] = [rows[j] for j in order]
        total_rows += len(rows)

    shard_tasks = [
        _ShardTask(
            folder=str(work), split=name, number=number, seq_len=opts.seq_len, pad_id=pad_id,
            rows=[[(int(starts[i]), int(lengths[i])) for i in row] for row in part],
            record_ids=[[record_ids[i] for i in row] for row in part],
        )
        for name, rows in plans.items()
        for number, part in enumerate(
            rows[first : first + shard_size] for first in range(0, len(rows), shard_size)
        )
    ]  # fmt: skip

    # Shards are independent files: the workers write them in parallel (measured on 49,950
    # Alpaca records at 4096, 2 cores: the write stage takes 1.0 s in one process, 0.45 s in two).
    splits: dict[str, Any] = {
        name: {
            "rows": len(rows),
            "records": int(sum(len(r) for r in rows)),
            "tokens": 0,
            "trained_tokens": 0,
            "shards": [],
        }
        for name, rows in plans.items()
    }
    written = 0
    results = workers.ordered(_write_shard, ((t,) for t in shard_tasks))
    for task, (entry, tokens, trained) in zip(shard_tasks, results, strict=True):
        split = splits[task.split]
        split["shards"].append(entry)
        split["tokens"] += tokens
        split["trained_tokens"] += trained
        written += len(task.rows)
        if progress:
            progress("write", written, total_rows)
    ids_path.unlink()
    mask_path.unlink()

    tokens = sum(s["tokens"] for s in splits.values())
    index = {
        "format_version": 1,
        "kind": KIND,
        "tool": {"name": "sftpipe", "version": __version__},
        "seq_len": opts.seq_len,
        "packed": opts.pack,
        "tokenizer": {**ident, "spec": tok_spec},
        "template": template,
        "options": opts.output_options(),
        "inputs": in_meta,
        "fingerprint": fp,
        "counts": {
            "records_in": n_in,
            "dropped": {"zero_trained": zero, "overflow": over},
            "truncated": trunc,
            "records": n,
            "rows": total_rows,
            "tokens": tokens,
            "trained_tokens": sum(s["trained_tokens"] for s in splits.values()),
            "pad_tokens": total_rows * opts.seq_len - tokens,
            "packing_efficiency": round(efficiency(tokens, total_rows, opts.seq_len), 6),
            "fold_ins": stats["fold_ins"],
            "refused": stats["refused"],
            "split_turns": stats["split_turns"],
            "fallback": stats["fallback"],
            "no_stop": stats["no_stop"],
        },
        "refusal_examples": stats["examples"],
        "splits": splits,
    }
    write_index(work, index)  # last, atomically
    return index


def _val_size(opts: PackOptions, n: int) -> int:
    if opts.val_count is not None:
        return opts.val_count
    if opts.val_fraction:
        return max(1, round(opts.val_fraction * n))
    return 0
