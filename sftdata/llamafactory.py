"""LLaMA-Factory interop: its ``dataset_info.json`` registry and its SFT training YAML.

Registry (``sftdata convert --dataset-info PATH --dataset NAME``): an entry names a local file
(``file_name``, relative to the registry's folder), its ``formatting`` (alpaca, sharegpt; openai
is LLaMA-Factory's sharegpt with OpenAI tags), ``columns`` (raw column -> role in the record) and,
for sharegpt, ``tags`` (role/content keys and role values). Semantics follow LLaMA-Factory's
``src/llamafactory/data/parser.py`` (``DatasetAttr``): defaults ``formatting: alpaca``, alpaca
columns ``prompt=instruction, query=input, response=output``, sharegpt ``messages=conversations``.
Entries that live on a hub (``hf_hub_url``, ``ms_hub_url``, ``script_url``) are refused: only
local files are read, nothing is downloaded.

Training YAML (``sfttrain run -c qwen-sft.yaml``): :func:`translate_llamafactory_config` keeps the
keys our ``TrainConfig`` shares with LLaMA-Factory (same names, same meaning: ``lora_alpha``
defaults to 2 x ``lora_rank``, ``lora_target: all`` is every linear layer), lists the keys that
``sftdata`` handles instead (dataset, template, cutoff_len...) or that have no effect here, and
rejects keys LLaMA-Factory itself would not know.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdata.conversation import Conversation
from sftdata.errors import ConfigError, ConversionError
from sftdata.inputs import inside
from sftdata.jsonfile import read_json

logger = logging.getLogger("sftpipe")

# ---------------------------------------------------------------------------------------------
# dataset_info.json
# ---------------------------------------------------------------------------------------------

HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
ALPACA_COLUMNS = {  # LLaMA-Factory column role -> our canonical Alpaca field
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "system": "system",
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
TAG_KEYS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
)
# LLaMA-Factory's ``formatting: openai`` is sharegpt with these tags (its converter.py).
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function",
    "system_tag": "system",
}
# Columns/flags of non-SFT or multimodal data: refused, since ignoring them would silently
# train on something else than the user registered.
_REFUSED_COLUMNS = ("images", "videos", "audios", "chosen", "rejected", "kto_tag")


@dataclass(frozen=True)
class RegistryEntry:
    """One ``dataset_info.json`` entry, resolved to what ``read_conversations`` needs."""

    name: str
    """The entry's name in the registry."""
    path: Path
    """The local file (or folder) it names, resolved against the registry's folder."""
    fmt: str
    """Our source format: ``alpaca`` or ``sharegpt``."""
    mapping: dict[str, str]
    """Raw column -> canonical field (``--map``)."""
    role_tags: dict[str, str] | None
    """LLaMA-Factory sharegpt ``tags`` (role_tag, content_tag, user_tag...)."""
    notes: list[str] = field(default_factory=list)
    """Things the user should know (e.g. ignored keys)."""


def load_registry(path: str | Path) -> dict[str, Any]:
    """Parse a ``dataset_info.json``; ConversionError naming the file for anything unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset_info.json"
    if not path.exists():
        raise ConversionError(f"{path}: no such file (--dataset-info)")
    data = read_json(path, error=ConversionError)
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object of dataset entries")
    return data


def resolve_entry(info_path: str | Path, name: str) -> RegistryEntry:
    """Resolve registry entry ``name`` of ``info_path`` to a local file plus format/mapping/tags.

    Raises:
        ConversionError: one line naming the registry and entry: unknown name, hub entries
            (only local files are supported), missing file, unsupported formatting/columns/tags.
    """
    info_path = Path(info_path)
    if info_path.is_dir():
        info_path = info_path / "dataset_info.json"
    registry = load_registry(info_path)
    where = f"{info_path}: dataset {name!r}"
    if name not in registry:
        local = sorted(k for k, v in registry.items() if isinstance(v, dict) and "file_name" in v)
        shown = ", ".join(local[:12]) + (" ..." if len(local) > 12 else "")
        raise ConversionError(f"{where} is not in the registry (local entries: {shown or 'none'})")
    entry = registry[name]
    if not isinstance(entry, dict):
        raise ConversionError(f"{where}: entry must be an object")
    hub = [k for k in HUB_KEYS if k in entry]
    if hub:
        raise ConversionError(
            f"{where} points at {hub[0]}={entry[hub[0]]!r}; only local files are supported "
            "(download it and register it with file_name)"
        )
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise ConversionError(f"{where}: has no 'file_name'")
    if entry.get("ranking"):
        raise ConversionError(
            f"{where}: ranking (preference) data is not supervised fine-tuning data"
        )
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise ConversionError(
            f"{where}: formatting {formatting!r} is not alpaca, sharegpt or openai"
        )
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise ConversionError(f"{where}: 'columns' must map column roles to column names")
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise ConversionError(f"{where}: 'tags' must map tag names to strings")
    refused = [c for c in _REFUSED_COLUMNS if c in columns]
    if refused:
        raise ConversionError(
            f"{where}: column {refused[0]!r} is not supported (text-only supervised fine-tuning)"
        )
    allowed = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    # LLaMA-Factory reads "system"/"tools" for every formatting but only these for alpaca/sharegpt.
    allowed = {**allowed, "system": "system", "tools": "tools"}
    mapping: dict[str, str] = {}
    for role, column in columns.items():
        if role not in allowed:
            raise ConversionError(
                f"{where}: column role {role!r} is not one of {', '.join(allowed)} for {formatting}"
            )
        if formatting == "alpaca" and role == "tools":
            raise ConversionError(f"{where}: tools need formatting: sharegpt")
        if column != allowed[role]:
            mapping[column] = allowed[role]
    role_tags: dict[str, str] | None = None
    if formatting in ("sharegpt", "openai"):
        unknown = [t for t in tags if t not in TAG_KEYS]
        if unknown:
            raise ConversionError(
                f"{where}: tag {unknown[0]!r} is not one of {', '.join(TAG_KEYS)}"
            )
        base = OPENAI_TAGS if formatting == "openai" else {}
        role_tags = {**base, **tags} or None
    elif tags:
        raise ConversionError(f"{where}: 'tags' only apply to formatting: sharegpt")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ConversionError(f"{where}: num_samples must be a positive integer")
    if not inside(info_path.parent, file_name):
        raise ConversionError(
            f"{where}: file_name {file_name!r} is not inside the dataset_dir {info_path.parent} "
            "(absolute paths, '..' and links out of it are refused)"
        )
    path = (info_path.parent / file_name).resolve()
    if not path.exists():
        raise ConversionError(f"{where}: file_name {file_name!r} does not exist ({path})")
    notes = []
    if num_samples is not None:
        # LLaMA-Factory draws num_samples records at random with its own RNG: not reproducible
        # here, and silently taking some other subset would be worse than saying so.
        notes.append(
            f"{info_path}: dataset {name!r}: num_samples={num_samples} is not applied "
            "(all records are converted)"
        )
    return RegistryEntry(
        name=name,
        path=path,
        fmt="sharegpt" if formatting in ("sharegpt", "openai") else "alpaca",
        mapping=mapping,
        role_tags=role_tags,
        notes=notes,
    )


def _file_format(entry: RegistryEntry, path: Path) -> str:
    """Our source format for one data file of an entry (LLaMA-Factory picks its loader by extension)."""
    from sftdata.sources.hf import is_saved_dataset

    ext = path.suffix.lower()
    if is_saved_dataset(path):
        return "hf"
    if ext == ".parquet":
        return "parquet"
    if ext == ".csv":
        return "csv"
    if ext in (".json", ".jsonl"):
        return entry.fmt
    raise ConversionError(
        f"{path}: {ext or 'extensionless'} files of dataset {entry.name!r} are not supported "
        "(json, jsonl, csv, parquet or a save_to_disk folder)"
    )


def registry_inputs(
    info_path: str | None,
    names: Sequence[str],
    *,
    fmt: str = "auto",
    mapping: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[RegistryEntry]:
    """``convert --dataset-info PATH --dataset A,B``: one resolved entry per data file, in order.

    Raises:
        ConversionError: a missing half of the option pair, ``--from``/``--map`` given too (the
            registry decides both), or any :func:`resolve_entry` refusal.
    """
    if not info_path:
        raise ConversionError("--dataset needs --dataset-info PATH/dataset_info.json")
    wanted = [n.strip() for item in names for n in item.split(",") if n.strip()]
    if not wanted:
        raise ConversionError("--dataset-info needs --dataset NAME (comma-separated for several)")
    if fmt != "auto" or mapping:
        raise ConversionError(
            "--from/--map do not apply to --dataset-info entries: the registry gives their "
            "formatting and columns"
        )
    out: list[RegistryEntry] = []
    for name in wanted:
        entry = resolve_entry(info_path, name)
        for note in entry.notes:
            if log:
                log(note)
        for path in entry_files(entry):
            out.append(dataclasses.replace(entry, path=path, fmt=_file_format(entry, path)))
    return out


def entry_files(entry: RegistryEntry) -> list[Path]:
    """The data files of an entry: the file, or a folder's visible files in name order.

    LLaMA-Factory loads every file of a folder ``file_name``; a folder written by
    ``datasets.save_to_disk`` is one dataset and is returned as is.
    """
    p = entry.path
    if p.is_dir() and not (p / "state.json").is_file() and not (p / "dataset_dict.json").is_file():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        for f in files:
            if not inside(p, f.name):
                raise ConversionError(
                    f"{f}: a link out of the folder of dataset {entry.name!r} is refused"
                )
        if not files:
            raise ConversionError(f"{p}: folder of dataset {entry.name!r} has no files")
        return files
    return [p]


def read_registered(info_path: str | Path, name: str) -> Iterator[Conversation]:
    """Stream the canonical conversations of registry entry ``name`` (see :func:`resolve_entry`)."""
    from sftdata.sources import read_conversations

    for entry in registry_inputs(str(info_path), [name]):
        yield from read_conversations(
            entry.path, fmt=entry.fmt, mapping=entry.mapping or None, role_tags=entry.role_tags
        )


# ---------------------------------------------------------------------------------------------
# Training YAML
# ---------------------------------------------------------------------------------------------

# Keys that mark a LLaMA-Factory YAML (none of them is one of ours).
LF_MARKERS = frozenset({"stage", "do_train", "dataset", "template", "cutoff_len", "dataset_dir"})

# Data preparation: what `sftdata convert` / `sftdata pack` do before training here.
LF_DATA_KEYS = frozenset(
    {
        "dataset", "eval_dataset", "dataset_dir", "media_dir", "template", "cutoff_len",
        "train_on_prompt", "mask_history", "streaming", "buffer_size", "mix_strategy",
        "interleave_probs", "overwrite_cache", "preprocessing_batch_size",
        "preprocessing_num_workers", "max_samples", "eval_num_beams", "ignore_pad_token_for_loss",
        "val_size", "eval_on_each_dataset", "packing", "neat_packing", "tool_format",
        "tokenized_path", "default_system", "enable_thinking", "data_shared_file_system",
    }
)  # fmt: skip

# LLaMA-Factory model / fine-tuning / generation / evaluation arguments we do not implement.
LF_OTHER_KEYS = frozenset(
    {
        # method
        "stage", "do_train", "do_eval", "do_predict", "pure_bf16", "use_llama_pro",
        "use_adam_mini", "use_muon", "freeze_vision_tower", "freeze_multi_modal_projector",
        "freeze_language_model", "compute_accuracy", "disable_shuffling", "early_stopping_steps",
        "plot_loss", "include_effective_tokens_per_second", "additional_target",
        "loraplus_lr_ratio", "loraplus_lr_embedding", "use_rslora", "use_dora", "pissa_init",
        "pissa_iter", "pissa_convert", "create_new_adapter", "freeze_trainable_layers",
        "freeze_trainable_modules", "freeze_extra_modules", "module_dropout", "oft_rank",
        "oft_block_size", "oft_target", "pref_beta", "pref_ftx", "pref_bco_weight", "pref_loss",
        "dpo_label_smoothing", "kto_chosen_weight", "kto_rejected_weight", "simpo_gamma",
        "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards",
        "ref_model", "ref_model_adapters", "ref_model_quantization_bit", "reward_model",
        "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type", "ld_alpha",
        "use_galore", "galore_target", "galore_rank", "galore_update_interval", "galore_scale",
        "galore_proj_type", "galore_layerwise", "use_apollo", "apollo_target", "apollo_rank",
        "apollo_update_interval", "apollo_scale", "apollo_proj", "apollo_proj_type",
        "apollo_scale_type", "apollo_layerwise", "apollo_scale_front", "use_badam", "badam_mode",
        "badam_start_block", "badam_switch_mode", "badam_switch_interval", "badam_update_ratio",
        "badam_mask_mode", "badam_verbose", "use_swanlab", "swanlab_project", "swanlab_workspace",
        "swanlab_run_name", "swanlab_mode", "swanlab_api_key", "swanlab_logdir",
        "use_ray", "ray_run_name", "ray_storage_path", "ray_num_workers",
        "resources_per_worker", "placement_strategy", "ray_init_kwargs",
        # model
        "adapter_name_or_path", "adapter_folder", "cache_dir", "use_fast_tokenizer", "resize_vocab",
        "split_special_tokens", "add_tokens", "add_special_tokens", "new_special_tokens",
        "model_revision", "low_cpu_mem_usage", "rope_scaling", "flash_attn", "shift_attn",
        "mixture_of_depths", "use_unsloth", "use_unsloth_gc", "enable_liger_kernel",
        "moe_aux_loss_coef", "disable_gradient_checkpointing", "use_reentrant_gc",
        "upcast_layernorm", "upcast_lmhead_output", "train_from_scratch", "infer_backend",
        "offload_folder", "use_cache", "infer_dtype", "hf_hub_token", "ms_hub_token",
        "om_hub_token", "print_param_status", "trust_remote_code", "quantization_method",
        "quantization_bit", "quantization_type", "double_quantization", "quantization_device_map",
        "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches",
        "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video",
        "audio_sampling_rate", "export_dir", "export_size", "export_device",
        "export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
        "export_quantization_maxlen", "export_legacy_format", "export_hub_model_id",
        "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank",
        "vllm_config", "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size",
        "sglang_config", "sglang_lora_backend", "model_max_length", "block_diag_attn",
        "compute_dtype", "device_map", "kt_optimize_rule", "use_kt",
        "cpu_infer", "chunk_size", "mode", "fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather",
        # HF TrainingArguments keys that transformers 5 dropped but LF YAMLs still carry
        "overwrite_output_dir", "evaluation_strategy", "logging_dir", "group_by_length",
        "no_cuda", "use_mps_device", "fp16_backend", "push_to_hub_token", "push_to_hub_model_id",
        "push_to_hub_organization", "mp_parameters", "ray_scope", "use_legacy_prediction_loop",
        # generation / evaluation
        "do_sample", "temperature", "top_p", "top_k", "num_beams", "max_length",
        "max_new_tokens", "repetition_penalty", "length_penalty", "skip_special_tokens",
        "task", "task_dir", "batch_size", "lang", "n_shot", "save_dir", "download_mode",
    }
)  # fmt: skip


# LF keys whose behaviour sfttrain always has: dropped without a warning when set that way.
ALWAYS_DONE: dict[str, tuple[Any, ...]] = {"plot_loss": (True,)}


def _hf_training_keys() -> frozenset[str]:
    """Field names of ``transformers.Seq2SeqTrainingArguments`` (LLaMA-Factory's SFT arguments)."""
    from transformers import Seq2SeqTrainingArguments

    return frozenset(f.name for f in dataclasses.fields(Seq2SeqTrainingArguments))


def is_llamafactory_config(d: dict[str, Any]) -> bool:
    """Whether a loaded YAML mapping is a LLaMA-Factory config (it has keys such as ``stage``)."""
    return any(k in LF_MARKERS for k in d)


def _our_keys() -> frozenset[str]:
    import dataclasses

    from sfttrain.config import TrainConfig

    return frozenset(f.name for f in dataclasses.fields(TrainConfig))


def translate_llamafactory_config(d: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """LLaMA-Factory SFT YAML mapping -> (our TrainConfig keys, LF keys that have no effect here).

    Shared keys keep their name and meaning. ``stage`` must be ``sft`` and ``do_train`` true.
    Keys LLaMA-Factory or HF ``TrainingArguments`` know but we do not (data preparation such as
    ``dataset``/``template``/``cutoff_len``, or features such as ``deepspeed``) are returned in the
    second list, in file order, for ONE warning; keys set to null are dropped silently.

    Raises:
        ConfigError: naming the key, for a key LLaMA-Factory would not know either, or a
            stage/do_train value this trainer cannot honour.
    """
    ours = _our_keys()
    hf = _hf_training_keys()
    out: dict[str, Any] = {}
    unsupported: list[str] = []
    for key, value in d.items():
        if key == "stage" and value != "sft":
            raise ConfigError(
                f"stage: {value!r} is not supported; sfttrain does supervised fine-tuning (stage: sft)"
            )
        if key == "do_train" and value is not True:
            raise ConfigError(f"do_train: {value!r}; sfttrain run trains (do_train: true)")
        if key in ("stage", "do_train") or (key in ALWAYS_DONE and value in ALWAYS_DONE[key]):
            continue
        if key in ours:
            out[key] = value
        elif key in LF_DATA_KEYS or key in LF_OTHER_KEYS or key in hf:
            if value is not None:
                unsupported.append(key)
        else:
            raise ConfigError(f"{key}: unknown LLaMA-Factory config key")
    return out, unsupported


def prep_command(d: dict[str, Any]) -> str:
    """The ``sftdata`` commands equivalent to an LF YAML's data keys (for the warning)."""
    dataset = d.get("dataset") or "NAME"
    if isinstance(dataset, list):
        dataset = ",".join(map(str, dataset))
    dataset_dir = d.get("dataset_dir") or "data"
    model = d.get("model_name_or_path") or "MODEL"
    seq = d.get("cutoff_len") or 2048
    return (
        f"sftdata convert --dataset-info {dataset_dir}/dataset_info.json --dataset {dataset} "
        f"-o data.jsonl && sftdata pack data.jsonl --tokenizer {model} --seq-len {seq} -o shards"
    )


def translate_for_load(d: dict[str, Any], *, where: str = "") -> dict[str, Any]:
    """Translate an LF YAML for ``load_config``: errors prefixed with ``where``; ONE warning logged.

    The warning goes to the ``sftpipe`` logger (printed as one line on stderr when the
    application configured no logging).
    """
    try:
        out, unsupported = translate_llamafactory_config(d)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    if unsupported:
        data = [k for k in unsupported if k in LF_DATA_KEYS]
        hint = f" (prepare the data with: {prep_command(d)})" if data else ""
        logger.warning(
            "Warning: %sLLaMA-Factory keys not used by sfttrain (data preparation is done by "
            "sftdata; the rest is not supported): %s%s",
            where,
            ", ".join(unsupported),
            hint,
        )
    return out
