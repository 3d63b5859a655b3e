"""TrainConfig: YAML + --set overrides, typed parsing, errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from sftdata.errors import ConfigError
from sfttrain.config import (
    NON_TRAJECTORY_KEYS,
    TrainConfig,
    build_config,
    field_docs,
    lora_target_modules,
    trajectory_hash,
)
from sfttrain.config_file import load_run_config


def test_yaml_and_overrides_are_typed(tmp_path) -> None:
    cfg = tmp_path / "cfg.yaml"
    # LLaMA-Factory style file; `1e-4` without a dot is a string to PyYAML and must still work.
    cfg.write_text(
        "finetuning_type: lora\nlora_rank: 16\nlearning_rate: 1e-4\nbf16: false\n"
        "lr_scheduler_type: linear\nsave_total_limit: 3\n"
    )
    c = load_run_config(cfg, ["lora_rank=32", "bf16=true", "warmup_ratio=0.1", "eval_steps=null"])[
        0
    ]
    assert c.lora_rank == 32 and c.bf16 is True and c.warmup_ratio == 0.1
    assert c.learning_rate == pytest.approx(1e-4) and isinstance(c.learning_rate, float)
    assert c.lr_scheduler_type == "linear" and c.save_total_limit == 3 and c.eval_steps is None
    assert c.effective_lora_alpha == 64.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=0.1", r"--set lr: unknown config key"),
        ("lora_rnak=4", r"did you mean lora_rank"),
        ("lora_rank=abc", r"--set lora_rank: expected an integer"),
        ("lora_rank=1.5", r"--set lora_rank: expected an integer"),
        ("bf16=maybe", r"--set bf16: expected true or false"),
        ("learning_rate=-1e-4", r"--set learning_rate: .* must be > 0"),
        ("lora_rank=0", r"--set lora_rank: 0 must be > 0"),
        ("lora_dropout=1.5", r"--set lora_dropout: .* must be < 1"),
        ("warmup_ratio=1", r"--set warmup_ratio"),
        ("max_steps=0", r"--set max_steps"),
        ("lr_scheduler_type=step", r"--set lr_scheduler_type: 'step' is not one of cosine"),
        ("finetuning_type=qlora", r"--set finetuning_type"),
        ("learning_rate=nan", r"--set learning_rate: expected a finite number"),
        ("lora_target=q_proj(", r"--set lora_target: .* not a valid regex"),
        ("noequals", r"expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])[0]


def test_yaml_errors_name_the_file_and_key(tmp_path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("learning_rate: -0.5\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: learning_rate: -0\.5 must be > 0"):
        load_run_config(cfg, [])[0]
    cfg.write_text("per_device_train_batch_size: [1, 2]\n")
    with pytest.raises(
        ConfigError, match=r"cfg\.yaml: per_device_train_batch_size: expected an integer"
    ):
        load_run_config(cfg, [])[0]
    cfg.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(cfg, [])[0]
    cfg.write_text("a: [\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:\d+: not valid YAML"):
        load_run_config(cfg, [])[0]
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such file \(config\)"):
        load_run_config(tmp_path / "missing.yaml", [])[0]


def test_every_field_has_a_docstring() -> None:
    docs = field_docs()
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert [n for n in names if not docs.get(n)] == []


def test_lora_target_forms() -> None:
    assert lora_target_modules("all") == "all-linear"
    assert lora_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert lora_target_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"


def test_trajectory_hash_ignores_only_logging_and_saving_keys() -> None:
    base = build_config({})
    assert trajectory_hash(base) == trajectory_hash(
        build_config({"logging_steps": 1, "save_steps": 3})
    )
    assert trajectory_hash(base) != trajectory_hash(build_config({"learning_rate": 2e-4}))
    assert trajectory_hash(base) != trajectory_hash(build_config({"lora_dropout": 0.1}))
    assert {"learning_rate", "seed", "gradient_accumulation_steps"}.isdisjoint(NON_TRAJECTORY_KEYS)
