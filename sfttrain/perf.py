"""Model FLOPs utilisation (MFU) and the CUDA-only options' checks.

MFU = model FLOPs per token × tokens processed per second ÷ (the devices' peak FLOP/s).

Model FLOPs per token (the PaLM paper's convention, appendix B; nanoGPT's ``estimate_mfu``):

    6·N + 12·L·H·T        (full fine-tuning)

N = parameters of the matrix multiplies a token goes through (every weight except the input
embedding lookup; the output head counts), L = decoder layers, H = hidden size, T = sequence
length (the packed row length). 2·N is the forward pass, 4·N the backward (activation gradients
2·N + weight gradients 2·N), and 12·L·H·T the attention score and value products (forward +
backward). Under LoRA the frozen weights still get activation gradients but no weight
gradients: 4·N + 2·N_trainable + 12·L·H·T. Recomputation from activation checkpointing is NOT
counted (model FLOPs, not hardware FLOPs), nor the causal mask's skipped half (also standard).
Tokens are every position of the packed rows processed (not just trained tokens).

The peak is the dense bf16 tensor-core rate per device from the vendors' data sheets, matched on
``torch.cuda.get_device_name()``; ``peak_tflops`` in the config overrides it. On CPU there is no
table entry: MFU is reported as null unless ``peak_tflops`` is given.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from sftdata.errors import ConfigError
from sfttrain.wrappers import unwrap

# (substring of the device name, dense bf16 TFLOP/s). First match wins: specific names first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one device: ``override``, the table entry, or None (CPU/unknown)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def model_flops_per_token(model: torch.nn.Module, *, seq_len: int) -> float:
    """Training FLOPs per token (see the module doc): 4N + 2N_trainable + 12·L·H·T."""
    inner = unwrap(model)
    cfg = inner.config
    embed = inner.get_input_embeddings()
    embed_ids = {id(p) for p in embed.parameters()}
    head = inner.get_output_embeddings()
    tied = head is not None and id(head.weight) in embed_ids
    n = 0
    n_trainable = 0
    for p in model.parameters():
        numel = p.numel()
        if hasattr(p, "quant_state") or p.dtype in (torch.uint8, torch.int8):
            # bitsandbytes packs 2 (4-bit) weights per byte; count logical weights
            numel = numel * 2 if p.dtype == torch.uint8 else numel
        if id(p) in embed_ids and not tied:
            continue  # the input embedding is a lookup, not a matmul
        n += numel
        if p.requires_grad:
            n_trainable += numel
    layers = int(getattr(cfg, "num_hidden_layers", 0))
    hidden = int(getattr(cfg, "hidden_size", 0))
    return 4.0 * n + 2.0 * n_trainable + 12.0 * layers * hidden * seq_len


def mfu(
    flops_per_token: float, tokens_per_s: float, *, peak_tflops: float | None, world_size: int
) -> float | None:
    """Fraction of the devices' peak used (tokens_per_s summed over all ranks), or None without a peak."""
    if peak_tflops is None or peak_tflops <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12 * world_size)


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


def check_platform(config: Any, device: torch.device) -> None:
    """Refuse, in one line, what this machine cannot run (QLoRA/Liger/flash attention without CUDA…)."""
    cuda = device.type == "cuda" and _cuda_ok()
    if config.quantization_bit is not None:
        if not cuda:
            raise ConfigError(
                f"quantization_bit: {config.quantization_bit}-bit QLoRA needs a CUDA GPU (bitsandbytes); "
                "this machine has none — drop quantization_bit to train LoRA on the full-precision base"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "quantization_bit: needs the bitsandbytes package (pip install bitsandbytes)"
            )
        if config.distributed == "fsdp":
            raise ConfigError(
                "quantization_bit: QLoRA runs with distributed: ddp (one quantised replica per GPU), not fsdp"
            )
    if config.use_liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError(
                "use_liger_kernel: liger-kernel is not installed (pip install liger-kernel)"
            )
        if not cuda:
            raise ConfigError(
                "use_liger_kernel: Liger's Triton kernels need a CUDA GPU; this machine has none"
            )
    from sfttrain.model import check_attn_implementation

    check_attn_implementation(config.attn_implementation, cuda=cuda)
    if config.attn_implementation == "flash_attention_2" and not config.bf16:
        raise ConfigError(
            "attn_implementation: flash_attention_2 computes in bf16/fp16 only; set bf16: true"
        )
    if config.bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; set bf16: false"
        )


def deterministic_kernels(on: bool) -> None:
    """``deterministic: true``: the same inputs give the same bits on CUDA (a resumed run then
    repeats an uninterrupted one exactly). cuBLAS needs a fixed workspace for that, set before
    its first call; kernels with no deterministic version raise instead of running."""
    if not on:
        return
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


__all__ = [
    "PEAK_BF16_TFLOPS",
    "check_platform",
    "deterministic_kernels",
    "device_peak_tflops",
    "mfu",
    "model_flops_per_token",
]
