"""`sftdata stats`: token-length distribution, trained ratio and packing efficiency.

Works on a shard folder (reads its rows) or on canonical JSONL files (renders and tokenizes
them with ``--tokenizer``/``--template``/``--train-on`` and packs them in memory at ``--seq-len``
to show the efficiency ``pack`` would get).
"""

from __future__ import annotations

from pathlib import Path

import click

from sftdata.commands.pack import pack_option
from sftdata.text import counted


@click.command("stats")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a length histogram PNG here.",
)
@pack_option(
    "tokenizer", metavar="PATH", required=False, default=None,
    help="For JSONL input: 'tiny', an HF tokenizer folder or a .model file.",
)  # fmt: skip
@pack_option("template", metavar="NAME", help="For JSONL input: the chat template.")
@pack_option("train_on", help="For JSONL input.")
@pack_option(
    "seq_len", required=False, default=None,
    help="For JSONL input: estimate packing efficiency at this length.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def command(
    inputs: tuple[str, ...],
    plot: Path | None,
    tokenizer: str | None,
    template: str,
    train_on: str,
    seq_len: int | None,
    as_json: bool,
) -> None:
    """Token-length distribution, trained ratio and packing efficiency of a shard folder or JSONL files.

    \b
    Examples:
      sftdata stats shards/
      sftdata stats data.jsonl --tokenizer tiny --seq-len 1024 --plot lengths.png
    """
    from sftdata.errors import ConfigError
    from sftdata.inputs import readable, refuse_overwriting
    from sftdata.remote import is_url, localize
    from sftdata.stats import (
        jsonl_lengths,
        packing_estimate,
        shard_lengths,
        summarize,
        write_histogram,
    )

    # a shard folder's URL: read from the node-local cache, each shard checked
    inputs = tuple(localize(p) if is_url(p) else Path(p) for p in inputs)  # type: ignore[assignment]
    lines = []
    if plot is not None:
        refuse_overwriting(inputs, plot)
    if len(inputs) == 1 and inputs[0].is_dir():
        lens, trained, index = shard_lengths(inputs[0])
        c = index["counts"]
        seq = int(index["seq_len"])
        packing = {"packing_efficiency": c["packing_efficiency"], "rows": c["rows"]}
        eff_line = (
            f"packing efficiency {c['packing_efficiency']:.2%} ({c['rows']:,} rows of {seq}; "
            f"{'packed' if index['packed'] else 'not packed'})"
        )
        title = f"{inputs[0].name}: {len(lens):,} records"
    else:
        if tokenizer is None:
            raise ConfigError("--tokenizer is needed to count tokens of JSONL input")
        for p in inputs:
            if p.is_dir():
                raise ConfigError(f"{p}: a folder among JSONL inputs (give one shard folder alone)")
        with readable([str(p) for p in inputs]) as paths:  # '-', pipes and FIFOs read once
            lens, trained = jsonl_lengths(
                paths, tokenizer=tokenizer, template=template, train_on=train_on
            )
        seq = seq_len
        eff_line = None
        packing = {}
        if seq_len:
            eff, rows, left_out = packing_estimate(lens, seq_len)
            packing = {"packing_efficiency": eff, "rows": rows, "left_out": left_out}
            eff_line = (
                f"packing efficiency {eff:.2%} at seq_len {seq_len} ({rows:,} rows; "
                f"{counted(left_out, 'record')} longer than seq_len left out)"
            )
        title = f"{', '.join(p.name for p in inputs)}: {len(lens):,} records"
    s = summarize(lens, trained)
    lines.append(
        f"records {s['records']:,}; tokens {s['tokens']:,}; trained {s['trained_tokens']:,}"
    )
    if s["records"]:
        lines.append(
            f"tokens per record: min {s['min']:,}, median {s['median']:,}, p90 {s['p90']:,}, "
            f"p99 {s['p99']:,}, max {s['max']:,}"
        )
    lines.append(f"trained ratio {s['trained_ratio']:.1%}")
    if eff_line:
        lines.append(eff_line)
    if plot is not None:
        write_histogram(lens, plot, title=title, seq_len=seq)
        lines.append(f"histogram written to {plot}")
    if as_json:
        import json

        click.echo(json.dumps({**s, **packing, "seq_len": seq}))
        return
    click.echo("\n".join(lines))
