"""Load the model (built-in ``tiny`` or a local HF folder), apply LoRA/full fine-tuning, isolate packed rows.

Attention isolation (DESIGN §4, invariant C1). A packed row holds several records; each must see only
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
sequence, so ``LossModel`` flattens [B, L] rows to [1, B·L] under it (see ``LossModel``). ``tests/test_model.py`` checks C1 for every implementation the trainer may pick on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftdata import IGNORE_INDEX
from sftdata.errors import ConfigError
from sftdata.jsonfile import read_json_object
from sfttrain.config import TrainConfig, lora_target_modules

# Implementation -> the isolation mechanism `attn_isolation: auto` picks (tested in test_model.py).
AUTO_ISOLATION = {
    "sdpa": "position_ids",
    "eager": "position_ids",
    "flash_attention_2": "position_ids",
}
# Implementations that run on CPU, i.e. that C1 is tested for in the CPU test suite.
CPU_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

# Architectures whose CausalLM forward is exactly `lm_head(decoder(...))` (no logit scaling or
# soft-capping): for them the loss computes logits only at trained positions, which on a
# 32k-vocab model is most of the step's arithmetic (the output head dwarfs a small decoder).
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"})

TINY = "tiny"


def tiny_dir() -> Path:
    """Folder of the built-in tiny model: ``config.json`` (ours) + the tiny tokenizer (sftdata's)."""
    from sftdata.tokenizer import TINY_DIR

    return Path(TINY_DIR)


def isolation_for(config: TrainConfig) -> str:
    """The isolation mechanism for the configured attention implementation."""
    if config.attn_isolation != "auto":
        return config.attn_isolation
    return AUTO_ISOLATION[config.attn_implementation]


def check_model_dir(path: str | Path) -> Path:
    """A local HF model folder with ``config.json`` and safetensors weights, or ConfigError (one line)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(
            f"{p}: model folder does not exist (give a local Hugging Face folder or 'tiny')"
        )
    if not (p / "config.json").is_file():
        raise ConfigError(f"{p}: not a model folder (no config.json)")
    has_weights = (p / "model.safetensors").is_file() or (
        p / "model.safetensors.index.json"
    ).is_file()
    if not has_weights:
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise ConfigError(f"{p}: weights are not safetensors (pickle weights are refused)")
        raise ConfigError(f"{p}: model folder has no weights (model.safetensors)")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        _check_weight_map(index)
    return p


def _check_weight_map(index: Path) -> None:
    """Every shard a safetensors index names is a ``.safetensors`` file inside its folder."""
    from sftdata.inputs import inside

    weight_map = read_json_object(index, error=ConfigError, strict=False).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{index}: 'weight_map' must map tensor names to files")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise ConfigError(
                f"{index}: weight_map[{tensor!r}] is {name!r}, not a .safetensors file "
                "(pickle weights are refused)"
            )
        if not inside(index.parent, name):
            raise ConfigError(
                f"{index}: weight_map[{tensor!r}] {name!r} is not a file inside {index.parent}"
            )


def check_adapter_dir(path: str | Path) -> Path:
    """A PEFT adapter folder whose weights are safetensors, or ConfigError (one line)."""
    p = Path(path)
    if not is_adapter_dir(p):
        raise ConfigError(f"{p}: not an adapter folder (no adapter_config.json)")
    if not (p / "adapter_model.safetensors").is_file():
        if (p / "adapter_model.bin").exists():
            raise ConfigError(
                f"{p}: adapter weights are not safetensors (pickle weights are refused)"
            )
        raise ConfigError(f"{p}: adapter folder has no adapter_model.safetensors")
    return p


def is_adapter_dir(path: str | Path) -> bool:
    """True for a PEFT adapter folder (a LoRA checkpoint or an exported adapter)."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (``base_model_name_or_path``)."""
    p = Path(path) / "adapter_config.json"
    base = read_json_object(p, error=ConfigError, strict=False, what="adapter config").get(
        "base_model_name_or_path"
    )
    if not base:
        raise ConfigError(
            f"{p}: base_model_name_or_path is missing; pass --model BASE --adapter {path}"
        )
    return str(base)


def load_tokenizer_for(spec: str | Path):
    """The tokenizer that belongs to a model spec (``tiny`` or a folder holding tokenizer files)."""
    from sftdata.tokenizer import load_tokenizer

    return load_tokenizer(TINY if str(spec) == TINY else Path(spec))


def build_tiny(*, seed: int, attn_implementation: str = "sdpa"):
    """The built-in tiny Llama, randomly initialised from ``seed`` (same seed ⇒ same weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig.from_json_file(str(tiny_dir() / "config.json"))
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    return model.float()


def check_attn_implementation(name: str) -> None:
    """Refuse an attention implementation this machine cannot run, in one line."""
    if name != "flash_attention_2":
        return
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "attn_implementation: flash_attention_2 needs a CUDA GPU and the flash-attn package; "
            "use sdpa (packed rows stay isolated through position_ids)"
        )


def load_base_model(
    spec: str | Path,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 42,
    quantization_bit: int | None = None,
    device: torch.device | None = None,
):
    """(model, tokenizer) for ``tiny`` or a local HF folder. Never touches a model hub.

    ``quantization_bit`` (QLoRA, CUDA only): the frozen base is loaded through bitsandbytes, 4-bit
    nf4 with double quantisation and bf16 compute, or 8-bit, onto ``device``.
    """
    check_attn_implementation(attn_implementation)
    if str(spec) == TINY:
        if quantization_bit is not None:
            raise ConfigError(
                "quantization_bit: the built-in tiny model cannot be quantised; give a local model folder"
            )
        return build_tiny(seed=seed, attn_implementation=attn_implementation), load_tokenizer_for(
            TINY
        )
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = check_model_dir(spec)
    tokenizer = load_tokenizer_for(path)
    extra: dict[str, Any] = {}
    if quantization_bit is not None:
        extra = quantization_kwargs(quantization_bit, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=torch.float32,
            attn_implementation=attn_implementation,
            **extra,
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot load the model ({first})") from None
    return model, tokenizer


def quantization_kwargs(bits: int, device: torch.device | None) -> dict[str, Any]:
    """``from_pretrained`` keywords for a bitsandbytes-quantised frozen base (QLoRA)."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        # nf4 + double quantisation + bf16 compute: the QLoRA paper's recipe (Dettmers et al. 2023)
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    elif bits == 8:
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ConfigError(f"quantization_bit: {bits!r} must be 4 or 8")
    index = device.index if device is not None and device.index is not None else 0
    return {"quantization_config": q, "device_map": {"": index}}


def is_quantized(model) -> bool:
    """True for a base loaded through bitsandbytes (4- or 8-bit)."""
    inner = unwrap(model)
    return bool(
        getattr(inner, "is_loaded_in_4bit", False)
        or getattr(inner, "is_loaded_in_8bit", False)
        or getattr(getattr(inner, "config", None), "quantization_config", None)
    )


def decoder_layers(module) -> list:
    """The decoder blocks (``model.layers`` of a CausalLM, through PEFT/LossModel wrappers)."""
    inner = (
        unwrap(getattr(module, "model", module))
        if isinstance(module, LossModel)
        else unwrap(module)
    )
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None else []


def load_model(spec: str | Path, *, config: TrainConfig):
    """(model ready for training, tokenizer): base model + LoRA or full fine-tuning per ``config``."""
    model, tokenizer = load_base_model(
        spec, attn_implementation=config.attn_implementation, seed=config.seed
    )
    return apply_finetuning(model, config), tokenizer


def apply_finetuning(model, config: TrainConfig):
    """Wrap ``model`` in LoRA adapters (PEFT) or unfreeze it; enable gradient checkpointing."""

    # LoRA initialisation draws from torch's RNG: seed it so the same config gives the same adapter.
    torch.manual_seed(config.seed)
    if config.finetuning_type == "lora":
        from peft import LoraConfig, get_peft_model

        if is_quantized(model):
            from peft import prepare_model_for_kbit_training

            # fp32 norms/head, input grads on, checkpointing as configured (QLoRA recipe)
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=config.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.effective_lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_target_modules(config.lora_target),
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(
                f"lora_target: {config.lora_target!r} matches no usable module ({first})"
            ) from None
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing does not need inputs that require grad, but a frozen
        # embedding under LoRA would make the reentrant variant silently drop every gradient;
        # enable_input_require_grads makes either variant correct.
        inner = unwrap(model)
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            inner.activation_checkpointing_enable({"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if config.finetuning_type == "lora":
            model.enable_input_require_grads()
    model.config.use_cache = False
    return model


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


def compile_layers(model) -> int:
    """``torch.compile`` each decoder layer in place (same shapes every step: one graph, no
    recompiles); the loss head stays eager because its trained-position count varies. Returns
    how many layers were compiled. Compiling per layer composes with DDP and FSDP2's per-layer
    units (torchtune/torchtitan do the same)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def unwrap(model):
    """The transformers CausalLM inside a PEFT (or DDP/compile) wrapper."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    if hasattr(inner, "get_base_model"):
        inner = (
            inner.get_base_model()
        )  # PEFT: LoRA layers are injected in place, so this trains them
    return inner


def block_mask(position_ids, dtype):
    """Additive float block-diagonal causal mask [B, 1, L, L] from position-id restarts.

    A boolean 4-D mask is NOT used: under ``eager`` it gave wrong logits (DESIGN §4).
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
    optimizer step (C3). It is a module around the causal LM so that a DDP/FSDP wrapper (issue 5)
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


def count_trained(labels) -> int:
    """Trained (shifted) tokens in a label array [B, L]: what the loss of ``labels`` sums over."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


__all__ = [
    "AUTO_ISOLATION",
    "CPU_ATTN_IMPLEMENTATIONS",
    "TINY",
    "LossModel",
    "adapter_base",
    "apply_finetuning",
    "block_mask",
    "build_tiny",
    "check_attn_implementation",
    "check_model_dir",
    "compile_layers",
    "count_trained",
    "decoder_layers",
    "forward_kwargs",
    "is_adapter_dir",
    "is_quantized",
    "isolation_for",
    "liger_loss",
    "load_base_model",
    "load_for_inference",
    "load_model",
    "load_tokenizer_for",
    "quantization_kwargs",
    "tiny_dir",
    "unwrap",
]


def load_for_inference(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 42,
):
    """(model in eval mode, tokenizer) for eval/generate/export.

    ``model`` is ``tiny``, an HF model folder (a full fine-tuning checkpoint is one), or an adapter
    folder (a LoRA checkpoint or ``final/``), whose base is then read from its adapter_config.json.
    An explicit ``adapter`` is applied on top of ``model``. The tokenizer comes from the adapter
    folder when it has one (checkpoints carry their tokenizer), else from the model.
    """
    if adapter is None and str(model) != TINY and is_adapter_dir(model):
        model, adapter = adapter_base(model), model
    base, tokenizer = load_base_model(model, attn_implementation=attn_implementation, seed=seed)
    if adapter is not None:
        from peft import PeftModel

        check_adapter_dir(adapter)
        from safetensors import SafetensorError

        try:
            base = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{adapter}: cannot apply the adapter to {model} ({first})") from None
        if (Path(adapter) / "tokenizer.json").is_file() or (
            Path(adapter) / "tokenizer_config.json"
        ).is_file():
            tokenizer = load_tokenizer_for(adapter)
    base.config.use_cache = True
    return base.eval(), tokenizer
