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

The figures (time per stage, against the raw batch tokenizer) are in benchmarks/README.md.

All work happens in ``.<name>.partial`` beside the output folder; the output is only replaced
once everything succeeded, so an interrupted or failed pack leaves no ``index.json`` anywhere
(and a previous good output intact). A rerun clears a stale work folder and starts again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import __version__, remote
from sftdata.atomic import exclusive, replace_dir
from sftdata.errors import ConfigError, ShardError, ValidationError
from sftdata.pack.encode import get_renderer, loaded_tokenizer, merge_stats, render_stats
from sftdata.pack.options import PackOptions, Progress, check_length_limit, check_options
from sftdata.pack.output import (
    MARKER,
    check_output,
    existing_index,
    fingerprint,
    hash_inputs,
)
from sftdata.pack.report import PackReport
from sftdata.pack.rows import efficiency, pack_rows_windowed
from sftdata.pack.workers import (
    SAMPLE,
    SPILL_IDS,
    SPILL_MASK,
    SPILL_RIDS,
    SPILL_SAMPLES,
    ShardTask,
    Workers,
    encoded_chunks,
    write_shard,
)
from sftdata.shards import KIND, ShardReader, write_index

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
    url = str(output).rstrip("/") if remote.is_url(output) else None
    output = remote.staging_folder(url) if url is not None else remote.local_path(output)
    check_options(opts, inputs)
    in_meta, approx_records = hash_inputs(inputs)
    check_output(output, inputs, overwrite=overwrite)

    from sftdata.tokenizer import tokenizer_identity

    renderer = get_renderer(opts)
    check_length_limit(opts, getattr(loaded_tokenizer(), "max_length", None), opts.tokenizer)
    ident = tokenizer_identity(loaded_tokenizer())
    if opts.seq_len <= renderer.fixed_overhead:
        raise ConfigError(
            f"--seq-len {opts.seq_len} is not larger than template {renderer.name!r}'s fixed "
            f"overhead of {renderer.fixed_overhead} tokens per record"
        )
    tpl_sha = hashlib.sha256(renderer.template_text.encode("utf-8")).hexdigest()
    stops = "\0".join(renderer.stop_tokens)
    tpl_key = f"{renderer.name}:{tpl_sha}:{stops}:{renderer.append_stop or ''}"
    fp = fingerprint(in_meta, ident["sha256"], tpl_key, opts)

    up_to_date = remote.up_to_date(url, fp, overwrite=overwrite) if url is not None else None
    if up_to_date is not None:  # object storage: up to date by the remote index
        return PackReport.from_index(url, up_to_date, noop=True, seconds=time.perf_counter() - t0)
    old = existing_index(output)
    if old is not None and old.get("fingerprint") == fp and url is None:
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
            with Workers(opts) as workers:
                index = _build(
                    inputs, work, opts, workers,
                    ident=ident, tok_spec=_spec_of(opts.tokenizer),
                    template={
                        "name": renderer.name, "sha256": tpl_sha, "date": opts.template_date,
                        "stop_tokens": list(renderer.stop_tokens),
                        "stops": [x.to_dict() for x in renderer.stops],
                        "appended_stop": renderer.append_stop,
                    },
                    in_meta=in_meta, fp=fp, approx_records=approx_records, progress=progress,
                )  # fmt: skip
            (work / MARKER).unlink()
            replace_dir(work, output)
            if url is not None:
                remote.upload(output, url)  # index.json last: a reader never sees half a folder
                return PackReport.from_index(
                    url, index, noop=False, seconds=time.perf_counter() - t0
                )
        except OSError as e:  # disk full, permissions, ...: one line, nothing left behind
            shutil.rmtree(work, ignore_errors=True)
            raise ShardError(
                f"{e.filename or work}: cannot write the shards ({e.strerror or e})"
            ) from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return PackReport.from_index(output, index, noop=False, seconds=time.perf_counter() - t0)


def _shard_seconds(task: ShardTask) -> float:
    """CPU time a shard write may take: copying bytes, generous per row."""
    return 120.0 + 0.05 * (len(task.row_starts) - 1)


def _shard_lost(cause: str, task: ShardTask) -> None:
    raise ShardError(
        f"{task.folder}: the worker writing {task.split} shard {task.number} was stopped ({cause})"
    )


def _spec_of(spec: str) -> str:
    return spec if spec == "tiny" else str(Path(spec).expanduser().resolve())


def _build(
    inputs: Sequence[Path],
    work: Path,
    opts: PackOptions,
    workers: Workers,
    *,
    ident: dict[str, Any],
    tok_spec: str,
    template: dict[str, Any],
    in_meta: list[dict[str, Any]],
    fp: str,
    approx_records: int,
    progress: Progress | None,
) -> dict[str, Any]:
    """Stages 2-5 inside the work folder; returns the index written last."""
    spill = _spill(inputs, work, opts, workers, approx_records=approx_records, progress=progress)
    plans = _plan_rows(spill, opts)
    pad_id = ident.get("pad_token_id")
    splits = _write_shards(
        plans, spill, work, opts, workers, pad_id=0 if pad_id is None else int(pad_id),
        progress=progress,
    )  # fmt: skip
    for name in (SPILL_IDS, SPILL_MASK, SPILL_RIDS, SPILL_SAMPLES):
        (work / name).unlink()
    total_rows = sum(len(plan.row_starts) - 1 for plan in plans.values())
    tokens = sum(s["tokens"] for s in splits.values())
    stats = spill.stats
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
            "records_in": spill.n_in,
            "dropped": {"zero_trained": spill.zero_trained, "overflow": spill.overflow},
            "truncated": spill.truncated,
            "records": len(spill.lengths),
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
            "appended_stops": stats["appended_stops"],
            "dropped_tokens": {"overflow": spill.overflow_tokens},
            "truncated_tokens": spill.truncated_tokens,
            "lengths": _percentiles(spill.length_counts),
        },
        "refusal_examples": stats["examples"],
        "splits": splits,
    }
    write_index(work, index)  # last, atomically
    return index


@dataclass
class _Spilled:
    """What stays in memory of the encoded records: 8 bytes each (their tokens, masks, spill
    offsets and record ids are in the spill files, read back by the shard writers)."""

    lengths: np.ndarray
    """Tokens of each kept sample (int32), in input order."""
    owners: np.ndarray
    """The input record each sample came from (int32)."""
    n_in: int
    zero_trained: int
    overflow: int
    truncated: int
    stats: dict[str, Any]
    overflow_tokens: int = 0
    truncated_tokens: int = 0
    length_counts: Counter = field(default_factory=Counter)
    """How many samples had each length before any cut (the length percentiles)."""


def _percentiles(counts: Counter) -> dict[str, int]:
    """Sample lengths before any cut: what ``--seq-len`` would keep how many records whole.

    The value at sorted position ceil(q·(n-1)) (numpy's ``method="higher"``), read off the
    length histogram, so no per-record array is kept for it."""
    n = sum(counts.values())
    if not n:
        return {}
    values = sorted(counts)
    cum = np.cumsum([counts[v] for v in values])
    at = {q: values[int(np.searchsorted(cum, math.ceil(q / 100 * (n - 1)), side="right"))]
          for q in (50, 90, 99)}  # fmt: skip
    return {"p50": at[50], "p90": at[90], "p99": at[99], "max": values[-1]}


def _spill(
    inputs: Sequence[Path],
    work: Path,
    opts: PackOptions,
    workers: Workers,
    *,
    approx_records: int,
    progress: Progress | None,
) -> _Spilled:
    """Stages 2-3: encode every chunk (in the workers) and spill its tokens, masks, and each
    sample's spill offset and record id."""
    lengths_parts: list[np.ndarray] = []
    owner_parts: list[np.ndarray] = []
    n_in = zero = over = trunc = over_tokens = cut_tokens = 0
    token_end = rid_end = 0
    counts: Counter = Counter()
    stats: dict[str, Any] = render_stats([])
    with (
        (work / SPILL_IDS).open("wb") as fi,
        (work / SPILL_MASK).open("wb") as fm,
        (work / SPILL_RIDS).open("wb") as fr,
        (work / SPILL_SAMPLES).open("wb") as fs,
    ):
        for chunk in encoded_chunks(inputs, opts, workers, approx_records=approx_records):
            chunk.ids.tofile(fi)
            chunk.mask.tofile(fm)  # bool: one byte per token
            rids = [r.encode("utf-8") for r in chunk.record_ids]
            fr.write(b"".join(rids))
            samples = np.zeros(len(rids), dtype=SAMPLE)
            samples["start"] = token_end + np.concatenate([[0], np.cumsum(chunk.lengths)[:-1]])
            rid_lens = np.fromiter(map(len, rids), dtype=np.int64, count=len(rids))
            samples["rid"] = rid_end + np.concatenate([[0], np.cumsum(rid_lens)[:-1]])
            samples["rid_len"] = rid_lens
            samples.tofile(fs)
            token_end += int(chunk.lengths.sum())
            rid_end += int(rid_lens.sum())
            lengths_parts.append(chunk.lengths.astype(np.int32, copy=False))
            owner_parts.append((chunk.owners + n_in).astype(np.int32))
            n_in += chunk.n_in
            zero += chunk.zero_trained
            over += chunk.overflow
            trunc += chunk.truncated
            over_tokens += chunk.overflow_tokens
            cut_tokens += chunk.truncated_tokens
            counts.update(chunk.full_lengths.tolist())
            merge_stats(stats, chunk.stats)
            if progress:
                progress("encode", n_in, max(approx_records, n_in))
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.empty(0, np.int32)
    if len(lengths) == 0:
        refused = sum(stats["refused"].values())
        raise ValidationError(
            f"{', '.join(map(str, inputs))}: no record left to write ({n_in} read: {zero} with zero "
            f"trained tokens, {over} longer than --seq-len {opts.seq_len}, {refused} refused by "
            "the template)"
        )
    owners = np.concatenate(owner_parts)
    return _Spilled(
        lengths=lengths, owners=owners, n_in=n_in, zero_trained=zero, overflow=over,
        truncated=trunc, stats=stats, overflow_tokens=over_tokens, truncated_tokens=cut_tokens,
        length_counts=counts,
    )  # fmt: skip


@dataclass
class _Plan:
    """One split's rows, compactly: sample indices row after row, and where each row starts."""

    samples: np.ndarray
    """Sample indices (int32), row after row in output order."""
    row_starts: np.ndarray
    """Offset of each row in ``samples`` (one more entry: the total)."""


def _plan_rows(spill: _Spilled, opts: PackOptions) -> dict[str, _Plan]:
    """Stage 4: the validation split, then each split's rows (sample indices), shuffled."""
    # The split is drawn over input records, so the samples one record gives (a turn the
    # template re-renders differently, README "Templates and masks") stay on one side of it.
    # Where every record gives one sample, groups are the samples and the draw is unchanged.
    # Samples come in input order, so a new group starts wherever the owner changes.
    owners = spill.owners
    group = np.zeros(len(owners), dtype=np.int32)
    np.cumsum(owners[1:] != owners[:-1], out=group[1:])
    n_groups = int(group[-1]) + 1
    val_n = _val_size(opts, n_groups)
    if val_n >= n_groups:
        raise ConfigError(
            f"validation split of {val_n} records leaves no training record (of {n_groups})"
        )
    pick = np.random.default_rng([opts.seed, 0]).permutation(n_groups)[:val_n]
    is_val = np.isin(group, pick)
    del group, pick
    members = {"train": np.flatnonzero(~is_val).astype(np.int32)}
    if val_n:
        members["validation"] = np.flatnonzero(is_val).astype(np.int32)
    plans = {}
    for k, (name, idx) in enumerate(members.items()):
        if opts.pack:
            samples, row_starts = pack_rows_windowed(spill.lengths[idx], seq_len=opts.seq_len)
            samples = idx[samples]  # int32, like idx
        else:
            samples, row_starts = idx, np.arange(len(idx) + 1, dtype=np.int64)
        n_rows = len(row_starts) - 1
        order = np.random.default_rng([opts.seed, 1, k]).permutation(n_rows)
        sizes = np.diff(row_starts)[order]
        starts = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        # gather rows in the shuffled order without a Python list per row
        take = np.repeat((row_starts[:-1][order] - starts[:-1]).astype(np.int32), sizes)
        take += np.arange(len(samples), dtype=np.int32)
        plans[name] = _Plan(samples[take], starts)
        del take, samples
    return plans


def _write_shards(
    plans: dict[str, _Plan],
    spill: _Spilled,
    work: Path,
    opts: PackOptions,
    workers: Workers,
    *,
    pad_id: int,
    progress: Progress | None,
) -> dict[str, Any]:
    """Stage 4, writing: the shard files of every split (in the workers: shards are
    independent files); returns each split's index entry. Tasks are made as the workers take
    them, so only the shards in flight exist in memory."""
    lengths = spill.lengths

    def tasks():
        for name, plan in plans.items():
            n_rows = len(plan.row_starts) - 1
            bounds = opts.shard_bounds(n_rows)
            for number, (first, last) in enumerate(itertools.pairwise(bounds)):
                a, b = plan.row_starts[first], plan.row_starts[last]
                yield ShardTask(
                    folder=str(work), split=name, number=number, seq_len=opts.seq_len,
                    pad_id=pad_id, samples=plan.samples[a:b],
                    lengths=lengths[plan.samples[a:b]],
                    row_starts=(plan.row_starts[first : last + 1] - a).astype(np.int64),
                )  # fmt: skip

    splits: dict[str, Any] = {
        name: {
            "rows": len(plan.row_starts) - 1,
            "records": len(plan.samples),
            "tokens": 0,
            "trained_tokens": 0,
            "shards": [],
        }
        for name, plan in plans.items()
    }
    total_rows = sum(s["rows"] for s in splits.values())
    written = 0
    written_by = workers.ordered(
        write_shard, ((t,) for t in tasks()), seconds=_shard_seconds, on_lost=_shard_lost
    )
    for name, rows, entry, tokens, trained in written_by:
        split = splits[name]
        split["shards"].append(entry)
        split["tokens"] += tokens
        split["trained_tokens"] += trained
        written += rows
        if progress:
            progress("write", written, total_rows)
    return splits


def _val_size(opts: PackOptions, n: int) -> int:
    if opts.val_count is not None:
        return opts.val_count
    if opts.val_fraction:
        return max(1, round(opts.val_fraction * n))
    return 0
