"""Tensor types a GGUF export can be written in, through the ``gguf`` package's own quantisers.

One-dimensional tensors (norms, biases) stay f32 in every type, as llama.cpp's converter keeps
them; a matrix whose rows are not a whole number of quantisation blocks is written f16 instead
(and reported), since a block type cannot hold a partial block.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sftdata.errors import ConfigError, ModelError

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
"""What the ``gguf`` package writes here: full and half precision and the block types llama.cpp's
README lists for CPUs and phones."""

K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
"""llama.cpp's k-quant file types, what GGUF tutorials use. The ``gguf`` package has no k-quant
writer, so these go through llama.cpp's own quantiser (``llama_model_quantize`` in
llama-cpp-python, the ``gguf`` extra) from an f16 file written first, as ``convert_hf_to_gguf.py``
then ``llama-quantize`` do; llama.cpp picks its own types for tensors whose rows are not whole
256-value k-blocks, and keeps norms f32."""

_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
}


def writable() -> tuple[str, ...]:
    """The offered types the installed ``gguf`` package can actually write (probed, not assumed)."""
    import gguf

    out = []
    for name in QUANTS:
        qtype = gguf.GGMLQuantizationType[name.upper()]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        try:
            gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
        except NotImplementedError:
            continue
        out.append(name)
    return tuple(out)


def check_quant(name: str) -> str:
    """``name`` lower-cased, or one line saying what can be written instead."""
    import gguf

    key = str(name).lower()
    can = writable()
    if key in can:
        return key
    if key in K_QUANTS:
        from sftdata.extras import require

        require("gguf", f"--quant {key} (llama.cpp's own quantiser)")
        return key
    known = {t.name.lower() for t in gguf.GGMLQuantizationType} | {
        f.name.lower().removeprefix("mostly_") for f in gguf.LlamaFileType
    }
    every = ", ".join((*can, *K_QUANTS))
    if key in known:
        raise ConfigError(
            f"--quant: {key} cannot be written by this exporter; it writes {every} "
            f"(quantise the f16 file with llama.cpp's llama-quantize for {key})"
        )
    raise ConfigError(f"--quant: {name!r} is not a GGML type; use one of {every}")


def llama_quantize(source: Path, target: Path, name: str) -> list[str]:
    """``source`` (an f16 GGUF) quantised to the k-quant ``name`` into ``target`` by llama.cpp;
    the matrices it wrote in a fallback type (``"blk.0.attn_q.weight: q5_0"``).

    llama.cpp logs every tensor through llama-cpp-python's callback, which prints to
    ``sys.stderr``: the log is held here instead (a command's output stays its own) and read for
    the fallbacks, or for the reason when it fails.
    """
    import contextlib
    import ctypes
    import io

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
    params.nthread = os.cpu_count() or 1
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
    lines = log.getvalue().splitlines()
    if code != 0:
        last = next((x.strip() for x in reversed(lines) if x.strip()), "no message")
        raise ModelError(f"{target}: llama.cpp's quantiser failed on {name}: {last}")
    # "warning: blk.0.attn_q.weight - ncols 128 not divisible by 256 (...) -> falling back to q5_0"
    return [
        f"{x.split()[1]}: {x.rsplit(' ', 1)[-1]}"
        for x in lines
        if x.startswith("warning: ") and "falling back to" in x
    ]


def file_type(name: str) -> int:
    """``general.file_type`` for a ``--quant`` name."""
    import gguf

    return int(gguf.LlamaFileType[_FILE_TYPES[name]])


def tensor_type(shape: tuple[int, ...], name: str) -> tuple[Any, bool]:
    """(GGML type, whether it fell back to f16) a tensor of ``shape`` is written in for ``--quant
    name``: decided from the shape alone, so every tensor's header entry can be written before
    any tensor is converted."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2 or name == "f32":
        return types.F32, False
    if name == "f16":
        return types.F16, False
    qtype = types[name.upper()]
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return types.F16, True
    return qtype, False


def header_entry(shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], Any, int]:
    """(byte shape, uint8, bytes) of the payload :func:`encode` gives, as
    ``GGUFWriter.add_tensor_info`` takes them (it reads the element shape back from the type)."""
    import gguf

    byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape, dtype=np.int64))


def encode(data: np.ndarray, qtype: Any) -> np.ndarray:
    """The payload of one float32 tensor in GGML type ``qtype`` (from :func:`tensor_type`)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return data.astype(np.float32, copy=False)
    if qtype == types.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)


__all__ = [
    "K_QUANTS",
    "QUANTS",
    "check_quant",
    "encode",
    "file_type",
    "header_entry",
    "llama_quantize",
    "tensor_type",
    "writable",
]
