"""Export a checkpoint as a folder ``AutoModelForCausalLM.from_pretrained`` loads: the adapter, or merged weights."""

from __future__ import annotations

import shutil
from pathlib import Path

from sftdata.atomic import exclusive
from sftdata.errors import ConfigError
from sftdata.jsonfile import read_json_object
from sfttrain.model import adapter_base, is_adapter_dir, load_for_inference, load_tokenizer_for
from sfttrain.weights import written

DTYPES = ("fp32", "fp16", "bf16")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def torch_dtype(name: str):
    """``fp16|bf16|fp32`` -> torch dtype."""
    import torch

    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise ConfigError(f"--dtype: {name!r} is not one of {', '.join(DTYPES)}") from None


def check_mergeable_base(base: str | Path) -> None:
    """Refuse merging an adapter into a base folder that holds quantised weights.

    A QLoRA run trains against a 4/8-bit copy made at load time, but its adapter records the
    ORIGINAL full-precision folder, and merging loads those weights (dequantising nothing): exact.
    A folder saved already quantised (``quantization_config`` in its config.json) has no
    full-precision weights to merge into; rounding the merged sum back to 4 bits would destroy the
    update, so it is refused.
    """

    cfg = Path(base) / "config.json"
    if not cfg.is_file():
        return  # load_for_inference reports a missing base in its own words
    quant = read_json_object(cfg, error=ConfigError, strict=False).get("quantization_config")
    if quant:
        raise ConfigError(
            f"{cfg}: the adapter's base holds quantised weights ({quant.get('quant_method', 'quantised')}); "
            "merging needs the original full-precision model folder — export without --merge, or "
            "point base_model_name_or_path at the fp16/bf16/fp32 weights"
        )


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    merge: bool = False,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> str:
    """Write ``checkpoint`` (a LoRA or full checkpoint, or ``final/``) to ``output``; returns what was written.

    An ``output`` folder that already holds files is replaced only with ``overwrite`` (a user's
    folder is never emptied by mistake); one that is, holds or lies inside the checkpoint or the
    adapter's base model is refused even then.

    LoRA without ``merge``: the PEFT adapter + tokenizer (transformers loads it through PEFT, base
    from ``base_model_name_or_path``). LoRA with ``merge``: base + adapter merged into plain weights
    in ``dtype``. Full fine-tuning: the weights in ``dtype``. Always with the tokenizer files.
    """
    from sftdata.inputs import refuse_overwriting
    from sfttrain.model import model_sources

    src = Path(checkpoint)
    if not src.is_dir():
        raise ConfigError(f"{src}: checkpoint folder does not exist")
    out = Path(output)
    # what the export reads (the checkpoint, an adapter's base) is never replaced, --overwrite
    # or not
    refuse_overwriting(model_sources(src), out)
    if out.is_file() or out.is_symlink():
        raise ConfigError(f"{out}: is a file; -o names the folder to write")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"{out}: the folder already holds files; pass --overwrite to replace it, or give "
            "another -o"
        )
    with exclusive(out, writer="sfttrain export"):
        return _export(src, out, merge=merge, dtype=dtype)


def _export(src: Path, out: Path, *, merge: bool, dtype: str) -> str:
    target_dtype = torch_dtype(dtype)
    tokenizer = load_tokenizer_for(src)
    if is_adapter_dir(src) and not merge:
        if dtype != "fp32":
            raise ConfigError(
                "--dtype: an unmerged adapter is exported as trained (fp32); add --merge to convert"
            )
        with written(out, "the adapter") as tmp:
            for name in ADAPTER_FILES:
                shutil.copy2(src / name, tmp / name)
            tokenizer.save_pretrained(str(tmp))
        return "adapter"
    if is_adapter_dir(src):
        check_mergeable_base(adapter_base(src))
    model, _ = load_for_inference(src)  # an adapter folder comes back as base + adapter (PEFT)
    what = "model"
    if is_adapter_dir(src):
        model = model.merge_and_unload()
        what = "merged model"
    model = model.to(target_dtype)
    model.config.use_cache = True
    with written(out, f"the {what}") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return what


__all__ = ["DTYPES", "check_mergeable_base", "export_checkpoint", "torch_dtype"]
