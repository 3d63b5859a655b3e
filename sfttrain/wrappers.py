"""What a model is inside its wrappers (PEFT, DDP, torch.compile, the trainer's LossModel): by
attribute, without importing any of them, so every module that needs it imports it at the top."""

from __future__ import annotations

from typing import Any


def unwrap(model: Any) -> Any:
    """The transformers CausalLM inside a PEFT (or DDP/compile) wrapper."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    if hasattr(inner, "get_base_model"):  # PEFT: LoRA layers are injected in place
        inner = inner.get_base_model()
    return inner


def decoder_layers(module: Any) -> list:
    """The decoder blocks (``model.layers`` of a CausalLM, through PEFT/LossModel wrappers)."""
    # a LossModel (sfttrain.loss) holds the CausalLM as .model; a CausalLM's own .model is its
    # decoder, so the wrapper is told apart by its isolation attribute, not by importing it
    inner = unwrap(module.model if hasattr(module, "isolation") else module)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None else []


__all__ = ["decoder_layers", "unwrap"]
