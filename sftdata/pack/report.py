"""``PackReport``: what a pack did, read back from the ``index.json`` it wrote (so a no-op
reports the same), and its summary in words (``sftdata pack`` and ``sfttrain run`` print it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdata.text import counted, stop_line

OVERFLOW_WARN_SHARE = 0.01
"""Above this share of records dropped as longer than the row, the summary warns."""


@dataclass
class PackReport:
    """What a pack did (or found already done)."""

    output: Path | str
    """The shard folder, or its URL in object storage."""
    noop: bool
    records_in: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"zero_trained": 0, "overflow": 0})
    truncated: int = 0
    records: int = 0
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    packing_efficiency: float = 0.0
    packed: bool = True
    """Records share rows (False: ``--no-pack``, one record per row: no packing efficiency)."""
    splits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    fold_ins: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    refusal_examples: list[str] = field(default_factory=list)
    split_turns: int = 0
    fallback: int = 0
    no_stop: int = 0
    """Trained replies left without a stop token (``--missing-stop allow``)."""
    appended_stops: int = 0
    """Trained replies after which the appended stop token was inserted."""
    stops: list[dict[str, Any]] = field(default_factory=list)
    """The stop set: each token, its id and where it came from (eos, generation_config, template)."""
    appended_stop: str | None = None
    """The token appended after a reply the template ends with no stop."""
    seq_len: int = 0
    overflow_tokens: int = 0
    """Tokens of the records dropped as longer than ``seq_len``."""
    truncated_tokens: int = 0
    """Tokens cut from truncated records."""
    lengths: dict[str, int] = field(default_factory=dict)
    """Percentiles (``p50``, ``p90``, ``p99``, ``max``) of the samples' lengths before any cut."""

    @classmethod
    def from_index(
        cls, output: Path | str, index: dict[str, Any], *, noop: bool, seconds: float
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
            packed=bool(index.get("options", {}).get("pack", True)),
            splits={k: v["rows"] for k, v in index["splits"].items()},
            seconds=seconds,
            fold_ins=dict(c.get("fold_ins", {})),
            refused=dict(c.get("refused", {})),
            refusal_examples=list(index.get("refusal_examples", [])),
            split_turns=c.get("split_turns", 0),
            fallback=c.get("fallback", 0),
            no_stop=c.get("no_stop", 0),
            appended_stops=c.get("appended_stops", 0),
            stops=list(index["template"].get("stops", [])),
            appended_stop=index["template"].get("appended_stop"),
            seq_len=int(index["seq_len"]),
            overflow_tokens=c.get("dropped_tokens", {}).get("overflow", 0),
            truncated_tokens=c.get("truncated_tokens", 0),
            lengths=dict(c.get("lengths", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able values (``sftdata pack --json``)."""
        return {**dataclasses.asdict(self), "output": str(self.output)}

    def stop_line(self) -> str:
        """The stop set with where each token came from, and the stops appended."""
        return stop_line(self.stops, self.appended_stop, self.appended_stops)

    def summary_lines(self) -> list[str]:
        """The summary, one line each (stdout)."""
        if self.noop:
            return [
                f"{self.output}: already up to date (same inputs, tokenizer, template and "
                f"options); nothing to do ({counted(self.rows, 'row')}, "
                f"{counted(self.records, 'record')})"
            ]
        split_txt = ", ".join(f"{k} {v:,}" for k, v in self.splits.items())
        d = self.dropped
        ratio = self.trained_tokens / self.tokens if self.tokens else 0.0
        tps = self.tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"packed {counted(self.records, 'record')} into {counted(self.rows, 'row')} of {self.seq_len} "
            f"({split_txt}) in {self.output}",
            f"  records in {self.records_in:,}; dropped {d.get('zero_trained', 0):,} with zero "
            f"trained tokens, {d.get('overflow', 0):,} longer than --seq-len"
            f"{self._share(d.get('overflow', 0), self.overflow_tokens)}; truncated "
            f"{self.truncated:,}{self._share(self.truncated, self.truncated_tokens, cut=True)}",
            f"  tokens {self.tokens:,}; trained {self.trained_tokens:,} ({ratio:.1%}); "
            + (
                f"packing efficiency {self.packing_efficiency:.2%}"
                if self.packed
                else f"not packed (one record per row, {self.packing_efficiency:.2%} of the rows "
                "are tokens)"
            ),
        ]
        if self.lengths:
            p = self.lengths
            lines.append(
                f"  record lengths before any cut: median {p['p50']:,}, p90 {p['p90']:,}, "
                f"p99 {p['p99']:,}, max {p['max']:,} tokens"
            )
        if self.fold_ins:
            kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(self.fold_ins.items()))
            lines.append(f"  fold-ins (records): {kinds}")
        if self.stops:
            lines.append(f"  {self.stop_line()}")
        if self.split_turns or self.fallback or self.no_stop:
            lines.append(
                f"  turns trained as their own sample {self.split_turns:,}; records whose prompt "
                f"is not a prefix of their render {self.fallback:,}; replies trained without a "
                f"stop token {self.no_stop:,} (--missing-stop allow)"
            )
        lines.append(f"  {self.seconds:.1f} s ({tps / 1e6:.2f}M tokens/s)")
        return lines

    def warnings(self) -> list[str]:
        """What the user must not miss, one line each (stderr): overlong records dropped above
        :data:`OVERFLOW_WARN_SHARE`, and refused records."""
        out = []
        over = self.dropped.get("overflow", 0)
        if not self.noop and self.records_in and over / self.records_in > OVERFLOW_WARN_SHARE:
            fit = self.lengths.get("p99")
            hint = f", or --seq-len {fit:,} (the p99 length) to fit 99% of records" if fit else ""
            out.append(
                f"Warning: {over / self.records_in:.1%} of the records ({counted(over, 'record')}) are "
                f"longer than --seq-len {self.seq_len:,} and were dropped: use --overflow truncate "
                f"to keep them cut at {self.seq_len:,} tokens{hint}"
            )
        if self.refused:
            kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(self.refused.items()))
            out.append(f"  refused {counted(sum(self.refused.values()), 'record')} ({kinds}):")
            out.extend(f"    {line}" for line in self.refusal_examples)
        return out

    def _share(self, records: int, tokens: int, *, cut: bool = False) -> str:
        if not records or not self.records_in:
            return ""
        seen = self.tokens + self.overflow_tokens + self.truncated_tokens
        what = "tokens cut" if cut else "tokens"
        return (
            f" ({records / self.records_in:.1%} of records, {tokens / max(seen, 1):.1%} of {what})"
        )


__all__ = ["OVERFLOW_WARN_SHARE", "PackReport"]
