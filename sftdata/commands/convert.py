"""`sftdata convert INPUT... -o OUT.jsonl`: raw Q&A data of any shape → canonical JSONL."""

from __future__ import annotations

import click

FORMAT_CHOICES = (
    "auto", "alpaca", "sharegpt", "openai", "lf_v1", "csv", "tsv", "xlsx", "parquet", "hf",
)  # fmt: skip


@click.command("convert")
@click.argument("inputs", nargs=-1, required=False, metavar="INPUT...")  # '-': standard input
@click.option("-o", "--output", required=True, metavar="PATH", help="Canonical JSONL to write.")
@click.option(
    "--from",
    "fmt",
    type=click.Choice(FORMAT_CHOICES),
    default="auto",
    show_default=True,
    help="Input format; auto detects it from the extension, then the first record.",
)
@click.option(
    "--map",
    "map_",
    metavar="SRC=DST,...",
    help="Map raw fields/columns onto instruction/input/output/system/history "
    "(or conversations/messages/tools/id), e.g. 问题=instruction,背景=input,回应=output.",
)
@click.option("--sheet", metavar="NAME", help="Worksheet of .xlsx inputs (default: the first).")
@click.option("--encoding", metavar="NAME", help="Text encoding of CSV/TSV/JSON (default utf-8).")
@click.option("--system", metavar="TEXT", help="System prompt to add (replaces a record's own).")
@click.option("--dedup", is_flag=True, help="Drop exact duplicate records (messages and tools).")
@click.option("--skip-invalid", is_flag=True, help="Count and skip bad records instead of failing.")
@click.option(
    "--dataset-info",
    metavar="PATH",
    help="LLaMA-Factory dataset_info.json (or its folder): read the --dataset entries it registers.",
)
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    metavar="NAME[,NAME...]",
    help="Registry entries to convert (with --dataset-info; comma-separated or repeated).",
)
@click.option("--json", "as_json", is_flag=True, help="Also print the report as one JSON object.")
def command(
    inputs: tuple[str, ...],
    output: str,
    fmt: str,
    map_: str | None,
    sheet: str | None,
    encoding: str | None,
    system: str | None,
    dedup: bool,
    skip_invalid: bool,
    dataset_info: str | None,
    datasets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Convert Alpaca, ShareGPT, OpenAI, LLaMA-Factory v1, CSV/TSV and Excel files into one
    canonical conversations JSONL (several inputs are concatenated).

    \b
    Examples:
      sftdata convert alpaca_en_demo.json -o data.jsonl
      sftdata convert qa.csv --map question=instruction,answer=output -o data.jsonl
      sftdata convert --dataset-info data/dataset_info.json --dataset identity,alpaca_en_demo -o data.jsonl
    """
    from sftdata.convert import convert
    from sftdata.errors import RecordError
    from sftdata.inputs import readable, unspool_message
    from sftdata.sources import parse_mapping

    def log(line: str) -> None:
        click.echo(unspool_message(line), err=True)

    with readable(list(inputs)) as paths:
        sources: list = list(paths)
        if dataset_info or datasets:
            from sftdata.sources.registry import registry_inputs

            sources += registry_inputs(dataset_info, datasets, fmt=fmt, mapping=map_, log=log)
        elif not inputs:
            raise click.UsageError("give INPUT files, or --dataset-info PATH --dataset NAME")
        try:
            report = convert(
                sources,
                output,
                fmt=fmt,
                mapping=parse_mapping(map_) if map_ else None,
                sheet=sheet,
                encoding=encoding,
                system=system,
                dedup=dedup,
                skip_invalid=skip_invalid,
                log=log,
            )
        except RecordError as e:  # one record, not the file: say how to go on without it
            raise RecordError(
                f"{e} (--skip-invalid skips such records, naming each)", reason=e.reason
            ) from None
    for message in report.examples:
        log(f"skipped {message}")
    shown = len(report.examples)
    skipped = sum(n for r, n in report.dropped.items() if r != "duplicate")
    if skipped > shown:
        log(f"... and {skipped - shown} more skipped records")
    for line in report.summary_lines():
        log(line)
    if as_json:
        import json

        # with -o -, stdout holds the records: the report goes with the others, to stderr
        click.echo(json.dumps(report.to_dict()), err=output == "-")
