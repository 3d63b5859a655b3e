"""Loading models (tiny, folders), LoRA targets, refusals (sfttrain/model.py)."""

from __future__ import annotations

import json

import pytest
import torch

from sftdata.errors import ConfigError, ModelError
from sfttrain.config import build_config
from sfttrain.loss import LossModel
from sfttrain.model import (
    apply_finetuning,
    build_tiny,
    check_attn_implementation,
    check_model_dir,
    tiny_dir,
)
from tests.sfttrain_helpers import packed_row, small_model


def test_tiny_config_matches_tiny_tokenizer() -> None:
    from sftdata.tokenizer import load_tokenizer

    cfg = json.loads((tiny_dir() / "config.json").read_text())
    tok = load_tokenizer("tiny")
    assert cfg["vocab_size"] == len(tok)
    assert cfg["eos_token_id"] == tok.eos_token_id
    a, b = build_tiny(seed=3), build_tiny(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_lora_targets_and_gradient_checkpointing() -> None:
    model = apply_finetuning(
        small_model("sdpa"),
        build_config({"lora_target": "q_proj,v_proj", "gradient_checkpointing": True}),
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    model.train()
    _, ids, pos, labels = packed_row([9, 12], 0)
    LossModel(model, isolation="position_ids")(ids, labels, pos).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    everything = apply_finetuning(small_model("sdpa"), build_config({"lora_target": "all"}))
    names = {n.split(".")[-4] for n, p in everything.named_parameters() if p.requires_grad}
    assert "lm_head" not in names and {"q_proj", "gate_proj", "down_proj"} <= names


def test_lora_target_that_matches_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="lora_target"):
        apply_finetuning(small_model("sdpa"), build_config({"lora_target": "nope_proj"}))


def test_model_folder_without_weights_or_config(tmp_path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights"):
        check_model_dir(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not safetensors"):
        check_model_dir(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        check_model_dir(tmp_path / "missing")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine flash-attn may be usable")
def test_flash_attention_without_cuda_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU"):
        check_attn_implementation("flash_attention_2")
    check_attn_implementation("sdpa")


def test_corrupt_weights_are_one_clear_error(tmp_path) -> None:
    from sfttrain.model import load_base_model

    model = small_model("sdpa")
    model.save_pretrained(str(tmp_path))
    from sftdata.tokenizer import load_tokenizer

    load_tokenizer("tiny").save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot load the model"):
        load_base_model(tmp_path)
