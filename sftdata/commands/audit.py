"""`sftdata audit`: is a dataset fit to train on? (``sftdata.audit``)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from sftdata.audit.checks import CHECKS, DEFAULT_FAIL_ON
from sftdata.clickutil import format_option
from sftdata.commands.pack import pack_option


@click.command("audit")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@pack_option(
    "tokenizer", metavar="PATH", required=False, default=None,
    help="'tiny', an HF tokenizer folder or a .model file (from a shard folder's index when one "
    "is given).",
)  # fmt: skip
@pack_option("template", metavar="NAME")
@pack_option("train_on")
@pack_option("special_text")
@pack_option(
    "missing_stop",
    help="As for pack: with 'allow', replies the template ends without a stop token are "
    "no_stop findings (failing by default).",
)
@pack_option(
    "seq_len", metavar="N", required=False, default=None, help="Count the records longer than this."
)
@click.option(
    "--validation",
    "validation",
    multiple=True,
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Canonical JSONL of the validation split: leakage is checked against it (repeatable).",
)
@click.option(
    "--eval",
    "eval_files",
    multiple=True,
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="An evaluation file in any format convert reads: contamination (shared 13-grams) is checked against it (repeatable).",
)
@click.option(
    "--sample",
    type=int,
    metavar="N",
    default=None,
    help="Records the second renderer checks (default: all, up to 100,000; then an even sample of that many).",
)
@click.option(
    "--threshold",
    type=float,
    metavar="X",
    default=0.8,
    show_default=True,
    help="Jaccard similarity from which records are near duplicates.",
)
@click.option(
    "--fail-on",
    metavar="CHECK[>RATE],...",
    default=DEFAULT_FAIL_ON,
    show_default=True,
    help=f"Checks that make the exit code 1 when their share passes RATE (default 0; 'none': never). Checks: {', '.join(CHECKS)}.",
)
@format_option("github: also print annotations for GitHub Actions.")
@click.option(
    "--junit",
    type=click.Path(path_type=Path),
    metavar="PATH",
    default=None,
    help="Write a JUnit XML report (a test case per check).",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path),
    metavar="PATH",
    default=None,
    help="Write one self-contained page: the summary, histograms, each check's records and a "
    "viewer of their tokens.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@pack_option("num_proc")
def command(
    inputs: tuple[Path, ...], tokenizer: str, template: str, train_on: str, special_text: str,
    missing_stop: str, seq_len: int | None,
    validation: tuple[Path, ...], eval_files: tuple[Path, ...], sample: int | None,
    threshold: float, fail_on: str, fmt: str, junit: Path | None, html_file: Path | None,
    as_json: bool, num_proc: int,
) -> None:  # fmt: skip
    """Check canonical JSONL before training: masks re-derived by a second renderer
    (transformers' apply_chat_template), stops, control tokens, length, exact and near
    duplicates, leakage into --validation, contamination from --eval, and content.

    Given a shard folder (and the JSONL it was packed from, or found beside it), the tokenizer,
    template, seq-len and options come from its index, and its validation split is checked for
    leakage. Exit code 1 when a --fail-on check fails.

    \b
    Examples:
      sftdata audit data.jsonl --tokenizer /models/qwen2.5
      sftdata audit train.jsonl --validation val.jsonl --eval mmlu.jsonl --tokenizer tiny --json
      sftdata audit data.jsonl --tokenizer tiny --format github --junit audit.xml
      sftdata audit shards/ data.jsonl --html audit.html
    """
    from sftdata.atomic import atomic_file
    from sftdata.audit import AuditOptions, audit
    from sftdata.audit.output import github, table
    from sftdata.audit.output import junit as junit_xml
    from sftdata.pack import PackOptions

    settings = {"tokenizer": tokenizer, "template": template, "train_on": train_on,
                "special_text": special_text, "missing_stop": missing_stop, "seq_len": seq_len}  # fmt: skip
    files, val_ids = _inputs(inputs, settings)
    if settings["tokenizer"] is None:
        raise click.UsageError("--tokenizer is required (or a shard folder packed from the data)")
    for p in (*files, *validation, *eval_files):
        if not p.is_file():
            raise click.UsageError(f"{p}: not a file")
    seq_len = settings.pop("seq_len")
    opts = PackOptions(seq_len=1 << 62, num_proc=max(num_proc, 1), **settings)
    aopts = AuditOptions(
        validation=tuple(map(str, validation)), eval_files=tuple(map(str, eval_files)),
        sample=sample, threshold=threshold, fail_on=fail_on, validation_ids=val_ids,
    )  # fmt: skip
    report = audit(files, opts, aopts, seq_len=seq_len, views=html_file is not None)
    if html_file is not None:
        from sftdata.audit.page import page

        with atomic_file(html_file) as f:
            f.write(page(report))
    if junit is not None:
        with atomic_file(junit) as f:
            f.write(junit_xml(report))
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        if fmt == "github":
            for line in github(report):
                click.echo(line)
        click.echo(table(report), err=fmt == "github")
    click.get_current_context().exit(1 if report.failed else 0)


def _inputs(inputs: tuple[Path, ...], settings: dict) -> tuple[list[Path], frozenset[str]]:
    """The JSONL files to audit and the validation split's record ids; a shard folder among
    ``inputs`` fills ``settings`` from its index where the command line did not set them."""
    folders = [p for p in inputs if p.is_dir()]
    files = [p for p in inputs if not p.is_dir()]
    if not folders:
        return files, frozenset()
    if len(folders) > 1:
        raise click.UsageError("give at most one shard folder")
    from sftdata.audit import from_shards

    shards = from_shards(folders[0], files)
    ctx = click.get_current_context()
    for name, value in shards.settings.items():
        if ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            settings[name] = value
    return list(shards.inputs), shards.validation_ids
