"""`sftdata inspect`: show a packed row (or one record) with trained and masked tokens apart.

On a terminal trained text is green, a trained reasoning block magenta, a trained stop token
yellow, and masked text dim; when the output is piped (or with ``--plain``) trained text is
wrapped in ``[[`` ... ``]]`` (``[[reasoning: ...]]``, ``[[stop: ...]]``) and every record starts
with a line
``--- record ID (N tokens, M trained) ---``. The padding segment is summarised, not decoded.
"""

from __future__ import annotations

from pathlib import Path

import click

STYLES = {
    "masked": "dim",
    "reply": "bold green",
    "reasoning": "italic magenta",
    "stop": "bold black on yellow",
}


@click.command("inspect")
@click.argument("shards", type=click.Path(path_type=Path))
@click.option("--row", "row_i", type=int, default=None, help="Row to show [default: 0].")
@click.option(
    "--record", "record_id", default=None, help="Show the record with this id (and where it is)."
)
@click.option(
    "--split", default=None, help="Split to read [default: train; with --record: every split]."
)
@click.option(
    "--tokenizer",
    default=None,
    help="Tokenizer to decode with [default: the one recorded at pack time].",
)
@click.option("--plain", is_flag=True, help="Text markers instead of colour even on a terminal.")
def command(
    shards: Path,
    row_i: int | None,
    record_id: str | None,
    split: str | None,
    tokenizer: str | None,
    plain: bool,
) -> None:
    """Show what the model learns from a row: trained text [[like this]], masked text plain."""
    from rich.console import Console
    from rich.text import Text

    from sftdata.errors import ConfigError
    from sftdata.rowview import (
        TRAIN_CLOSE,
        TRAIN_OPEN,
        classify,
        load_decoder,
        plain_text,
        runs,
        segments,
    )
    from sftdata.shards import ShardReader

    if row_i is not None and record_id is not None:
        raise ConfigError("--row and --record: give at most one")
    seg_pick = None
    if record_id is not None:
        from sftdata.errors import ShardError

        for name in [split] if split else ShardReader.splits(shards):
            reader = ShardReader(shards, split=name)
            found = reader.find_record(record_id, missing_ok=True)
            if found is not None:
                (row_i, seg_pick), split = found, name
                break
        else:
            where = f"split {split!r}" if split else "any split"
            raise ShardError(f"{shards}: no record {record_id!r} in {where}")
    else:
        split = split or "train"
        reader = ShardReader(shards, split=split)
    row_i = 0 if row_i is None else row_i
    if not -len(reader) <= row_i < len(reader):
        raise ConfigError(f"--row {row_i}: split {split!r} of {shards} has {len(reader)} rows")
    row_i %= len(reader)
    row = reader[row_i]
    tok = load_decoder(reader.index, tokenizer)

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    segs = segments(row)
    recs = [s for s in segs if s["record_id"] is not None]
    n_trained = int(sum(s["trained"].sum() for s in recs))
    console = Console(highlight=False, soft_wrap=True, markup=False)
    colour = console.is_terminal and not plain
    header = (
        f"row {row_i} of {len(reader)} (split {split}, seq_len {reader.seq_len}): {len(recs)} records, "
        f"lengths {[len(s['ids']) for s in recs]}, padding {row['num_pad']}, "
        f"trained {n_trained} of {reader.seq_len} tokens"
    )
    stops = list(reader.index.get("template", {}).get("stop_tokens") or [])
    if stops:
        header += f"; stop tokens {', '.join(stops)}"
    if not colour:
        header += (
            f"; trained text is wrapped in {TRAIN_OPEN} {TRAIN_CLOSE}, "
            f"reasoning in {TRAIN_OPEN}reasoning: {TRAIN_CLOSE}, "
            f"the stop token in {TRAIN_OPEN}stop: {TRAIN_CLOSE}"
        )
    shown = segs if seg_pick is None else [segs[seg_pick]]
    out = [header]
    for s in shown:
        n = len(s["ids"])
        if s["record_id"] is None:
            out.append(f"--- padding ({n} tokens, not trained) ---")
            continue
        out.append(
            f"--- record {s['record_id']} ({n} tokens, {int(s['trained'].sum())} trained) ---"
        )
        pieces = classify(runs(s["ids"], s["trained"], decode), stops)
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
