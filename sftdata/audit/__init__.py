"""``sftdata audit``: is a dataset fit to train on? Every record is rendered and tokenized as
``pack`` would (in its bounded workers), its trained tokens derived again by a second renderer
(transformers' ``apply_chat_template``, ``sftdata.audit.oracle``), and checked for stops, control
tokens, length, duplicates, leakage, contamination and content (``sftdata.audit.checks``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import sha256_file
from sftdata.audit.checks import CHECKS, DEFAULT_FAIL_ON, Check, Collector, parse_fail_on
from sftdata.audit.facts import ngram_hashes
from sftdata.errors import ConfigError
from sftdata.pack.options import PackOptions

MAX_CHECKED = 100_000
"""Records the second renderer checks by default; past it, an even sample of this many."""
VIEW_LIMIT = 500
"""Records the page's viewer shows at most (the listed ones first, then a sample)."""
SAMPLE_VIEWS = 20
"""Records shown in the viewer whatever the checks found (the first of the data)."""


@dataclass(frozen=True)
class AuditOptions:
    """What ``sftdata audit`` checks beyond how records are rendered (``PackOptions``)."""

    validation: tuple[str, ...] = ()
    """Canonical JSONL files of the validation split (leakage is checked against them)."""
    validation_ids: frozenset[str] = frozenset()
    """Ids of the inputs' records that are in the validation split (a shard folder's)."""
    eval_files: tuple[str, ...] = ()
    """Evaluation files in any format ``convert`` reads (contamination)."""
    sample: int | None = None
    """Records the second renderer checks (None: all, up to :data:`MAX_CHECKED`)."""
    threshold: float = 0.8
    """Jaccard similarity from which two records are near duplicates."""
    fail_on: str = DEFAULT_FAIL_ON
    """``CHECK[>RATE],...``: the checks that fail the audit, and the share each may reach."""
    list_limit: int = 1000
    """Records listed per check (the counts are always whole)."""


@dataclass
class AuditReport:
    """What the audit found."""

    records: int
    checks: dict[str, Check]
    lengths: dict[str, int]
    """Token lengths of the records' longest samples: p50, p90, p99, max."""
    seconds: float
    tokenizer: str
    template: str
    seq_len: int | None
    histograms: dict[str, Any] = field(default_factory=dict)
    """Data for the page's histograms (lengths, trained share, records per source file)."""
    views: list[dict[str, Any]] = field(default_factory=list)
    """The record viewer's data (``sftdata.audit.worker.record_views``) for the records the
    report lists and a sample, when asked for (``--html``)."""

    @property
    def failed(self) -> bool:
        """Some check is past its ``--fail-on`` threshold."""
        return any(c.fails for c in self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``--json``)."""
        return {
            "ok": not self.failed, "records": self.records, "tokenizer": self.tokenizer,
            "template": self.template, "seq_len": self.seq_len, "lengths": self.lengths,
            "seconds": round(self.seconds, 3),
            "checks": [c.to_dict() for c in self.checks.values()],
        }  # fmt: skip


class EvalIndex:
    """Word n-gram hashes of evaluation items, each mapped back to its item."""

    def __init__(self, files: Sequence[str]):
        from sftdata.sources import read_conversations

        hashes, owners, self.items = [], [], []
        for path in files:
            for conv in read_conversations(path):
                texts = [m.content for m in conv.messages if m.role in ("user", "assistant")]
                h = [ngram_hashes(t) for t in texts if t.strip()]
                if h:
                    both = np.unique(np.concatenate(h))
                    hashes.append(both)
                    owners.append(np.full(len(both), len(self.items), dtype=np.int64))
                self.items.append(f"{conv.id!r} ({conv.source})")
        all_h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        order = np.argsort(all_h, kind="stable")
        self.hashes = all_h[order]
        self.owners = np.concatenate(owners)[order] if owners else np.empty(0, np.int64)

    def match(self, grams: list[np.ndarray]) -> list[str | None]:
        """For each record's n-gram hashes: the evaluation item it shares the most n-grams with
        (the first such item on a tie), in words, or None. One lookup for a whole task."""
        out: list[str | None] = [None] * len(grams)
        lens = np.fromiter(map(len, grams), dtype=np.int64, count=len(grams))
        if len(self.hashes) == 0 or not lens.sum():
            return out
        every = np.concatenate(grams)
        at = np.searchsorted(self.hashes, every).clip(max=len(self.hashes) - 1)
        hit = self.hashes[at] == every
        if not hit.any():
            return out
        record = np.repeat(np.arange(len(grams)), lens)[hit]
        shared = np.bincount(record, minlength=len(grams))
        # (record, item) pairs counted, then per record the item with the most, lowest first
        pairs, counts = np.unique(
            record * len(self.items) + self.owners[at[hit]], return_counts=True
        )
        rec, item = np.divmod(pairs, len(self.items))
        order = np.lexsort((item, -counts, rec))
        first = order[np.r_[True, rec[order][1:] != rec[order][:-1]]]
        for r, i in zip(rec[first].tolist(), item[first].tolist(), strict=True):
            out[r] = f"{int(shared[r])} n-gram(s) shared with evaluation item {self.items[i]}"
        return out


@dataclass(frozen=True)
class FromShards:
    """What a shard folder given to the audit supplies: how it was packed, its JSONL inputs,
    and the record ids of its validation split."""

    settings: dict[str, Any]
    """``tokenizer``, ``template``, ``seq_len`` and the pack options that change rendering."""
    inputs: tuple[Path, ...]
    validation_ids: frozenset[str]


def from_shards(folder: Path, given: Sequence[Path]) -> FromShards:
    """Read a shard folder's index: its settings, and its inputs — those of ``given`` whose
    sha256 it records, else the files it names found beside the folder or here.

    Raises:
        ShardError: not a shard folder. ConfigError: an input it records is not found, or a
            given file is not one of its inputs, naming the file.
    """
    from sftdata.shards import ShardReader
    from sftdata.shards.format import read_index

    index = read_index(folder)
    recorded = {i["sha256"]: i["file"] for i in index["inputs"]}
    digests = {}
    for p in given:
        digests[p] = sha256_file(p)
        if digests[p] not in recorded:
            raise ConfigError(
                f"{p}: not one of the inputs {folder} was packed from (sha256 differs)"
            )
    found = {d: p for p, d in digests.items()}
    for sha, name in recorded.items():
        for cand in (folder.parent / name, Path(name)):
            if sha not in found and cand.is_file() and sha256_file(cand) == sha:
                found[sha] = cand
        if sha not in found:
            raise ConfigError(
                f"{folder}: its input {name} is not beside it or here (unchanged): pass it too"
            )
    val: set[str] = set()
    if "validation" in index["splits"]:
        reader = ShardReader(folder, split="validation")
        for k in range(len(reader)):
            val.update(r.split("#turn")[0] for r in reader[k]["record_ids"])
    o = index["options"]
    settings = {
        "tokenizer": index["tokenizer"]["spec"], "template": index["template"]["name"],
        "seq_len": index["seq_len"], "train_on": o["train_on"], "template_date": o["template_date"],
        "strict": o["strict"], "special_text": o["special_text"], "missing_stop": o["missing_stop"],
    }  # fmt: skip
    return FromShards(settings, tuple(found[sha] for sha in recorded), frozenset(val))


def _percentiles(lengths: np.ndarray) -> dict[str, int]:
    """p50/p90/p99/max as ``stats`` computes them (the same "higher" percentiles as pack)."""
    from sftdata.stats import summarize

    s = summarize(lengths, np.zeros_like(lengths))
    return {"p50": s.get("median", 0), "p90": s.get("p90", 0), "p99": s.get("p99", 0),
            "max": s.get("max", 0)}  # fmt: skip


def _wanted(col: Collector, checks: dict[str, Check]) -> list[tuple[str, int]]:
    """(file, line) of the records the viewer shows: listed ones in report order, a sample."""
    places = [(f.file, f.line) for c in checks.values() for f in c.findings]
    places += [(f.file, f.line) for f in col.facts[:SAMPLE_VIEWS]]
    return list(dict.fromkeys(places))[:VIEW_LIMIT]


def _lines_of(wanted: list[tuple[str, int]]) -> Any:
    """One ``RawChunk`` per wanted line, read back from its file."""
    from sftdata.pack.encode import RawChunk

    by_file: dict[str, set[int]] = {}
    for file, line in wanted:
        by_file.setdefault(file, set()).add(line)
    for file, lines in by_file.items():
        with open(file, "rb") as f:
            for k, raw in enumerate(f, start=1):
                if k in lines:
                    yield RawChunk(file, k, raw)


def audit(
    inputs: Sequence[str | Path], opts: PackOptions, aopts: AuditOptions, *,
    seq_len: int | None, views: bool = False,
) -> AuditReport:  # fmt: skip
    """Audit canonical JSONL ``inputs`` (and ``aopts.validation``) rendered with ``opts``.

    Raises:
        ConfigError, TemplateError, ValidationError, ConversionError: one line each, naming the
            file, record or option (as ``pack``).
    """
    from sftdata.audit.worker import Settings, audit_chunk
    from sftdata.pack.bounds import find_record, task_cpu_budget
    from sftdata.pack.encode import get_renderer, read_raw_chunks
    from sftdata.pack.workers import Workers, task_size

    t0 = time.perf_counter()
    fail_on = parse_fail_on(aopts.fail_on)
    if not 0 < aopts.threshold <= 1:
        raise ConfigError(f"--threshold {aopts.threshold} is not in (0, 1]")
    _require_datasketch()
    renderer = get_renderer(opts)
    eval_index = EvalIndex(aopts.eval_files) if aopts.eval_files else None
    splits = [
        ("train", [Path(p) for p in inputs]),
        ("validation", [Path(p) for p in aopts.validation]),
    ]
    approx = sum(p.stat().st_size for _, ps in splits for p in ps) // 400 + 1
    limit = aopts.sample if aopts.sample is not None else MAX_CHECKED
    every = 0 if limit <= 0 else max(1, -(-approx // limit))
    col = Collector(seq_len=seq_len, list_limit=aopts.list_limit, eval_index=eval_index,
                    validation_ids=aopts.validation_ids, threshold=aopts.threshold)  # fmt: skip
    with Workers(opts) as workers:

        def lost(cause: str, raw: Any, *_: Any) -> None:
            find_record(raw, opts, budget=workers.budget, cause=cause)

        for split, paths in splits:
            settings = Settings(split=split, every=every, ngrams=eval_index is not None)
            tasks = (
                (raw, opts, settings) for raw in read_raw_chunks(paths, task_size(opts, approx))
            )
            for chunk in workers.ordered(
                audit_chunk, tasks, on_lost=lost,
                seconds=lambda raw, *_: 3 * task_cpu_budget(raw.data.count(b"\n") + 1),
            ):  # fmt: skip
                col.add(chunk)
        checks = col.finish(fail_on=fail_on)
        shown = []
        if views:
            from sftdata.audit.worker import record_views

            tasks = ((raw, opts) for raw in _lines_of(_wanted(col, checks)))
            for part in workers.ordered(
                record_views, tasks, on_lost=lost, seconds=lambda *_: task_cpu_budget(1)
            ):
                shown += part
    lengths = np.array([f.tokens for f in col.facts], dtype=np.int64)
    trained = np.array([f.trained / f.total if f.total else 0.0 for f in col.facts])
    sources: dict[str, int] = {}
    for f in col.facts:
        name = f.where.rsplit(":", 1)[0]
        sources[name] = sources.get(name, 0) + 1
    return AuditReport(
        records=len(col.facts), checks=checks, lengths=_percentiles(lengths),
        seconds=time.perf_counter() - t0, tokenizer=str(opts.tokenizer), template=renderer.name,
        seq_len=seq_len,
        histograms={"lengths": lengths.tolist(), "trained_share": trained.round(4).tolist(),
                    "sources": sources},
        views=shown,
    )  # fmt: skip


def _require_datasketch() -> None:
    try:
        import datasketch  # noqa: F401
    except ImportError:
        raise ConfigError(
            "near duplicates need datasketch (MinHash LSH): pip install 'sftpipe[audit]'"
        ) from None


__all__ = [
    "CHECKS", "MAX_CHECKED", "AuditOptions", "AuditReport", "EvalIndex", "FromShards", "audit",
    "from_shards",
]  # fmt: skip
