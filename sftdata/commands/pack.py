"""`sftdata pack`: canonical JSONL -> packed, label-masked, memory-mapped Arrow shards."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sftdata.pack import OVERFLOW
from sftdata.render import MISSING_STOP, SPECIAL_TEXT, TRAIN_ON
from sftdata.templates import DEFAULT_TEMPLATE_DATE


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
@click.option(
    "--tokenizer",
    metavar="PATH",
    required=True,
    help="'tiny', a local HF tokenizer folder or a SentencePiece .model file.",
)
@click.option("--seq-len", required=True, type=int, help="Row length in tokens.")
@click.option(
    "--template",
    metavar="NAME",
    default="auto",
    show_default=True,
    help="auto (the tokenizer's chat_template), a built-in (chatml, llama2, alpaca, qwen2.5, qwen3, llama3, mistral, gemma, gemma3, phi3, phi4, deepseek3, glm4, gpt-oss, cohere), a LLaMA-Factory template name, fastchat:NAME or FILE.jinja.",
)
@click.option(
    "--train-on",
    default="all-assistant",
    show_default=True,
    type=click.Choice(TRAIN_ON),
    help="Trained turns when a message has no 'train' flag (the flag always wins).",
)
@click.option(
    "--overflow",
    default="drop",
    show_default=True,
    type=click.Choice(OVERFLOW),
    help=(
        "Records longer than --seq-len: drop and count, keep the first seq-len tokens, cut each "
        "prompt/answer pair in proportion as LLaMA-Factory's cutoff_len does, or stop."
    ),
)
@click.option(
    "--special-text",
    default="refuse",
    show_default=True,
    type=click.Choice(SPECIAL_TEXT),
    help=(
        "A record whose own text (any role, reasoning, tool calls, results, schemas) holds a "
        "special token of the tokenizer, e.g. '<|im_end|>': refuse it (file:line), split (encode "
        "that text as plain text) or keep (encode the token: a forged turn if trained)."
    ),
)
@click.option(
    "--missing-stop",
    default="append",
    show_default=True,
    type=click.Choice(MISSING_STOP),
    help=(
        "A trained reply after which the template writes no stop token (GLM-4's last reply): "
        "append the model's stop token (trained), error, or allow (train replies without one)."
    ),
)
@click.option("--no-pack", is_flag=True, help="One record per row, padded (no packing).")
@click.option(
    "--val-fraction",
    type=float,
    default=None,
    help="Hold out this fraction of records as 'validation'.",
)
@click.option(
    "--val-count", type=int, default=None, help="Hold out this many records as 'validation'."
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the validation pick and row shuffle.",
)
@click.option(
    "--num-proc",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes that encode and write shards (the output is identical).",
)
@click.option(
    "--shard-size",
    type=int,
    default=None,
    help="Rows per shard file [default: about 64 MB per file].",
)
@click.option(
    "--template-date",
    metavar="DATE",
    default=DEFAULT_TEMPLATE_DATE,
    show_default=True,
    help="The date templates print (strftime_now, date_string), fixed so packs reproduce.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse records that need a fold-in (e.g. a system prompt merged into the first user "
    "turn for a template without a system role) instead of folding them in.",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Skip records the template cannot render (listed and counted) instead of stopping.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Pack only the first N records of the inputs (LLaMA-Factory's max_samples).",
)
@click.option(
    "--allow-long",
    is_flag=True,
    help="Allow a --seq-len past the tokenizer's model_max_length / the model's "
    "max_position_embeddings (e.g. for a model you will extend with RoPE scaling).",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an output folder that holds something else."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def command(
    inputs: tuple[Path, ...],
    output: str,
    no_pack: bool,
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
    from sftdata.pack import PackOptions, pack

    opts = PackOptions(pack=not no_pack, **options)  # the other options are PackOptions' fields
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
