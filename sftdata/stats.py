"""Token statistics behind ``sftdata stats``: length distribution, trained ratio, packing.

Works on a shard folder (reads its rows) or on canonical JSONL files (renders and tokenizes
them and packs the lengths in memory to show the efficiency ``pack`` would get).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import IGNORE_INDEX
from sftdata.pack import efficiency, pack_rows
from sftdata.text import counted


@dataclass
class StatsReport:
    """What ``sftdata stats`` found: the figures, the words for them, the lengths to plot."""

    title: str
    """What was read: ``shards: 1,234 records`` (the histogram's title)."""
    lengths: np.ndarray
    """Tokens of every record."""
    summary: dict[str, Any]
    """:func:`summarize`'s figures."""
    seq_len: int | None
    """The shards' row length, or the one asked for JSONL input (None: not asked)."""
    packing: dict[str, Any] = field(default_factory=dict)
    """``packing_efficiency``, ``rows`` (and ``left_out`` for an estimate); empty: not asked."""
    packing_line: str | None = None
    """The packing figures in words."""

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {**self.summary, **self.packing, "seq_len": self.seq_len}

    def summary_lines(self) -> list[str]:
        """The figures in words, a line each."""
        s = self.summary
        lines = [
            f"records {s['records']:,}; tokens {s['tokens']:,}; trained {s['trained_tokens']:,}"
        ]
        if s["records"]:
            lines.append(
                f"tokens per record: min {s['min']:,}, median {s['median']:,}, p90 {s['p90']:,}, "
                f"p99 {s['p99']:,}, max {s['max']:,}"
            )
        lines.append(f"trained ratio {s['trained_ratio']:.1%}")
        return lines + ([self.packing_line] if self.packing_line else [])


def folder_stats(folder: Path) -> StatsReport:
    """The figures of a shard folder (every split), packing as it was packed."""
    lens, trained, index = shard_lengths(folder)
    c, seq = index["counts"], int(index["seq_len"])
    return StatsReport(
        title=f"{folder.name}: {len(lens):,} records", lengths=lens,
        summary=summarize(lens, trained), seq_len=seq,
        packing={"packing_efficiency": c["packing_efficiency"], "rows": c["rows"]},
        packing_line=(
            f"packing efficiency {c['packing_efficiency']:.2%} ({c['rows']:,} rows of {seq}; "
            f"{'packed' if index['packed'] else 'not packed'})"
        ),
    )  # fmt: skip


def jsonl_stats(
    inputs: Sequence[str | Path], *, names: Sequence[str], tokenizer: str, template: str,
    train_on: str, seq_len: int | None,
) -> StatsReport:  # fmt: skip
    """The figures of canonical JSONL files (``names``: as the user gave them), rendered and
    encoded as pack does; with ``seq_len``, the efficiency packing them would reach."""
    lens, trained = jsonl_lengths(inputs, tokenizer=tokenizer, template=template, train_on=train_on)
    report = StatsReport(
        title=f"{', '.join(names)}: {len(lens):,} records", lengths=lens,
        summary=summarize(lens, trained), seq_len=seq_len,
    )  # fmt: skip
    if seq_len:
        eff, rows, left_out = packing_estimate(lens, seq_len)
        report.packing = {"packing_efficiency": eff, "rows": rows, "left_out": left_out}
        report.packing_line = (
            f"packing efficiency {eff:.2%} at seq_len {seq_len} ({rows:,} rows; "
            f"{counted(left_out, 'record')} longer than seq_len left out)"
        )
    return report


def summarize(lengths: np.ndarray, trained: np.ndarray) -> dict[str, Any]:
    """Distribution of per-record token lengths and the trained-token ratio (pure)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    trained = np.asarray(trained, dtype=np.int64)
    if lengths.size == 0:
        return {"records": 0, "tokens": 0, "trained_tokens": 0, "trained_ratio": 0.0}
    # "higher": a length some record has, read as pack reads its percentiles (so the two
    # commands give the same p99 for the same records)
    q = np.percentile(lengths, [50, 90, 99], method="higher")
    total = int(lengths.sum())
    return {
        "records": int(lengths.size),
        "tokens": total,
        "trained_tokens": int(trained.sum()),
        "trained_ratio": float(trained.sum() / total),
        "min": int(lengths.min()),
        "median": int(q[0]),
        "p90": int(q[1]),
        "p99": int(q[2]),
        "max": int(lengths.max()),
    }


def shard_lengths(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Per-record lengths and trained counts over every split of a shard folder."""
    from sftdata.shards import ShardReader

    lens, trained = [], []
    index: dict[str, Any] = {}
    for split in ShardReader.splits(folder):
        reader = ShardReader(folder, split=split)
        index = reader.index
        for i in range(len(reader)):
            row = reader[i]
            k = len(row["record_ids"])
            seg = row["seq_lens"][:k]
            starts = np.concatenate([[0], np.cumsum(seg)[:-1]])
            lens.append(seg)
            trained.append(
                np.add.reduceat((row["labels"] != IGNORE_INDEX).astype(np.int64), starts)
            )
    return np.concatenate(lens), np.concatenate(trained), index


def jsonl_lengths(
    inputs: Sequence[str | Path], *, tokenizer: str, template: str, train_on: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-record lengths and trained counts of canonical JSONL files, rendered and encoded."""
    from sftdata.pack import PackOptions
    from sftdata.pack.encode import get_renderer
    from sftdata.pack.workers import Workers, encoded_chunks

    # seq_len is irrelevant here: overflow "truncate" would cut; use a bound no record reaches.
    opts = PackOptions(seq_len=1 << 62, tokenizer=tokenizer, template=template, train_on=train_on)
    get_renderer(opts)  # loaded (and its problems reported) once, before the workers fork
    lens, trained = [], []
    # rendered and tokenized where pack does it: in a worker under the OS bounds
    with Workers(opts) as workers:
        paths = [Path(p) for p in inputs]
        for chunk in encoded_chunks(paths, opts, workers, keep_zero_trained=True):
            lens.append(chunk.lengths)
            starts = np.concatenate([[0], np.cumsum(chunk.lengths)[:-1]]).astype(np.int64)
            m = chunk.mask.astype(np.int64)
            m[starts] = 0  # the first token's label is ignored once packed
            trained.append(np.add.reduceat(m, starts) if len(starts) else np.empty(0, np.int64))
    if not lens:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(lens), np.concatenate(trained)


CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC",
    "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Microsoft YaHei", "SimHei", "PingFang SC",
    "Hiragino Sans GB", "AR PL UMing CN", "Droid Sans Fallback", "Arial Unicode MS",
)  # fmt: skip
"""Fonts with CJK glyphs found on common systems, tried after matplotlib's default."""


def drawable(text: str) -> tuple[list[str], str]:
    """(font families, text) to draw ``text`` in a plot without boxes for missing glyphs: the
    default font, then any installed font of :data:`CJK_FAMILIES` (matplotlib falls back glyph
    by glyph); a character none of them has is written as its ``\\uXXXX`` escape instead of a box
    (file names in Chinese, on a machine without a Chinese font)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    installed = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    default = font_manager.findfont(font_manager.FontProperties())
    files = [default] + [installed[n] for n in CJK_FAMILIES if n in installed]
    families = ["DejaVu Sans"] + [n for n in CJK_FAMILIES if n in installed]
    covered: set[int] = set()
    for f in files:
        covered |= set(FT2Font(f).get_charmap())
    out = "".join(c if ord(c) in covered or c.isspace() else f"\\u{ord(c):04x}" for c in text)
    return families, out


def write_histogram(lengths: np.ndarray, path: Path, *, title: str, seq_len: int | None) -> None:
    """A record-length histogram PNG, written atomically.

    Raises:
        ConfigError: matplotlib is not installed (the ``plot`` extra).
    """
    from sftdata.extras import require

    require("plot", "--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sftdata.atomic import atomic_file

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(lengths, bins=min(80, max(10, int(np.sqrt(len(lengths))))), color="#3b7dd8")
    if seq_len:
        ax.axvline(seq_len, color="#d83b3b", linestyle="--", label=f"seq_len {seq_len}")
        ax.legend()
    ax.set_xlabel("tokens per record")
    ax.set_ylabel("records")
    families, title = drawable(title)
    ax.set_title(title, fontfamily=families)
    fig.tight_layout()
    with atomic_file(path, mode="wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def packing_estimate(lengths: np.ndarray, seq_len: int) -> tuple[float, int, int]:
    """``(efficiency, rows, left out)`` of packing the records that fit in ``seq_len`` (pure)."""
    fits = lengths[lengths <= seq_len]
    rows = len(pack_rows(fits, seq_len=seq_len))
    return efficiency(int(fits.sum()), rows, seq_len), rows, len(lengths) - len(fits)
