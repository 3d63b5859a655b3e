"""`sftdata stats`: token-length distribution, trained ratio and packing efficiency.

Works on a shard folder (reads its rows) or on canonical JSONL files (renders and tokenizes
them with ``--tokenizer``/``--template``/``--train-on`` and packs them in memory at ``--seq-len``
to show the efficiency ``pack`` would get).
"""

from __future__ import annotations

from pathlib import Path

import click

from sftdata.commands.pack import pack_option


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
    from sftdata.remote import is_url, local_path, localize
    from sftdata.stats import folder_stats, jsonl_stats, write_histogram

    # a shard folder's URL: read from the node-local cache, each shard checked
    paths = [localize(p) if is_url(p) else local_path(p) for p in inputs]
    if plot is not None:
        refuse_overwriting(paths, plot)
    if len(paths) == 1 and paths[0].is_dir():
        report = folder_stats(paths[0])
    else:
        if tokenizer is None:
            raise ConfigError("--tokenizer is needed to count tokens of JSONL input")
        for p in paths:
            if p.is_dir():
                raise ConfigError(f"{p}: a folder among JSONL inputs (give one shard folder alone)")
        with readable([str(p) for p in paths]) as files:  # '-', pipes and FIFOs read once
            report = jsonl_stats(
                files, names=[p.name for p in paths], tokenizer=tokenizer, template=template,
                train_on=train_on, seq_len=seq_len,
            )  # fmt: skip
    lines = report.summary_lines()
    if plot is not None:
        write_histogram(report.lengths, plot, title=report.title, seq_len=report.seq_len)
        lines.append(f"histogram written to {plot}")
    if as_json:
        import json

        click.echo(json.dumps(report.to_dict()))
        return
    click.echo("\n".join(lines))
