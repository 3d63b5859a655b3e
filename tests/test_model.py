"""C1: a packed row gives the same logits and loss as its records run one by one."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sftdata import IGNORE_INDEX
from sftdata.errors import ConfigError
from sfttrain.config import build_config
from sfttrain.loss import AUTO_ISOLATION, LossModel, forward_kwargs, isolation_for
from sfttrain.model import (
    CPU_ATTN_IMPLEMENTATIONS,
    apply_finetuning,
    build_tiny,
    check_attn_implementation,
    check_model_dir,
    tiny_dir,
)

VOCAB = 97


def small_model(impl: str, seed: int = 0):
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).float().eval()


def packed_row(lengths: list[int], pad: int, seed: int = 1):
    """One packed row: records of `lengths` then `pad` padding tokens (its own segment)."""
    g = torch.Generator().manual_seed(seed)
    records = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.cat([*records, torch.zeros(pad, dtype=torch.long)])
    pos = torch.cat([torch.arange(n) for n in [*lengths, pad] if n])
    labels = ids.clone()
    start = 0
    for n in lengths:
        labels[start] = IGNORE_INDEX  # the first token of a record is never a target
        start += n
    labels[start:] = IGNORE_INDEX
    return records, ids[None], pos[None], labels[None]


CASES = [(impl, iso) for impl in CPU_ATTN_IMPLEMENTATIONS for iso in ("position_ids", "block_mask")]


@pytest.mark.parametrize(("impl", "isolation"), CASES)
@pytest.mark.parametrize("pad", [0, 7])
def test_packed_row_equals_separate_records(impl: str, isolation: str, pad: int) -> None:
    model = small_model(impl)
    lengths = [11, 5, 1, 16]
    records, ids, pos, labels = packed_row(lengths, pad)
    with torch.no_grad():
        packed = model(**forward_kwargs(ids, pos, isolation=isolation)).logits[0]
        start = 0
        for rec in records:
            alone = model(input_ids=rec[None], use_cache=False).logits[0]
            diff = (packed[start : start + len(rec)] - alone).abs().max().item()
            assert diff <= 1e-5, f"record at {start} leaks: {diff}"
            start += len(rec)
        # The loss the trainer computes (sum over trained tokens) equals the sum of separate losses.
        loss = LossModel(model, isolation=isolation)(ids, labels, pos)
        want = 0.0
        for rec in records:
            if len(rec) > 1:
                logits = model(input_ids=rec[None], use_cache=False).logits[0, :-1]
                want += torch.nn.functional.cross_entropy(logits, rec[1:], reduction="sum").item()
    assert abs(loss.item() - want) <= 1e-5 * max(1.0, abs(want))


@pytest.mark.parametrize("impl", CPU_ATTN_IMPLEMENTATIONS)
def test_auto_isolation_is_a_tested_mechanism(impl: str) -> None:
    cfg = build_config({"attn_implementation": impl})
    assert isolation_for(cfg) in ("position_ids", "block_mask")
    assert isolation_for(build_config({"attn_isolation": "block_mask"})) == "block_mask"
    assert set(CPU_ATTN_IMPLEMENTATIONS) <= set(AUTO_ISOLATION)


def test_selective_head_equals_full_logits_loss() -> None:
    model = small_model("sdpa")
    _, ids, pos, labels = packed_row([9, 12], 3)
    fast = LossModel(model, isolation="position_ids", selective_head=True)(ids, labels, pos)
    full = LossModel(model, isolation="position_ids", selective_head=False)(ids, labels, pos)
    assert torch.allclose(fast, full, atol=1e-5)


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
    with pytest.raises(ConfigError, match=r"no config\.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no weights"):
        check_model_dir(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not safetensors"):
        check_model_dir(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
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
    with pytest.raises(ConfigError, match="cannot load the model"):
        load_base_model(tmp_path)
