"""Load the model (built-in ``tiny`` or a local HF folder, or a trained adapter/full checkpoint for
inference) and apply LoRA/QLoRA/full fine-tuning. How packed rows are kept apart and the loss is
taken is ``sfttrain.loss``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sftdata.errors import ConfigError, ModelError
from sftdata.jsonfile import read_json_object
from sfttrain.config import TrainConfig, lora_target_modules
from sfttrain.wrappers import decoder_layers, unwrap

# Implementations that run on CPU, i.e. that C1 is tested for in the CPU test suite
# (flex_attention runs on CUDA only: check_attn_implementation; C1 under it: pytest -m gpu).
CPU_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


TINY = "tiny"


def tiny_dir() -> Path:
    """Folder of the built-in tiny model: ``config.json`` (ours) + the tiny tokenizer (sftdata's)."""
    from sftdata.tokenizer import TINY_DIR

    return Path(TINY_DIR)


def check_model_dir(path: str | Path) -> Path:
    """A local HF model folder with ``config.json`` and safetensors weights, or ConfigError (one line)."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(
            f"{p}: model folder does not exist (give a local Hugging Face folder or 'tiny')"
        )
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: not a model folder (no config.json)")
    has_weights = (p / "model.safetensors").is_file() or (
        p / "model.safetensors.index.json"
    ).is_file()
    if not has_weights:
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise ModelError(f"{p}: weights are not safetensors (pickle weights are refused)")
        raise ModelError(f"{p}: model folder has no weights (model.safetensors)")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        _check_weight_map(index)
    return p


def _check_weight_map(index: Path) -> None:
    """Every shard a safetensors index names is a ``.safetensors`` file inside its folder."""
    from sftdata.inputs import inside

    weight_map = read_json_object(index, error=ModelError, strict=False).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index}: 'weight_map' must map tensor names to files")
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise ModelError(
                f"{index}: weight_map[{tensor!r}] is {name!r}, not a .safetensors file "
                "(pickle weights are refused)"
            )
        if not inside(index.parent, name):
            raise ModelError(
                f"{index}: weight_map[{tensor!r}] {name!r} is not a file inside {index.parent}"
            )


def check_adapter_dir(path: str | Path) -> Path:
    """A PEFT adapter folder whose weights are safetensors, or ConfigError (one line)."""
    p = Path(path)
    if not is_adapter_dir(p):
        raise ModelError(f"{p}: not an adapter folder (no adapter_config.json)")
    if not (p / "adapter_model.safetensors").is_file():
        if (p / "adapter_model.bin").exists():
            raise ModelError(
                f"{p}: adapter weights are not safetensors (pickle weights are refused)"
            )
        raise ModelError(f"{p}: adapter folder has no adapter_model.safetensors")
    return p


def is_adapter_dir(path: str | Path) -> bool:
    """True for a PEFT adapter folder (a LoRA checkpoint or an exported adapter)."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (``base_model_name_or_path``)."""
    p = Path(path) / "adapter_config.json"
    base = read_json_object(p, error=ModelError, strict=False, what="adapter config").get(
        "base_model_name_or_path"
    )
    if not base:
        raise ModelError(
            f"{p}: base_model_name_or_path is missing; pass --model BASE --adapter {path}"
        )
    return str(base)


def model_sources(spec: str | Path, adapter: str | Path | None = None) -> list[str]:
    """Every folder reading ``spec`` (and ``adapter``) reads: the model or checkpoint folder,
    the adapter, and an adapter's base model (an export's output may be none of them, inside
    none of them, and hold none of them)."""
    found = [str(p) for p in (spec, adapter) if p is not None and str(p) != TINY]
    for folder in list(found):
        if Path(folder).is_dir() and is_adapter_dir(folder):
            with contextlib.suppress(ModelError):
                base = adapter_base(folder)
                if base != TINY:
                    found.append(base)
    return found


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


def check_attn_implementation(name: str, *, cuda: bool | None = None) -> None:
    """Refuse an attention implementation this machine cannot run, in one line (the one check,
    used when a model is loaded and by ``perf.check_platform`` before training); ``cuda``: whether
    the run's device is a working GPU (default: whether CUDA is available)."""
    if name not in ("flash_attention_2", "flex_attention"):
        return
    import importlib.util

    if cuda is None:
        cuda = torch.cuda.is_available()
    if name == "flex_attention" and not cuda:
        # torch 2.13's CPU kernel for it (compiled by transformers) has no backward, and its
        # forward let packed records see each other on an AVX2 CPU (AMD EPYC Zen 1): logits 0.4
        # apart where tests/invariants/test_c1_isolation.py allows 1e-5; eager flex, and the
        # compiled kernel on the machines before it, held C1. Not run where C1 is not known to hold.
        raise ConfigError(
            "attn_implementation: flex_attention runs on a CUDA GPU only (on CPU PyTorch's "
            "kernel for it has no backward and can let packed records see each other); use sdpa"
        )
    if name == "flash_attention_2" and (not cuda or importlib.util.find_spec("flash_attn") is None):
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
    check_model_size(path, bytes_per_param=4 if quantization_bit is None else 1)
    tokenizer = load_tokenizer_for(path)
    extra: dict[str, Any] = {}
    if quantization_bit is not None:
        extra = quantization_kwargs(quantization_bit, device)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False, use_safetensors=True,
            dtype=torch.float32, attn_implementation=attn_implementation,
            output_loading_info=True, **extra,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: cannot load the model ({first})") from None
    # transformers fills a tensor the weights lack with random values and only logs it: a
    # config with more layers than its weights would train random layers, silently
    for kind in ("missing_keys", "mismatched_keys", "unexpected_keys"):
        names = sorted(str(k) for k in info.get(kind) or [])
        if names:
            what = {"missing_keys": "has no weights for", "mismatched_keys": "has weights of "
                    "another shape for", "unexpected_keys": "has weights its config has no "
                    "place for, e.g."}[kind]  # fmt: skip
            raise ModelError(f"{path}: the folder {what} {names[0]} ({len(names)} in all)")
    return model, tokenizer


def check_model_size(path: Path, *, bytes_per_param: int) -> None:
    """Refuse a config whose parameters cannot fit in this machine's memory, before anything is
    allocated: a lower bound from its sizes (layers x (2 h^2 + 2 h x intermediate) + vocab x h;
    attention and MLPs have at least that much).

    Raises:
        ModelError: naming config.json, the size and the memory.
    """
    from sftdata import physical_memory

    cfg = read_json_object(path / "config.json", error=ModelError, strict=False)
    sizes = [cfg.get(k) for k in ("num_hidden_layers", "hidden_size", "vocab_size")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        return  # transformers names a config it cannot use
    layers, hidden, vocab = sizes
    inter = cfg.get("intermediate_size")
    inter = inter if isinstance(inter, int) and inter > 0 else hidden
    params = layers * (2 * hidden * hidden + 2 * hidden * inter) + vocab * hidden
    need, have = params * bytes_per_param, physical_memory()
    if need > have:
        raise ModelError(
            f"{path / 'config.json'}: a model of at least {params / 1e9:,.1f}B parameters "
            f"({need / 2**30:,.0f} GiB) cannot be loaded in this machine's {have / 2**30:,.0f} GiB"
        )


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


def check_finetuning(model, config: TrainConfig) -> None:
    """Refuse a LoRA rank past the model's width, before anything is allocated or written: it
    adds nothing a full update would not, and rank x width per layer of a typo (a few zeros too
    many) takes the machine's memory.

    Raises:
        ConfigError: naming ``lora_rank`` and the model's hidden size.
    """
    hidden = getattr(model.config, "hidden_size", None)
    if config.finetuning_type == "lora" and isinstance(hidden, int) and config.lora_rank > hidden:
        raise ConfigError(
            f"lora_rank: {config.lora_rank} is larger than the model's hidden size {hidden}"
        )


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


def compile_layers(model) -> int:
    """``torch.compile`` each decoder layer in place (same shapes every step: one graph, no
    recompiles); the loss head stays eager because its trained-position count varies. Returns
    how many layers were compiled. Compiling per layer composes with DDP and FSDP2's per-layer
    units (torchtune/torchtitan do the same)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


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
            raise ModelError(f"{adapter}: cannot apply the adapter to {model} ({first})") from None
        if (Path(adapter) / "tokenizer.json").is_file() or (
            Path(adapter) / "tokenizer_config.json"
        ).is_file():
            tokenizer = load_tokenizer_for(adapter)
    base.config.use_cache = True
    return base.eval(), tokenizer


def autocast_for(config: TrainConfig, device: torch.device) -> Callable[[], Any]:
    """A context factory: bf16 autocast when asked (weights and the loss stay fp32), else nothing."""
    if not config.bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


__all__ = [
    "CPU_ATTN_IMPLEMENTATIONS",
    "TINY",
    "adapter_base",
    "apply_finetuning",
    "autocast_for",
    "build_tiny",
    "check_attn_implementation",
    "check_finetuning",
    "check_model_dir",
    "compile_layers",
    "is_adapter_dir",
    "is_quantized",
    "load_base_model",
    "load_for_inference",
    "load_tokenizer_for",
    "model_sources",
    "quantization_kwargs",
    "tiny_dir",
]
