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
    from sfttrain.config import build_config
    from sfttrain.data import check_compatible, has_split, open_split
    from sfttrain.distributed import Dist
    from sfttrain.evaluate import evaluate, perplexity
    from sfttrain.loss import LossModel, isolation_for
    from sfttrain.model import load_for_inference

    shards, model_spec = _what_to_evaluate(shards, model_spec)
    if generate and output is None:
        raise click.UsageError("--generate needs -o/--output FOLDER for its predictions")
    if output is not None:
        _check_output(output, [shards, model_spec, adapter], generate=generate, overwrite=overwrite)
    if generate:
        from sfttrain.predict import check_installed

        check_installed("--generate")
    if split is None:
        split = "validation" if has_split(shards, "validation") else "train"
    reader = open_split(shards, split, verify="full")
    from sfttrain.checkpoint import verify_before_use

    verify_before_use(model_spec, adapter, allow_unverified=allow_unverified)
    model, tokenizer = load_for_inference(
        model_spec, adapter=adapter, attn_implementation=attn_implementation
    )
    check_compatible(reader.index, tokenizer, model, shards_dir=reader.path, model_spec=model_spec)
    loss_model = LossModel(
        model, isolation=isolation_for(build_config({"attn_implementation": attn_implementation}))
    )
    import contextlib

    dist = Dist()  # the GPU when there is one (the model comes back on the CPU)
    loss_model = loss_model.to(dist.device)
    loss, tokens = evaluate(
        loss_model, reader, batch_size=batch_size, dist=dist, autocast=contextlib.nullcontext
    )
    ppl = perplexity(loss) if tokens else float("nan")
    # no trained token: no loss to report (JSON has no NaN; a strict parser refuses one)
    result: dict = {"loss": loss if tokens else None, "perplexity": ppl if tokens else None,
                    "tokens": tokens, "split": split}  # fmt: skip
    if generate:
        from sfttrain.predict import predict, scores, write_predictions

        rows = predict(
            model, tokenizer, reader, max_new_tokens=max_new_tokens, batch_size=batch_size,
            limit=max_samples, device=dist.device,
        )  # fmt: skip
        result |= scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
        result["predicted"] = len(rows)
        write_predictions(rows, result, output)
    if as_json:
        click.echo(json.dumps(result))
        return
    _echo(result, output)


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


def _echo(result: dict, output: Path | None) -> None:
    split, tokens = result["split"], result["tokens"]
    loss, ppl = result["loss"] or float("nan"), result["perplexity"] or float("nan")
    click.echo(f"{split}: loss {loss:.4f}, perplexity {ppl:.2f} over {tokens:,} trained tokens")
    if "predicted" in result:
        click.echo(
            f"{split}: {result['predicted']:,} replies generated: BLEU-4 {result['bleu-4']:.2f}, "
            f"ROUGE-1 {result['rouge-1']:.2f}, ROUGE-2 {result['rouge-2']:.2f}, "
            f"ROUGE-L {result['rouge-l']:.2f}; predictions in {output}/predictions.jsonl"
        )
