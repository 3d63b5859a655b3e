"""`sftdata pack`: canonical JSONL -> packed, label-masked, memory-mapped Arrow shards."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sftdata.clickutil import field_option
from sftdata.pack.options import PackOptions

pack_option = functools.partial(field_option, PackOptions)
"""A pack option, declared once: by its :class:`PackOptions` field (type, default, help)."""


@click.command("pack")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    metavar="PATH",
    help="Shard folder to write, or an object-storage URL (s3://, gs://, az://: built here, "
    "uploaded with index.json last).",
)
@pack_option("tokenizer", metavar="PATH")
@pack_option("seq_len")
@pack_option("template", metavar="NAME")
@pack_option("train_on")
@pack_option("overflow")
@pack_option("special_text")
@pack_option("missing_stop")
@pack_option("pack")
@pack_option("val_fraction")
@pack_option("val_count")
@pack_option("seed")
@pack_option("num_proc")
@pack_option("shard_size")
@pack_option("template_date", metavar="DATE")
@pack_option("strict")
@pack_option("skip_invalid")
@pack_option("max_samples")
@pack_option("allow_long")
@click.option(
    "--overwrite", is_flag=True, help="Replace an output folder that holds something else."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def command(
    inputs: tuple[Path, ...],
    output: str,
    overwrite: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Render, mask, pack and shard canonical JSONL files (from `sftdata convert`).

    Writes OUTPUT/index.json (last, atomically) and OUTPUT/<split>-NNNNN.arrow. Running it again
    with the same inputs and options does nothing; changing any of them rebuilds.

    \b
    Examples:
      sftdata pack data.jsonl -o shards/ --tokenizer tiny --seq-len 1024
      sftdata pack data.jsonl -o shards/ --tokenizer /models/qwen2.5 --template qwen2.5 --seq-len 4096 --val-fraction 0.05 --num-proc 4
      sftdata pack data.jsonl -o shards/ --tokenizer tiny --seq-len 512 --overflow truncate --max-samples 1000
      sftdata pack data.jsonl -o shards/ --tokenizer tiny --seq-len 1024 --special-text split
      sftdata pack data.jsonl -o s3://bucket/sft/shards --tokenizer tiny --seq-len 1024
    """
    from sftdata.inputs import readable
    from sftdata.pack import pack

    opts = PackOptions(**options)  # every other option is a PackOptions field
    bar, progress = _progress()
    with readable([str(p) for p in inputs]) as paths, bar:  # '-', pipes and FIFOs read once
        report = pack(paths, output, opts, overwrite=overwrite, progress=progress)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        for line in report.warnings():
            click.echo(line, err=True)
        return
    _echo_report(report)


def _progress() -> tuple[Any, Callable[[str, int, int | None], None]]:
    """A transient rich bar per stage on stderr (hidden when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    tasks: dict[str, int] = {}

    def progress(stage: str, done: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, progress


def _echo_report(report: Any) -> None:
    # stderr, as convert's: stdout carries only data and --json documents
    for line in report.summary_lines():
        click.echo(line, err=True)
    for line in report.warnings():
        click.echo(line, err=True)
