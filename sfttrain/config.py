"""Training configuration: one typed dataclass, its validation (``build_config``) and the
trajectory hash a resume checks; reading it from a file is ``config_file``.

Key names follow Hugging Face ``TrainingArguments`` / LLaMA-Factory where one exists, so a user's
existing YAML mostly just works. Every error names the key (and the file) that is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from sftdata.errors import ConfigError
from sfttrain.trackers import report_to_names


@dataclass
class TrainConfig:
    """Everything that decides a training run. Field docstrings are shown by ``sfttrain run --help-config``."""

    model_name_or_path: str | None = None
    """Local Hugging Face model folder, or ``tiny`` (the built-in tiny Llama); ``--model`` overrides it."""
    finetuning_type: Literal["lora", "full"] = "lora"
    """``lora``: train low-rank adapters on a frozen base; ``full``: train every parameter."""
    lora_rank: int = 8
    """Rank r of every LoRA adapter."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (scale = alpha / r); default 2 × lora_rank as in LLaMA-Factory."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (0 disables it)."""
    lora_target: str = "all"
    """Modules to adapt: comma-separated names (``q_proj,v_proj``), a regex, or ``all`` (every linear layer except lm_head)."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate (after warm-up)."""
    num_train_epochs: float = 3.0
    """Passes over the training rows (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = -1
    """Total optimizer steps; -1 means derive from num_train_epochs."""
    per_device_train_batch_size: int = 1
    """Packed rows per micro-batch on each device."""
    per_device_eval_batch_size: int = 4
    """Packed rows per forward pass during evaluation."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (the loss is normalised by the step's trained tokens, so this does not change it)."""
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up: cosine or linear to 0, or constant."""
    warmup_ratio: float = 0.0
    """Fraction of the total steps used for linear warm-up from 0."""
    warmup_steps: int = 0
    """Warm-up steps; when > 0 it overrides warmup_ratio."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping."""
    bf16: bool = False
    """Run forward/backward under bfloat16 autocast (weights stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (works with LoRA)."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers; packed rows are isolated for each of them (flex_attention: PyTorch's block-sparse kernel, the fast path without flash-attn)."""
    deterministic: bool = False
    """Deterministic kernels only (torch.use_deterministic_algorithms): bit-exact repeats and resumes on CUDA, slower."""
    attn_isolation: Literal["auto", "position_ids", "block_mask"] = "auto"
    """How packed records are kept apart: ``auto`` picks the tested mechanism for attn_implementation."""
    logging_steps: int = 10
    """Write a metrics.jsonl line (and update the progress bar's loss) every this many steps."""
    save_steps: int = 500
    """Write a checkpoint every this many steps (and always at the end); 0 saves only at the end."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest removed first); None keeps all."""
    eval_steps: int | None = None
    """Evaluate on the validation split every this many steps; None evaluates only at the end."""
    eval_strategy: Literal["steps", "epoch", "no"] = "steps"
    """``steps``: every eval_steps and at the end; ``epoch``: at the end of every epoch; ``no``: never (as HF's TrainingArguments)."""
    eval_generate: bool = False
    """At each evaluation also generate every validation record's last reply and score it (BLEU-4, ROUGE-1/2/L; predictions in predictions/step-N/); one process only."""
    max_new_tokens: int = 128
    """Longest reply eval_generate and the predict step generate."""
    do_train: bool = True
    """Train; false runs only the predict step (do_predict) on model_name_or_path, with adapter_name_or_path applied."""
    do_predict: bool = False
    """After training, generate every predict record's last reply and score it (BLEU-4, ROUGE-1/2/L): OUTPUT/generated_predictions.jsonl and predict_results.json, as LLaMA-Factory's predict step; the records: data.predict_inputs (LLaMA-Factory's eval_dataset), else the validation split."""
    adapter_name_or_path: str | None = None
    """LoRA adapter the predict step applies to model_name_or_path when do_train is false."""
    eval_split: str = "validation"
    """Shard split used for evaluation when the shard folder has it."""
    dataloader_drop_last: bool = False
    """Drop the last, smaller optimizer step of each epoch."""
    seed: int = 42
    """Seeds model initialisation (tiny), LoRA initialisation, data order and dropout."""
    output_dir: str | None = None
    """Run folder (``-o`` overrides it): metrics.jsonl, loss.png, checkpoints/, final/."""
    overwrite_output_dir: bool = False
    """Start afresh in a run folder that holds an earlier run (its checkpoints, final/ and metrics are removed first; other files still refuse)."""
    save_merged: bool = False
    """LoRA: also write ``final_merged/``, base + adapter merged into plain weights (fp32) that transformers loads as is."""
    report_to: str | list[str] = "auto"
    """``auto`` (TensorBoard when installed), ``none``, ``all`` (every installed tracker), or ``tensorboard``, ``wandb``, ``mlflow``: one, comma-separated or a list; wandb/MLflow read their usual environment (WANDB_MODE, WANDB_PROJECT, MLFLOW_TRACKING_URI)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ``ddp`` (a full replica per rank) or ``fsdp`` (FSDP2 fully_shard per decoder layer, for models that do not fit)."""
    fsdp_cpu_offload: bool = False
    """FSDP only: keep sharded parameters, gradients and optimizer state in CPU memory (CPUOffloadPolicy)."""
    quantization_bit: int | None = None
    """QLoRA: load the frozen base in 4-bit (nf4 + double quantisation) or 8-bit through bitsandbytes (CUDA only; needs finetuning_type lora)."""
    use_liger_kernel: bool = False
    """Liger fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); needs a CUDA GPU and liger-kernel installed."""
    torch_compile: bool = False
    """torch.compile each decoder layer (the loss head stays eager: its trained-token count varies per batch)."""
    peak_tflops: float | None = None
    """Device peak (dense bf16 TFLOP/s per device) for MFU; None uses the table in sfttrain.perf (CUDA) or reports no MFU (CPU)."""

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able values."""
        return dataclasses.asdict(self)

    @property
    def effective_lora_alpha(self) -> float:
        """lora_alpha, or the LLaMA-Factory default 2 × lora_rank."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank


# Keys that change only what is logged or saved, never the trajectory of the weights: a resume
# may change them; any other difference makes `--resume` refuse (the run would not continue exactly).
NON_TRAJECTORY_KEYS = frozenset(
    {
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "eval_strategy",
        "eval_generate",
        "max_new_tokens",
        "do_predict",
        "do_train",
        "adapter_name_or_path",
        "overwrite_output_dir",
        "per_device_eval_batch_size",
        "eval_split",
        "output_dir",
        "report_to",
        "save_merged",
        "model_name_or_path",
        # How the same arithmetic is laid out over devices, not what it computes: a run may resume
        # with DDP after FSDP or with CPU offload switched (the checkpoint format is the same).
        "distributed",
        "fsdp_cpu_offload",
        "peak_tflops",
    }
)
# Keys replaced in the trajectory by the GLOBAL batch (micro-batch × accumulation × ranks): the
# loss is normalised by the step's trained tokens, so 1 × 8 ≡ 8 × 1 ≡ 2 ranks × 4 (C3), and a run
# saved on 2 ranks × accumulation 4 resumes on 1 rank × accumulation 8.
PER_DEVICE_BATCH_KEYS = frozenset({"per_device_train_batch_size", "gradient_accumulation_steps"})


def global_batch_rows(config: TrainConfig, world_size: int = 1) -> int:
    """Rows per optimizer step over all ranks."""
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size


def trajectory_hash(config: TrainConfig, *, world_size: int = 1) -> str:
    """sha256 of what decides the weights (global batch instead of its per-device split), used to
    refuse resuming another run's checkpoint."""
    d = {
        k: v
        for k, v in config.to_dict().items()
        if k not in NON_TRAJECTORY_KEYS and k not in PER_DEVICE_BATCH_KEYS
    }
    d["global_batch_rows"] = global_batch_rows(config, world_size)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def field_docs() -> dict[str, str]:
    """Field name -> its docstring in one line (read from this module's source)."""
    from sftdata.text import field_docs as docs_of

    return docs_of(TrainConfig)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML value into the field's declared type or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a, where)
            except ConfigError as e:
                last = e
        assert last is not None
        raise last
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off (yes/on) as false (true)
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            meant = [c for c in choices if c in words]
            if len(meant) == 1:
                return meant[0]
            raise ConfigError(
                f"{where}{key}: {value!r} is not one of {', '.join(choices)} (YAML reads an "
                "unquoted yes/no/on/off as true/false: quote the word)"
            )
        if value not in choices:
            raise ConfigError(f"{where}{key}: {value!r} is not one of {', '.join(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}{key}: expected an integer, got {value!r}") from None
    if tp is float:
        # PyYAML reads `1e-4` (no dot) as a string; accept any numeric spelling for float keys.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except ValueError:
            raise ConfigError(f"{where}{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{where}{key}: expected a finite number, got {value!r}")
        return out
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}{key}: expected a list, got {value!r}")
        return [_coerce(key, v, item, where) for v in value]
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp!r}")  # pragma: no cover


def _check_values(c: TrainConfig, where: str) -> None:
    """Reject values that cannot work, naming the key."""

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}{key}: {getattr(c, key)!r} {why}")

    report_to_names(c.report_to, where=where)

    positive = (
        "learning_rate",
        "lora_rank",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "adam_epsilon",
    )
    for key in positive:
        if getattr(c, key) <= 0:
            raise bad(key, "must be > 0")
    for key in ("weight_decay", "max_grad_norm", "warmup_steps", "save_steps", "lora_dropout"):
        if getattr(c, key) < 0:
            raise bad(key, "must be >= 0")
    if c.lora_dropout >= 1:
        raise bad("lora_dropout", "must be < 1")
    if not 0 <= c.seed < 1 << 32:  # numpy's and torch's generators take 32-bit seeds
        raise bad("seed", "must be in [0, 2**32)")
    if not 0 <= c.warmup_ratio < 1:
        raise bad("warmup_ratio", "must be in [0, 1)")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, key) < 1:
            raise bad(key, "must be in [0, 1)")
    if c.lora_alpha is not None and c.lora_alpha <= 0:
        raise bad("lora_alpha", "must be > 0")
    if c.max_steps == 0 or c.max_steps < -1:
        raise bad("max_steps", "must be > 0, or -1 to use num_train_epochs")
    if c.max_steps == -1 and c.num_train_epochs <= 0:
        raise bad("num_train_epochs", "must be > 0 when max_steps is -1")
    if c.save_total_limit is not None and c.save_total_limit < 1:
        raise bad("save_total_limit", "must be >= 1 (or null to keep all)")
    if c.eval_steps is not None and c.eval_steps < 1:
        raise bad("eval_steps", "must be >= 1 (or null to evaluate only at the end)")
    if c.quantization_bit is not None:
        if c.quantization_bit not in (4, 8):
            raise bad("quantization_bit", "must be 4 or 8 (or null for no quantisation)")
        if c.finetuning_type != "lora":
            raise ConfigError(
                f"{where}quantization_bit: a quantised base can only be trained with "
                "finetuning_type: lora (QLoRA), not full"
            )
    if not c.do_train and not c.do_predict:
        raise bad("do_train", "with do_predict false leaves nothing to do (do_predict: true)")
    if c.adapter_name_or_path is not None and c.do_train:
        raise ConfigError(
            f"{where}adapter_name_or_path: applies to the predict step alone (do_train: false); "
            "to go on training an adapter, resume its run (--resume)"
        )
    if c.peak_tflops is not None and c.peak_tflops <= 0:
        raise bad("peak_tflops", "must be > 0 (or null to use the device table)")
    if not c.lora_target.strip():
        raise bad("lora_target", "must name at least one module, a regex, or all")
    if c.lora_target != "all" and _looks_like_regex(c.lora_target):
        try:
            re.compile(c.lora_target)
        except re.error as e:
            raise bad("lora_target", f"is not a valid regex ({e})") from None


def _looks_like_regex(s: str) -> bool:
    return any(ch in s for ch in ".*+?[](){}|^$\\")


def lora_target_modules(target: str) -> str | list[str]:
    """PEFT ``target_modules`` for a lora_target value: "all-linear", a regex string, or a name list."""
    if target.strip() == "all":
        return "all-linear"  # PEFT: every linear layer except the output head
    if _looks_like_regex(target):
        return target
    return [t.strip() for t in target.split(",") if t.strip()]


def build_config(values: dict[str, Any], *, where: str = "") -> TrainConfig:
    """Validate a plain dict into a TrainConfig. ``where`` prefixes errors (e.g. ``"cfg.yaml: "``)."""
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        if key not in _FIELDS:
            close = _closest(key)
            hint = f" (did you mean {close}?)" if close else ""
            raise ConfigError(f"{where}{key}: unknown config key{hint}")
        kwargs[key] = _coerce(key, value, hints[key], where)
    cfg = TrainConfig(**kwargs)
    _check_values(cfg, where)
    return cfg


def _closest(key: str) -> str | None:
    import difflib

    m = difflib.get_close_matches(key, list(_FIELDS), n=1, cutoff=0.75)
    return m[0] if m else None


__all__ = [
    "NON_TRAJECTORY_KEYS",
    "PER_DEVICE_BATCH_KEYS",
    "TrainConfig",
    "build_config",
    "field_docs",
    "global_batch_rows",
    "lora_target_modules",
    "trajectory_hash",
]
