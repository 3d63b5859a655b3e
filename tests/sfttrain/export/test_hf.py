"""`sfttrain export`: adapter or merged folders that transformers loads, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from sfttrain.cli import main
from sfttrain.config import build_config
from sfttrain.train import train
from tests.sfttrain_helpers import demo_shards, small_model_dir

IDS = torch.tensor([[5, 17, 300, 42, 7, 1000, 2, 9]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    shards = demo_shards(root / "d", seq_len=64, limit=60)
    model_dir = small_model_dir(root / "base", seed=5)
    for kind in ("lora", "full"):
        cfg = build_config(
            {
                "finetuning_type": kind,
                "max_steps": 3,
                "learning_rate": 2e-2,
                "report_to": "none",
                "save_merged": True,
            }
        )
        train(cfg, shards=shards, output_dir=root / kind, model_spec=str(model_dir), progress=False)
    return root, model_dir


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kw)


def _export(*args: str) -> None:
    r = CliRunner().invoke(main, ["export", *args])
    assert r.exit_code == 0, r.output


def test_merged_lora_equals_base_plus_adapter(runs, tmp_path) -> None:
    root, model_dir = runs
    ckpt = root / "lora" / "checkpoints" / "step-0000003"
    _export(str(ckpt), "-o", str(tmp_path / "merged"), "--merge")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = _logits(_load(tmp_path / "merged"))
    base = _load(model_dir)
    base_logits = _logits(base)
    with_adapter = _logits(PeftModel.from_pretrained(base, str(ckpt)))
    assert (merged - with_adapter).abs().max().item() <= 1e-5
    assert (merged - base_logits).abs().max().item() > 1e-3  # the adapter changed something
    # save_merged: true wrote the same merged model at the end of the run.
    at_end = _logits(_load(root / "lora" / "final_merged"))
    assert (at_end - merged).abs().max().item() <= 1e-6
    assert not (root / "full" / "final_merged").exists()


def test_adapter_export_loads_through_transformers(runs, tmp_path) -> None:
    root, model_dir = runs
    _export(str(root / "lora" / "final"), "-o", str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = _logits(_load(tmp_path / "adapter"))  # transformers applies the adapter via PEFT
    want = _logits(PeftModel.from_pretrained(_load(model_dir), str(root / "lora" / "final")))
    assert (loaded - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_full_checkpoint_export_in_a_dtype(runs, tmp_path, dtype, torch_dtype) -> None:
    root, _ = runs
    _export(str(root / "full" / "final"), "-o", str(tmp_path / "m"), "--dtype", dtype)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}  # noqa: SIM118
    got = _logits(_load(tmp_path / "m", dtype=torch.float32))
    want = _logits(_load(root / "full" / "final"))
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_export_refusals(runs, tmp_path) -> None:
    root, _ = runs
    r = CliRunner().invoke(main, ["export", str(tmp_path / "none"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "does not exist" in r.output
    r = CliRunner().invoke(
        main, ["export", str(root / "lora" / "final"), "-o", str(tmp_path / "x"), "--dtype", "fp16"]
    )
    assert r.exit_code == 1 and "--merge" in r.output
    assert not (tmp_path / "x").exists()


def test_export_json_and_the_run_folder_links(runs, tmp_path) -> None:
    root, _ = runs
    r = CliRunner().invoke(main, ["export", str(root / "lora" / "final"), "-o",
                                  str(tmp_path / "a"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["output"] == str(tmp_path / "a") and d["merged"] is False and d["wrote"]
    # the run folder itself loads as the adapter (its links to final/), as LLaMA-Factory expects
    run = root / "lora"
    assert (run / "adapter_config.json").is_symlink()
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(run)).peft_type.value == "LORA"
