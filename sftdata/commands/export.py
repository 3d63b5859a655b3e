"""`sftdata export`: shards -> MindRecord, or canonical JSONL -> ShareGPT / Alpaca / OpenAI."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sftdata.errors import ConfigError
from sftdata.text import counted

FORMATS = ("mindrecord", "sharegpt", "alpaca", "openai")


@click.command("export")
@click.argument("input_path", metavar="INPUT")  # a str: a shard folder may be a URL
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(FORMATS),
    help="mindrecord: INPUT is a shard folder from `sftdata pack`; "
    "sharegpt/alpaca/openai: INPUT is canonical JSONL from `sftdata convert`.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="File to write (MindRecord also writes OUTPUT.db beside it).",
)
@click.option(
    "--split",
    metavar="NAME",
    default="train",
    show_default=True,
    help="[mindrecord] Which split of the shards to export.",
)
@click.option(
    "--layout",
    type=click.Choice(("legacy", "mcore")),
    default="legacy",
    show_default=True,
    help="[mindrecord] legacy: rows seq_len+1, unshifted labels (llama_preprocess.py); "
    "mcore: rows seq_len, labels shifted (MindFormers' HF data handlers).",
)
@click.option(
    "--pad-token-id",
    type=int,
    default=None,
    help="[mindrecord] Id written at padding positions (default: the shards' pad id; "
    "MindFormers' LlamaTokenizer pads with 0 = <unk>).",
)
@click.option(
    "--boundaries/--no-boundaries",
    default=None,
    help="[mindrecord] Write the actual_seq_len column of packed record boundaries "
    "(default: when rows hold several records).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def command(
    input_path: str,
    fmt: str,
    output: Path,
    split: str,
    layout: str,
    pad_token_id: int | None,
    boundaries: bool | None,
    as_json: bool,
) -> None:
    """Write data for other training stacks: MindSpore (MindRecord), FastChat, LLaMA-Factory, TRL.

    \b
    Examples:
      sftdata export data.jsonl --format sharegpt -o data_sharegpt.json
      sftdata export shards/ --format mindrecord -o train.mindrecord
    """
    from sftdata.inputs import readable

    if fmt == "mindrecord":
        from sftdata.export.mindrecord import export_mindrecord
        from sftdata.remote import is_url, local_path, localize

        rep = export_mindrecord(
            localize(input_path) if is_url(input_path) else local_path(input_path),
            output,
            split=split,
            layout=layout,
            pad_token_id=pad_token_id,
            boundaries=boundaries,
        )
        if as_json:
            click.echo(json.dumps({"format": fmt, "output": str(rep.output), "rows": rep.rows,
                                   "row_len": rep.row_len, "columns": list(rep.columns),
                                   "layout": rep.layout}))  # fmt: skip
            return
        click.echo(
            f"wrote {counted(rep.rows, 'row')} of {rep.row_len} tokens ({', '.join(rep.columns)}; "
            f"{rep.layout} layout) to {rep.output} and {rep.output}.db"
        )
        return
    ctx = click.get_current_context()
    for name in ("split", "layout", "pad_token_id", "boundaries"):
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            raise ConfigError(f"--{name.replace('_', '-')} only applies to --format mindrecord")
    from sftdata.export.chat import export_conversations

    with readable([input_path]) as (path,):
        report = export_conversations(Path(path), output, fmt=fmt)
    to_stderr = str(output) == "-"  # stdout holds the exported data
    if as_json:
        out = {"format": fmt, "output": str(report.output), "records": report.records_out}
        click.echo(json.dumps(out), err=to_stderr)
        return
    click.echo(
        f"wrote {counted(report.records_out, 'record')} to {report.output} ({fmt})", err=to_stderr
    )
