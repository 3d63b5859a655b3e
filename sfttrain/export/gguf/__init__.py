"""``sfttrain export --format gguf``: a checkpoint or model as one GGUF file llama.cpp runs.

Written with the ``gguf`` package (llama.cpp's own Python writer): architecture keys
(``arch``), the tokenizer (``vocab``) and every tensor under llama.cpp's name in the chosen type
(``quant``). A LoRA checkpoint is merged into its full-precision base first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sftdata.errors import ConfigError
from sfttrain.export.gguf.quant import K_QUANTS, QUANTS, check_quant, writable


@dataclass
class GGUFReport:
    """What one GGUF export wrote."""

    output: str
    """The file written."""
    quant: str
    """The ``--quant`` type of its matrices."""
    architecture: str
    """llama.cpp's architecture name."""
    tensors: int
    """Tensors written."""
    bytes: int
    """Size of the file."""
    merged: bool
    """A LoRA adapter was merged into its base first."""
    f16_fallback: list[str] = field(default_factory=list)
    """Matrices written f16 because their rows are not whole quantisation blocks."""
    k_fallback: list[str] = field(default_factory=list)
    """k-quants: matrices llama.cpp wrote in another type (``"NAME: TYPE"``), their rows not
    whole 256-value k-blocks."""


def check_output_file(out: Path, *, overwrite: bool) -> None:
    """One line for an output that is a folder, or a file that exists without ``overwrite``."""
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; -o names the .gguf file to write")
    if out.exists() and not overwrite:
        raise ConfigError(
            f"{out}: already exists; pass --overwrite to replace it, or give another -o"
        )


def export_gguf(
    model: str | Path, output: str | Path, *, quant: str = "f16", overwrite: bool = False
) -> GGUFReport:
    """Write ``model`` (``tiny``, an HF folder, a full or LoRA checkpoint) to the file ``output``."""
    from sftdata.atomic import exclusive
    from sftdata.inputs import refuse_overwriting
    from sfttrain.model import model_sources

    quant = check_quant(quant)
    out = Path(output)
    refuse_overwriting(model_sources(model), out)  # --overwrite or not
    check_output_file(out, overwrite=overwrite)
    with exclusive(out, writer="sfttrain export"):
        return _export(model, out, quant)


def _export(spec: str | Path, out: Path, quant: str) -> GGUFReport:
    from sftdata.atomic import atomic_path

    with atomic_path(out) as tmp:
        if quant not in K_QUANTS:
            report = _write(spec, tmp, quant)
        else:  # an f16 file first, beside the output, then llama.cpp's quantiser
            from sfttrain.export.gguf.quant import llama_quantize

            f16 = tmp.with_name(tmp.name + ".f16")
            try:
                report = _write(spec, f16, "f16")
                report.k_fallback = llama_quantize(f16, tmp, quant)
            finally:
                f16.unlink(missing_ok=True)
            report.quant, report.f16_fallback = quant, []
    report.output, report.bytes = str(out), out.stat().st_size
    return report


def _write(spec: str | Path, out: Path, quant: str) -> GGUFReport:
    """``spec`` written to ``out`` in a type the ``gguf`` package writes (``QUANTS``)."""
    import gguf

    from sfttrain.export.gguf.arch import arch_for, gguf_tensors, write_hparams
    from sfttrain.export.gguf.quant import encode, file_type, header_entry, tensor_type
    from sfttrain.export.gguf.vocab import vocab_entries, write_vocab
    from sfttrain.export.hf import check_mergeable_base
    from sfttrain.model import TINY, adapter_base, is_adapter_dir, load_for_inference

    where = str(spec)
    merged = str(spec) != TINY and is_adapter_dir(spec)
    if merged:
        check_mergeable_base(adapter_base(spec))
    lm, tokenizer = load_for_inference(spec)
    if merged:
        lm = lm.merge_and_unload()
    arch = arch_for(lm.config, where=where)
    entries = vocab_entries(tokenizer, lm.config.vocab_size, where=where)
    tensors = gguf_tensors(lm, arch)
    types = [tensor_type(t.shape, quant) for t in tensors]
    fallback = [t.name for t, (_, fell_back) in zip(tensors, types, strict=True) if fell_back]
    writer = gguf.GGUFWriter(str(out), arch.gguf_arch)
    write_hparams(writer, lm.config, name=_name(spec), file_type=file_type(quant))
    write_vocab(writer, entries)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # Every tensor's header entry first (from shapes alone), then the tensors one by one:
    # the model plus one tensor's converted copy in memory, not a copy of every tensor.
    for t, (qtype, _) in zip(tensors, types, strict=True):
        writer.add_tensor_info(t.name, *header_entry(t.shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, (qtype, _) in zip(tensors, types, strict=True):
        writer.write_tensor_data(encode(t.array(), qtype))
    writer.close()
    return GGUFReport(
        output=str(out),
        quant=quant,
        architecture=arch.gguf_arch,
        tensors=len(tensors),
        bytes=out.stat().st_size,
        merged=merged,
        f16_fallback=fallback,
    )


def _name(spec: str | Path) -> str:
    """``general.name``: the model folder's name (a checkpoint's run folder for ``final/``)."""
    if str(spec) == "tiny":
        return "tiny"
    path = Path(spec).resolve()
    if path.name == "final" or path.name.startswith("step-"):
        return path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name
    return path.name


__all__ = ["QUANTS", "GGUFReport", "check_output_file", "export_gguf", "writable"]
