"""`sftdata validate FILE...`: schema + structural checks of canonical JSONL, every problem."""

from __future__ import annotations

import json

import click

from sftdata.clickutil import format_option
from sftdata.text import counted


@click.command("validate")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@format_option("text: file:line: problem; github: GitHub Actions ::error annotations.")
@click.option(
    "--tokenizer",
    metavar="PATH",
    default=None,
    help="Also check that no record's text holds a special token of this tokenizer "
    "(what sftdata pack refuses).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")
def command(files: tuple[str, ...], fmt: str, tokenizer: str | None, as_json: bool) -> None:
    """Check canonical conversation JSONL files; exit 0 only when every file is clean.

    \b
    Examples:
      sftdata validate data.jsonl
      sftdata validate data.jsonl --json > report.json
      sftdata validate data.jsonl --tokenizer /models/qwen2.5
    """
    from sftdata.inputs import readable, unspool_message
    from sftdata.validate import github_annotation, validate_file

    control, name = None, ""
    if tokenizer is not None:
        from sftdata.render import ControlTokens
        from sftdata.tokenizer import tokenizer_name
        from sftdata.tokenizer_cache import load_snapshot

        snap = load_snapshot(tokenizer)
        control, name = ControlTokens.of(snap.backend_tokenizer), tokenizer_name(snap)
    with readable(list(files)) as paths:  # '-', pipes and FIFOs read once
        reports = [validate_file(f, control=control, tokenizer=name) for f in paths]
    problems = [p for r in reports for p in r.problems]
    if as_json:
        doc = {
            "ok": not problems,
            "records": sum(r.records for r in reports),
            "problems": len(problems),
            "files": [r.to_dict() for r in reports],
        }
        click.echo(unspool_message(json.dumps(doc, ensure_ascii=False, indent=2)))
    else:
        for p in problems:
            click.echo(unspool_message(github_annotation(p) if fmt == "github" else str(p)))
        for r in reports:
            status = "ok" if r.ok else counted(len(r.problems), "problem")
            click.echo(
                unspool_message(f"{r.file}: {counted(r.records, 'record')}, {status}"), err=True
            )
    click.get_current_context().exit(0 if not problems else 1)
