"""`sfttrain export`: a checkpoint as a loadable HF folder (adapter or merged), or one GGUF file."""

from __future__ import annotations

import click

from sfttrain.commands import unverified_option


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option(
    "-o",
    "--output",
    metavar="PATH",
    required=True,
    help="Folder to write (hf), or the .gguf file (gguf); written atomically.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "gguf"]),
    default="hf",
    show_default=True,
    help="hf: a transformers folder; gguf: one file for llama.cpp (a LoRA checkpoint is merged first).",
)
@click.option(
    "--merge", is_flag=True, help="Merge a LoRA adapter into its base model's weights (hf)."
)
@click.option(
    "--dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default="fp32",
    show_default=True,
    help="Weight dtype of a merged or full model (hf).",
)
@click.option(
    "--quant",
    metavar="NAME",
    default=None,
    help="gguf tensor type: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1, or a k-quant "
    "through llama.cpp (the gguf extra): q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k.",
)
@click.option("--overwrite", is_flag=True, help="Replace an OUTPUT that already exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@unverified_option
def command(
    checkpoint: str,
    output: str,
    fmt: str,
    merge: bool,
    dtype: str,
    quant: str | None,
    overwrite: bool,
    as_json: bool,
    allow_unverified: bool,
) -> None:
    """Write CHECKPOINT (checkpoints/step-N, final/, an HF folder or tiny) for loading elsewhere.

    \b
    Examples:
      sfttrain export runs/r1/final -o merged/ --merge --dtype bf16
      sfttrain export runs/r1/final --format gguf --quant q8_0 -o model-q8_0.gguf
      sfttrain export runs/r1/final --format gguf --quant q4_k_m -o model-q4_k_m.gguf
    """
    import json

    from sftdata.errors import ConfigError
    from sfttrain.commands import quiet_libraries

    quiet_libraries()
    from sfttrain.checkpoint import verify_before_use

    verify_before_use(checkpoint, allow_unverified=allow_unverified)
    if fmt == "gguf":
        if dtype != "fp32" or merge:
            raise ConfigError(
                "--dtype and --merge are for --format hf; a GGUF export always merges and takes --quant"
            )
        from dataclasses import asdict

        from sfttrain.export.gguf import export_gguf

        report = export_gguf(checkpoint, output, quant=quant or "f16", overwrite=overwrite)
        if as_json:
            click.echo(json.dumps(asdict(report)))
            return
        size = report.bytes / 2**20
        click.echo(
            f"wrote {report.output} ({report.architecture}, {report.quant}, {report.tensors} tensors, "
            f"{size:.1f} MiB{', adapter merged' if report.merged else ''})"
        )
        if report.f16_fallback:
            click.echo(
                f"{len(report.f16_fallback)} matrices kept f16 (rows not whole {report.quant} blocks): "
                + ", ".join(report.f16_fallback[:5])
            )
        if report.k_fallback:
            click.echo(
                f"{len(report.k_fallback)} of {report.tensors} tensors in llama.cpp's fallback "
                f"types (rows not whole 256-value k-blocks): " + ", ".join(report.k_fallback[:5])
            )
        return
    if quant is not None:
        raise ConfigError("--quant is for --format gguf; an hf export takes --dtype")
    from sfttrain.export.hf import export_checkpoint

    what = export_checkpoint(checkpoint, output, merge=merge, dtype=dtype, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps({"wrote": what, "output": output, "merged": merge, "dtype": dtype}))
        return
    click.echo(f"wrote {what} to {output}")
