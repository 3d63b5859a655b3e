"""`sfttrain export`: a checkpoint as a loadable HF folder (adapter or merged)."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("-o", "--output", metavar="PATH", required=True, help="Folder to write (atomically).")
@click.option("--merge", is_flag=True, help="Merge a LoRA adapter into its base model's weights.")
@click.option(
    "--dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default="fp32",
    show_default=True,
    help="Weight dtype of a merged or full model.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an OUTPUT folder that already holds files."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def command(
    checkpoint: str, output: str, merge: bool, dtype: str, overwrite: bool, as_json: bool
) -> None:
    """Write CHECKPOINT (checkpoints/step-N or final/) as a folder AutoModelForCausalLM.from_pretrained loads.

    \b
    Examples:
      sfttrain export runs/r1/final -o merged/ --merge --dtype bf16
    """
    from sfttrain.commands import quiet_libraries

    quiet_libraries()
    from sfttrain.export import export_checkpoint

    what = export_checkpoint(checkpoint, output, merge=merge, dtype=dtype, overwrite=overwrite)
    if as_json:
        import json

        click.echo(json.dumps({"wrote": what, "output": output, "merged": merge, "dtype": dtype}))
        return
    click.echo(f"wrote {what} to {output}")
