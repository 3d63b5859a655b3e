"""Model architectures GGUF export supports: the llama.cpp architecture each maps to, its
hyperparameters as GGUF keys, and its tensors under llama.cpp's names.

The names come from the ``gguf`` package's own table (``gguf.get_tensor_name_map``), so they are
the ones llama.cpp's loader looks up. What the table cannot say is the rotary layout: Hugging
Face Llama/Mistral rotate the two halves of each head (``rotate_half``) while llama.cpp's
``llama`` architecture rotates adjacent pairs, so their q/k projections are re-ordered row-wise
on the way out; ``qwen2`` in llama.cpp rotates halves already (NEOX rope), so Qwen2 is written as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sftdata.errors import ModelError


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face ``model_type`` is written."""

    gguf_arch: str
    """The llama.cpp architecture name (``general.architecture``)."""
    pairwise_rope: bool
    """q/k rows re-ordered from half-split to adjacent-pair rotary layout."""


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", pairwise_rope=True),
    "mistral": Arch("llama", pairwise_rope=True),  # llama.cpp runs Mistral as its llama arch
    "qwen2": Arch("qwen2", pairwise_rope=False),
}


def arch_for(config: Any, *, where: str) -> Arch:
    """The export plan for ``config``, or one line listing the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ModelError(
            f"{where}: model_type {model_type!r} cannot be exported to GGUF; supported: "
            f"{', '.join(sorted(ARCHS))}"
        )
    kind = rope(config).get("rope_type", rope(config).get("type"))
    if kind not in (None, "default"):
        raise ModelError(
            f"{where}: rope_scaling type {kind!r} is not written to GGUF by this exporter; only "
            "unscaled rotary embeddings are"
        )
    if getattr(config, "use_sliding_window", False):
        raise ModelError(f"{where}: use_sliding_window is not written to GGUF by this exporter")
    return ARCHS[model_type]


def rope(config: Any) -> dict[str, Any]:
    """The rotary settings: transformers 5 keeps them in ``rope_parameters`` (theta included),
    older configs in ``rope_theta`` and ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        return params
    scaling = getattr(config, "rope_scaling", None)
    out = dict(scaling) if isinstance(scaling, dict) else {}
    out.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return out


def head_dim(config: Any) -> int:
    """Per-head width: ``head_dim`` where the config states it, else hidden / heads."""
    stated = getattr(config, "head_dim", None)
    return int(stated) if stated else config.hidden_size // config.num_attention_heads


def write_hparams(writer: Any, config: Any, *, name: str, file_type: int) -> None:
    """The ``{arch}.*`` keys llama.cpp needs to build the graph."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = head_dim(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(dim)
    writer.add_rope_freq_base(float(rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    if dim * heads != config.hidden_size:
        writer.add_key_length(dim)  # llama.cpp assumes hidden / heads otherwise
        writer.add_value_length(dim)


def pairwise_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection (or its bias) from half-split to adjacent-pair order per head.

    Within each head, HF's rotary embedding pairs row ``j`` with row ``j + d/2``; llama.cpp's
    pairs ``2j`` with ``2j + 1``. Interleaving the two halves maps one onto the other.
    """
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class TensorOut:
    """One weight as it will be written: its llama.cpp name and shape, converted on demand."""

    name: str
    """llama.cpp's tensor name."""
    shape: tuple[int, ...]
    """Its shape (row re-ordering keeps it)."""
    source: Any
    """The model's own tensor (not a copy)."""
    pairwise_heads: int = 0
    """Re-order rows half-split -> adjacent pairs for this many heads (0: as is)."""

    def array(self) -> np.ndarray:
        """The weight as a contiguous float32 array (the model's own memory where no conversion
        or re-ordering is needed, else a copy freed once written)."""
        data = self.source.detach().to("cpu").float().numpy()
        if self.pairwise_heads:
            data = pairwise_rows(data, self.pairwise_heads)
        return np.ascontiguousarray(data)


def gguf_tensors(model: Any, arch: Arch) -> list[TensorOut]:
    """Every weight of ``model`` to write, in the model's order, none converted yet (the export
    converts and writes one at a time, so it holds one tensor's copy beside the model, not all).

    A tied output head is left out (llama.cpp reuses ``token_embd`` when ``output`` is absent);
    a weight the name table does not know is refused, since llama.cpp would not load it.
    """
    import gguf

    config = model.config
    table = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH[arch.gguf_arch.upper()], config.num_hidden_layers
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out: list[TensorOut] = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope.freq_base
        name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(
                f"{hf_name}: no llama.cpp tensor name for this {arch.gguf_arch} weight"
            )
        pairwise = 0
        if arch.pairwise_rope and ".self_attn.q_proj." in hf_name:
            pairwise = heads
        elif arch.pairwise_rope and ".self_attn.k_proj." in hf_name:
            pairwise = kv_heads
        out.append(TensorOut(name, tuple(tensor.shape), tensor, pairwise))
    return out


__all__ = [
    "ARCHS",
    "Arch",
    "TensorOut",
    "arch_for",
    "gguf_tensors",
    "head_dim",
    "pairwise_rows",
    "write_hparams",
]
