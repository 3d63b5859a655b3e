"""`sfttrain eval`: token-weighted mean loss and perplexity of a model on a shard split."""

from __future__ import annotations

from pathlib import Path

import click

from sfttrain.commands import model_options, unverified_option


@click.command("eval")
@click.argument("shards", type=click.Path(path_type=str))
@model_options(note=" (default for a run folder: its final/ weights)")
@click.option(
    "--split",
    metavar="NAME",
    default=None,
    help="Shard split (default: validation if present, else train).",
)
@click.option(
    "--batch-size",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rows per forward pass.",
)
@click.option(
    "--attn-implementation", type=click.Choice(["sdpa", "eager"]), default="sdpa", show_default=True
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object: loss, perplexity, tokens."
)
@click.option(
    "--generate",
    is_flag=True,
    help="Also generate each record's last reply from the turns before it and score it "
    "(BLEU-4, ROUGE-1/2/L); writes OUTPUT/predictions.jsonl and OUTPUT/generate_metrics.json.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Folder for --generate's predictions and metrics.")  # fmt: skip
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--max-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="--generate: only the first N records of the split.")  # fmt: skip
@click.option("--overwrite", is_flag=True,
              help="--generate: replace the predictions and metrics already in OUTPUT.")  # fmt: skip
@unverified_option
def command(
    shards: str,
    model_spec: str | None,
    adapter: str | None,
    split: str | None,
    batch_size: int,
    attn_implementation: str,
    as_json: bool,
    generate: bool,
    output: Path | None,
    max_new_tokens: int,
    max_samples: int | None,
    overwrite: bool,
    allow_unverified: bool,
) -> None:
    """Mean loss per trained token (and perplexity) of MODEL on SHARDS; packed or not, the same records give the same loss.

    SHARDS may be a run folder of `sfttrain run`: its shards (as the run recorded them, even
    in the data cache) and, without --model, its final weights.

    \b
    Examples:
      sfttrain eval shards/ --model runs/r1/final
      sfttrain eval shards/ --model runs/r1/checkpoints/step-0000500 --split validation --json
      sfttrain eval shards/ --model runs/r1/final --generate -o runs/r1/predict
      sfttrain eval runs/r1 --generate -o runs/r1/predict
    """
    import json

    from sfttrain.commands import quiet_libraries

    quiet_libraries()
    from sfttrain.evaluate import evaluate_model

    shards, model_spec = _what_to_evaluate(shards, model_spec)
    if generate and output is None:
        raise click.UsageError("--generate needs -o/--output FOLDER for its predictions")
    if output is not None:
        _check_output(output, [shards, model_spec, adapter], generate=generate, overwrite=overwrite)
    if generate:
        from sfttrain.predict import check_installed

        check_installed("--generate")
    report = evaluate_model(
        shards, model_spec, adapter=adapter, split=split, batch_size=batch_size,
        attn_implementation=attn_implementation, allow_unverified=allow_unverified,
        generate_to=output if generate else None, max_new_tokens=max_new_tokens,
        max_samples=max_samples,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    for line in report.summary_lines():
        click.echo(line)


def _what_to_evaluate(shards: str, model_spec: str | None) -> tuple[str, str]:
    """(shards, model): a run folder given as SHARDS brings both (see the command's doc)."""
    from sfttrain.rundir import run_parts

    parts = run_parts(Path(shards))
    if parts is not None:  # a run folder: the shards it trained on, its final weights
        shards = str(parts[0])
        model_spec = model_spec or str(parts[1])
    if model_spec is None:
        raise click.UsageError("--model is needed (SHARDS is not a run folder)")
    return shards, model_spec


def _check_output(output: Path, reads: list, *, generate: bool, overwrite: bool) -> None:
    """-o is none of what is read, and holds no earlier evaluation unless --overwrite."""
    from sftdata.errors import ConfigError
    from sftdata.inputs import refuse_overwriting
    from sfttrain.model import model_sources
    from sfttrain.predict import PREDICTION_FILES

    shards, model_spec, adapter = reads
    refuse_overwriting([shards, *model_sources(model_spec, adapter)], output)
    earlier = [n for n in PREDICTION_FILES if (output / n).exists()]
    if generate and earlier and not overwrite:
        raise ConfigError(
            f"{output}: already holds {earlier[0]} of an earlier evaluation; pass --overwrite "
            "to replace it, or give another -o"
        )
