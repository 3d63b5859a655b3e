"""`sfttrain export`: a checkpoint as a loadable HF folder (adapter or merged)."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, help="Folder to write (replaced atomically).")
@click.option("--merge", is_flag=True, help="Merge a LoRA adapter into its base model's weights.")
@click.option(
    "--dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default="fp32",
    show_default=True,
    help="Weight dtype of a merged or full model.",
)
def command(checkpoint: str, output: str, merge: bool, dtype: str) -> None:
    """Write CHECKPOINT (checkpoints/step-N or final/) as a folder AutoModelForCausalLM.from_pretrained loads."""
    from sfttrain.commands.run import _quiet_libraries

    _quiet_libraries()
    from sfttrain.export import export_checkpoint

    what = export_checkpoint(checkpoint, output, merge=merge, dtype=dtype)
    click.echo(f"wrote {what} to {output}")
