"""LLaMA-Factory's SFT training YAML, translated for ``sfttrain run -c qwen-sft.yaml``.

:func:`translate_llamafactory_config` keeps the keys our ``TrainConfig`` shares with
LLaMA-Factory (same names, same meaning: ``lora_alpha`` defaults to 2 x ``lora_rank``,
``lora_target: all`` is every linear layer), turns its data keys (``dataset``, ``dataset_dir``,
``template``, ``cutoff_len``, ``val_size``, ``max_samples``, ``preprocessing_num_workers``...)
into a ``data:`` section that ``sfttrain run`` converts and packs, lists the keys that have no
effect here, and rejects keys LLaMA-Factory itself would not know. It is given our field names
and imports nothing of the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sftdata.errors import ConfigError

logger = logging.getLogger("sftpipe")

# Keys that mark a LLaMA-Factory YAML (none of them is one of ours).
LF_MARKERS = frozenset({"stage", "do_train", "dataset", "template", "cutoff_len", "dataset_dir"})

# Data keys that become the run's data section (see data_section); the others of LF_DATA_KEYS
# have no equivalent here and are listed in the warning.
LF_DATA_SECTION_KEYS = frozenset(
    {
        "dataset", "eval_dataset", "dataset_dir", "template", "cutoff_len", "val_size",
        "max_samples", "preprocessing_num_workers", "train_on_prompt", "mask_history",
        # packing with isolated rows trains what unpacked samples train (C1), and pack checks
        # its fingerprint on every run: these two ask for nothing more
        "packing", "neat_packing", "overwrite_cache",
    }
)  # fmt: skip

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
        "evaluation_strategy", "logging_dir", "group_by_length",
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


def translate_llamafactory_config(
    d: dict[str, Any], ours: frozenset[str]
) -> tuple[dict[str, Any], list[str]]:
    """LLaMA-Factory SFT YAML mapping -> (our TrainConfig keys, LF keys that have no effect here;
    the data keys of :data:`LF_DATA_SECTION_KEYS` are :func:`data_section`'s).

    ``ours`` is the set of TrainConfig field names.

    Shared keys keep their name and meaning. ``stage`` must be ``sft``; ``do_train: false`` with
    ``do_predict`` and ``predict_with_generate`` is LLaMA-Factory's predict step alone.
    Keys LLaMA-Factory or HF ``TrainingArguments`` know but we do not (data preparation such as
    ``dataset``/``template``/``cutoff_len``, or features such as ``deepspeed``) are returned in the
    second list, in file order, for ONE warning; keys set to null are dropped silently.

    Raises:
        ConfigError: naming the key, for a key LLaMA-Factory would not know either, or a
            stage or do_predict value this trainer cannot honour.
    """
    hf = _hf_training_keys()
    out: dict[str, Any] = {}
    unsupported: list[str] = []
    for key, value in d.items():
        if key == "stage" and value != "sft":
            raise ConfigError(
                f"stage: {value!r} is not supported; sfttrain does supervised fine-tuning (stage: sft)"
            )
        if key == "do_predict" and value and not d.get("predict_with_generate"):
            raise ConfigError(
                "do_predict: sfttrain's predict step generates and scores replies: set "
                "predict_with_generate: true"
            )
        if key == "predict_with_generate":  # what do_predict means here
            continue
        if key == "stage" or (key in ALWAYS_DONE and value in ALWAYS_DONE[key]):
            continue
        if key in LF_DATA_SECTION_KEYS:
            continue
        if key in ours:
            out[key] = value
        elif key in LF_DATA_KEYS or key in LF_OTHER_KEYS or key in hf:
            if value is not None:
                unsupported.append(key)
        else:
            import difflib

            known = [*ours, *LF_DATA_KEYS, *LF_DATA_SECTION_KEYS, *LF_OTHER_KEYS, *hf]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{key}: unknown LLaMA-Factory config key{hint}")
    return out, unsupported


def data_section(d: dict[str, Any], *, where: str = "") -> dict[str, Any] | None:
    """The ``data:`` section an LF YAML's data keys mean, or None without ``dataset``.

    ``dataset`` (comma-separated) names entries of ``dataset_dir/dataset_info.json`` (``data``
    by default, relative to the working folder as in LLaMA-Factory); ``cutoff_len`` (default
    2048) is the row length and longer records are cut there as LLaMA-Factory cuts them
    (``overflow: cutoff``), not dropped; ``val_size`` below 1 is a share of the records, from 1 a
    count; ``train_on_prompt`` trains every token, ``mask_history`` only the last reply.
    """
    names = _names(d, "dataset", where)
    predict = _names(d, "eval_dataset", where)
    if names is None:
        if predict is None or d.get("do_train", True):
            return None
        names = predict  # predict only (do_train: false): nothing is trained on them
    section: dict[str, Any] = {
        "inputs": [{"dataset": n, "max_samples": d.get("max_samples")} for n in names],
        "dataset_info": d.get("dataset_dir") or "data",
        "seq_len": d.get("cutoff_len") or 2048,
        "overflow": "cutoff",
    }
    if predict is not None:
        section["predict_inputs"] = [
            {"dataset": n, "max_samples": d.get("max_samples")} for n in predict
        ]
    if d.get("template"):
        section["template"] = d["template"]
    val = d.get("val_size")
    if val:
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0:
            raise ConfigError(f"{where}val_size: must be a share below 1 or a record count")
        section["val_fraction" if val < 1 else "val_count"] = val if val < 1 else int(val)
    if d.get("preprocessing_num_workers"):
        section["num_proc"] = d["preprocessing_num_workers"]
    if d.get("seed") is not None:
        section["seed"] = d["seed"]
    if d.get("train_on_prompt"):
        section["train_on"] = "everything"
    elif d.get("mask_history"):
        section["train_on"] = "last-assistant"
    return section


def _names(d: dict[str, Any], key: str, where: str) -> list[str] | None:
    """``dataset``/``eval_dataset``: dataset_info.json names, comma-separated or a list."""
    names = d.get(key)
    if names is None:
        return None
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}{key}: give dataset_info.json names (comma-separated)")
    return names


def translate_for_load(
    d: dict[str, Any], ours: frozenset[str], *, where: str = ""
) -> dict[str, Any]:
    """Translate an LF YAML for ``load_run_config``: errors prefixed with ``where``; ONE warning logged.

    The warning goes to the ``sftpipe`` logger (printed as one line on stderr when the
    application configured no logging).
    """
    try:
        out, unsupported = translate_llamafactory_config(d, ours)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    if unsupported:
        logger.warning(
            "Warning: %sLLaMA-Factory keys not supported by sfttrain (ignored): %s",
            where,
            ", ".join(unsupported),
        )
    data = data_section(d, where=where)
    if data is not None:
        out["data"] = data
    return out
