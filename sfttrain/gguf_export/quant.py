"""Tensor types a GGUF export can be written in, through the ``gguf`` package's own quantisers.

One-dimensional tensors (norms, biases) stay f32 in every type, as llama.cpp's converter keeps
them; a matrix whose rows are not a whole number of quantisation blocks is written f16 instead
(and reported), since a block type cannot hold a partial block.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sftdata.errors import ConfigError

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
"""What ``--quant`` offers: full and half precision and the block types llama.cpp's README lists
for CPUs and phones. K-quants and i-quants need llama.cpp's own ``llama-quantize``."""

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
    known = {t.name.lower() for t in gguf.GGMLQuantizationType}
    if key in known:
        raise ConfigError(
            f"--quant: {key} cannot be written by this exporter; it writes {', '.join(can)} "
            f"(quantise the f16 file with llama.cpp's llama-quantize for {key})"
        )
    raise ConfigError(f"--quant: {name!r} is not a GGML type; use one of {', '.join(can)}")


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
    "QUANTS",
    "check_quant",
    "encode",
    "file_type",
    "header_entry",
    "tensor_type",
    "writable",
]
