"""LLaMA-Factory SFT YAML configs (sfttrain.lf_config) loaded by sfttrain."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from sftdata.cli import main as sftdata_main
from sftdata.errors import ConfigError
from sfttrain.config import TrainConfig
from sfttrain.lf_config import is_llamafactory_config, translate_llamafactory_config
from tests.conftest import FIXTURES

LF_YAML = FIXTURES / "llamafactory" / "qwen_lora_sft.yaml"
OURS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def _convert(*args: str):
    return CliRunner().invoke(sftdata_main, ["convert", *args])


# --- LLaMA-Factory SFT YAML ----------------------------------------------------------------


def test_llamafactory_yaml_loads_with_one_warning(caplog) -> None:
    from sfttrain.config_file import load_run_config

    with caplog.at_level(logging.WARNING, logger="sftpipe"):
        cfg = load_run_config(LF_YAML, ["model_name_or_path=tiny"])[0]
    assert cfg.model_name_or_path == "tiny"
    assert (cfg.finetuning_type, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (
        "lora",
        16,
        32.0,
        0.05,
    )
    assert cfg.lora_target == "all"
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.warmup_ratio) == (1e-4, 3.0, 0.1)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (1, 8)
    assert (cfg.lr_scheduler_type, cfg.bf16, cfg.report_to) == ("cosine", True, "none")
    assert (cfg.logging_steps, cfg.save_steps, cfg.output_dir) == (
        10,
        500,
        "saves/qwen2.5-7b/lora/sft",
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == "sftpipe"]
    assert len(warnings) == 1
    (w,) = warnings
    for key in ("trust_remote_code", "ddp_timeout", "save_only_model"):
        assert key in w
    # the data keys mean what they mean in LLaMA-Factory (a data section): not warned about
    for key in ("dataset", "template", "cutoff_len", "max_samples", "overwrite_output_dir"):
        assert key not in w.split("(ignored): ")[1].split(", ")
    assert "resume_from_checkpoint" not in w  # null: nothing to warn about
    assert "plot_loss" not in w  # sfttrain always writes loss.png


def test_llamafactory_data_keys_become_a_data_section() -> None:
    from sfttrain.config_file import load_run_config

    cfg, data = load_run_config(LF_YAML, ["model_name_or_path=tiny"])
    assert cfg.overwrite_output_dir is True
    assert data == {
        "inputs": [
            {"dataset": "identity", "max_samples": 1000},
            {"dataset": "alpaca_en_demo", "max_samples": 1000},
        ],
        "dataset_info": "data",
        "seq_len": 2048,
        "overflow": "cutoff",  # cutoff_len cuts as in LLaMA-Factory, never drops
        "template": "qwen",
        "num_proc": 16,
    }


@pytest.mark.parametrize(
    ("extra", "key", "value"),
    [
        ({"val_size": 0.1}, "val_fraction", 0.1),
        ({"val_size": 50}, "val_count", 50),
        ({"train_on_prompt": True}, "train_on", "everything"),
        ({"mask_history": True}, "train_on", "last-assistant"),
        ({"seed": 7}, "seed", 7),
    ],
)
def test_llamafactory_data_options_map_onto_ours(extra: dict, key: str, value: object) -> None:
    from sfttrain.lf_config import data_section

    d = data_section({"dataset": "a, b", **extra})
    assert d is not None and d[key] == value
    assert [i["dataset"] for i in d["inputs"]] == ["a", "b"]


def test_lora_alpha_default_follows_llamafactory() -> None:
    from sfttrain.config import build_config

    out, unsupported = translate_llamafactory_config(
        {"stage": "sft", "lora_rank": 4, "dataset": "x"}, OURS
    )
    assert out == {"lora_rank": 4} and unsupported == []  # dataset: a data-section key
    assert build_config(out).effective_lora_alpha == 8.0  # LLaMA-Factory: 2 x lora_rank


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"lora_rnak": 8}, "lora_rnak: unknown LLaMA-Factory config key (did you mean lora_rank?)"),
        (
            {"predict_with_generat": True},
            "predict_with_generat: unknown LLaMA-Factory config key "
            "(did you mean predict_with_generate?)",
        ),
        ({"stage": "dpo"}, "stage: 'dpo' is not supported"),
        ({"do_train": False}, "do_train: False with do_predict false leaves nothing to do"),
    ],
)
def test_llamafactory_yaml_refusals_name_the_key(tmp_path: Path, extra: dict, message: str) -> None:
    import yaml

    from sfttrain.config_file import load_run_config

    d = yaml.safe_load(LF_YAML.read_text(encoding="utf-8"))
    d.update(extra)
    p = tmp_path / "lf.yaml"
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_run_config(p, [])[0]
    assert str(e.value) == f"{p}: {message}" or str(e.value).startswith(f"{p}: {message}")


def test_a_dataset_dir_that_is_not_there_names_the_key_and_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from a folder without data/: the key, the file looked for, and where, in one line
    (not convert's --dataset-info option, which run does not have)."""
    import yaml

    from sfttrain.cli import main as sfttrain_main

    d = yaml.safe_load(LF_YAML.read_text(encoding="utf-8"))
    d["model_name_or_path"] = "tiny"
    (tmp_path / "lf.yaml").write_text(yaml.safe_dump(d), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(sfttrain_main, ["run", "-c", "lf.yaml"])
    (line,) = r.output.strip().splitlines()[-1:]
    assert r.exit_code == 1 and "--dataset-info" not in r.output
    assert line.startswith(
        "Error: lf.yaml: data.dataset_info: data/dataset_info.json does not exist"
    )
    assert f"relative to {tmp_path}" in line and "dataset_dir" in line


def test_plain_config_is_not_treated_as_llamafactory() -> None:
    assert not is_llamafactory_config({"learning_rate": 1e-4, "lora_rank": 8})
    assert is_llamafactory_config({"stage": "sft"})
    with pytest.raises(ConfigError, match="unknown"):
        translate_llamafactory_config({"stage": "sft", "not_a_key": 1}, OURS)


@pytest.mark.slow
def test_sfttrain_run_accepts_the_llamafactory_yaml(shared_data: Path, tmp_path: Path) -> None:
    from sfttrain.cli import main as sfttrain_main

    data, shards = tmp_path / "d.jsonl", tmp_path / "shards"
    assert (
        _convert(
            "--dataset-info", str(shared_data), "--dataset", "identity", "-o", str(data)
        ).exit_code
        == 0
    )
    res = CliRunner().invoke(
        sftdata_main,
        ["pack", str(data), "--tokenizer", "tiny", "--seq-len", "256", "-o", str(shards)],
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        sfttrain_main,
        [
            "run", str(shards), "-c", str(LF_YAML), "--model", "tiny", "-o", str(tmp_path / "run"),
            "--set", "max_steps=1", "--set", "gradient_accumulation_steps=1", "--set", "bf16=false",
            "--no-progress",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "final").is_dir()
    saved = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert saved  # a metrics line was written
