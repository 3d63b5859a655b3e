"""`sftdata inspect`: show a packed row (or one record) with trained and masked tokens apart.

On a terminal trained text is green, a trained reasoning block magenta, a trained stop token
yellow, and masked text dim; when the output is piped (or with ``--plain``) trained text is
wrapped in ``[[`` ... ``]]`` (``[[reasoning: ...]]``, ``[[stop: ...]]``) and every record starts
with a line
``--- record ID (N tokens, M trained) ---``. The padding segment is summarised, not decoded.
"""

from __future__ import annotations

from typing import Any

import click

STYLES = {
    "masked": "dim",
    "reply": "bold green",
    "reasoning": "italic magenta",
    "stop": "bold black on yellow",
}


@click.command("inspect")
@click.argument("shards", type=click.Path(path_type=str))
@click.option("--row", "row_i", type=int, default=None, help="Row to show [default: 0].")
@click.option(
    "--record",
    "record_id",
    metavar="ID",
    default=None,
    help="Show the record with this id (and where it is).",
)
@click.option(
    "--split",
    metavar="NAME",
    default=None,
    help="Split to read [default: train; with --record: every split].",
)
@click.option(
    "--tokenizer",
    metavar="PATH",
    default=None,
    help="Tokenizer to decode with [default: the one recorded at pack time].",
)
@click.option("--plain", is_flag=True, help="Text markers instead of colour even on a terminal.")
def command(
    shards: str,
    row_i: int | None,
    record_id: str | None,
    split: str | None,
    tokenizer: str | None,
    plain: bool,
) -> None:
    """Show what the model learns from a row: trained text [[like this]], masked text plain.

    \b
    Examples:
      sftdata inspect shards/ --row 3
      sftdata inspect shards/ --record ID --plain   # ID as in data.jsonl
    """
    from rich.console import Console
    from rich.text import Text

    from sftdata.remote import is_url, local_path, localize
    from sftdata.rowview import (
        classify,
        load_decoder,
        locate_row,
        plain_text,
        row_header,
        runs,
        visible,
    )

    folder = localize(shards) if is_url(shards) else local_path(shards)  # a URL: the verified cache
    view = locate_row(folder, row_i=row_i, record_id=record_id, split=split)
    tok = load_decoder(view.reader.index, tokenizer)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    console = Console(highlight=False, soft_wrap=True, markup=False)
    colour = console.is_terminal and not plain
    out: list[Any] = [row_header(view, markers=not colour)]
    for s in view.shown:
        n = len(s["ids"])
        if s["record_id"] is None:
            out.append(f"--- padding ({n} tokens, not trained) ---")
            continue
        out.append(
            f"--- record {visible(s['record_id'])} ({n} tokens, {int(s['trained'].sum())} trained) ---"
        )
        pieces = classify(runs(s["ids"], s["trained"], decode), view.stop_tokens)
        if colour:
            text = Text()
            for kind, t in pieces:
                text.append(t, style=STYLES[kind])
            out.append(text)
        else:
            out.append(plain_text(pieces))
    if colour:
        for item in out:
            console.print(
                item,
                style="bold cyan"
                if isinstance(item, str) and item.startswith(("---", "row "))
                else None,
            )
    else:
        click.echo("\n".join(str(x) for x in out))
