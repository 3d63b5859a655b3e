"""The loss over packed rows: records kept apart (C1) and summed over trained tokens only (C3).

Attention isolation (invariant C1; README, "Train"). A packed row holds several records; each must see only
itself. Measured with transformers 5.23 on CPU (tiny Llama, two records in one row, max logit
difference against separate forward passes):

- ``position_ids`` with the default ``use_cache=True`` (even in train mode): 0.39 — transformers
  builds a cache, and its packed-sequence detection only runs without one, so records leak;
- ``position_ids`` with ``use_cache=False``: 1.8e-7 under ``sdpa`` and ``eager`` (transformers
  derives a block-diagonal causal mask from the restarts of ``position_ids``);
- an explicit 4-D mask: 1.8e-7, but under ``eager`` only as an ADDITIVE FLOAT mask (a boolean 4-D
  mask gave wrong results there).

So the trainer always passes ``use_cache=False`` and, per implementation, either relies on the
position-id restarts (``position_ids``, the default for every implementation: no L×L mask is built
by us) or passes an additive float block mask (``block_mask``). ``flash_attention_2`` turns
position-id restarts into varlen ``cu_seqlens`` inside transformers, but only for a batch of ONE
sequence, so ``LossModel`` flattens [B, L] rows to [1, B·L] under it (see ``LossModel``).
``flex_attention`` (PyTorch's block-sparse kernel, no extra package) gets its mask from
transformers' masking utilities, which turn the same position-id restarts into a per-record
document ``BlockMask``: blocks across records are skipped, not computed and discarded, so a long
packed row costs what its records cost. It takes no 4-D float mask, so ``block_mask`` is refused
for it. ``tests/invariants/test_c1_isolation.py`` checks C1 for every implementation the trainer may pick on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from sftdata import IGNORE_INDEX
from sftdata.errors import ConfigError
from sfttrain.wrappers import unwrap

AUTO_ISOLATION = "position_ids"
"""What ``attn_isolation: auto`` picks under every attention implementation (each tested in
tests/invariants/test_c1_isolation.py)."""


# Architectures whose CausalLM forward is exactly `lm_head(decoder(...))` (no logit scaling or
# soft-capping): for them the loss computes logits only at trained positions, which on a
# 32k-vocab model is most of the step's arithmetic (the output head dwarfs a small decoder).
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"})


def isolation_for(attn_implementation: str, attn_isolation: str = "auto") -> str:
    """The isolation mechanism of ``attn_isolation`` under ``attn_implementation``."""
    if attn_isolation == "block_mask" and attn_implementation == "flex_attention":
        raise ConfigError(
            "attn_isolation: block_mask is a dense float mask, which flex_attention does not take; "
            "use auto (position_ids: a per-record BlockMask)"
        )
    return AUTO_ISOLATION if attn_isolation == "auto" else attn_isolation


def liger_loss(model):
    """Patch the model's RMSNorm/RoPE/SwiGLU with Liger kernels; return Liger's fused linear
    cross-entropy (sum reduction) for ``LossModel`` (the head + loss without materialised logits).

    Needs ``liger-kernel`` and CUDA (``sfttrain.perf.check_platform`` refuses otherwise).
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    # cross-entropy patches are off: LossModel computes the loss itself (selected positions only)
    _apply_liger_kernel_to_instance(
        model=unwrap(model), cross_entropy=False, fused_linear_cross_entropy=False
    )
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")


def block_mask(position_ids, dtype):
    """Additive float block-diagonal causal mask [B, 1, L, L] from position-id restarts.

    A boolean 4-D mask is NOT used: under ``eager`` it gave wrong logits (measured: the table above).
    """

    first = position_ids[:, :1] - 1
    seg = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def forward_kwargs(input_ids, position_ids, *, isolation: str, dtype=None) -> dict[str, Any]:
    """Keyword arguments for a forward pass over packed rows that keeps records apart (C1)."""

    kw: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
    if isolation == "block_mask":
        kw["attention_mask"] = block_mask(position_ids, dtype or torch.float32)
    elif isolation != "position_ids":
        raise ConfigError(f"attn_isolation: unknown mechanism {isolation!r}")
    return kw


class LossModel(torch.nn.Module):
    """Summed next-token cross-entropy over the trained tokens of packed rows, as a module.

    Returns the SUM (not the mean) so the loop can divide by the trained tokens of the whole
    optimizer step (C3). It is a module around the causal LM so that a DDP/FSDP wrapper
    wraps THIS and its forward still runs through the wrapper, while the loss computes logits only
    at trained positions: for plain-head architectures it calls the decoder and applies the output
    head to the selected rows, which on a 32k vocabulary is most of a small model's arithmetic.
    """

    def __init__(
        self,
        model,
        *,
        isolation: str,
        selective_head: bool | None = None,
        flatten_rows: bool | None = None,
        fused_loss: Any = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.isolation = isolation
        inner = unwrap(model)
        plain = getattr(inner.config, "model_type", "") in _PLAIN_HEAD_MODEL_TYPES
        self.selective_head = (
            plain and hasattr(inner, "get_decoder") if selective_head is None else selective_head
        )
        # flash_attention_2 finds packed records from position-id restarts ONLY for batch size 1
        # (transformers 5.23 modeling_flash_attention_utils._is_packed_sequence returns False when
        # batch_size != 1, and then runs plain causal flash attention over the whole row: records
        # would leak). So [B, L] rows are flattened to [1, B·L]: every row restarts at position 0,
        # prepare_fa_kwargs_from_position_ids turns each restart into a cu_seqlens boundary, and
        # flash_attn_varlen_func attends within each record only. Outputs are reshaped back.
        if flatten_rows is None:
            flatten_rows = getattr(inner.config, "_attn_implementation", "") == "flash_attention_2"
        self.flatten_rows = flatten_rows and isolation == "position_ids"
        # Liger's fused linear cross-entropy (sum reduction): never materialises the logits
        self.fused_loss = fused_loss

    def forward(self, input_ids, labels, position_ids):
        """Loss sum over a batch of rows (tensors [B, L]; labels unshifted, IGNORE_INDEX where untrained)."""
        import torch.nn.functional as F

        target = labels[:, 1:]
        shape = input_ids.shape
        if self.flatten_rows and shape[0] > 1:
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
        kw = forward_kwargs(input_ids, position_ids, isolation=self.isolation)
        if self.selective_head:
            inner = unwrap(self.model)
            hidden = inner.get_decoder()(**kw).last_hidden_state
            hidden = hidden.reshape(*shape, hidden.shape[-1])[:, :-1]
            keep = target != IGNORE_INDEX
            head = inner.get_output_embeddings()
            if self.fused_loss is not None and head.bias is None:
                return self.fused_loss(head.weight, hidden[keep], target[keep])
            logits = head(hidden[keep])
            return F.cross_entropy(logits.float(), target[keep], reduction="sum")
        logits = self.model(**kw).logits
        logits = logits.reshape(*shape, logits.shape[-1])[:, :-1]
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )


__all__ = [
    "AUTO_ISOLATION",
    "LossModel",
    "block_mask",
    "forward_kwargs",
    "isolation_for",
    "liger_loss",
]
