"""One command from a config to a trained model: `sfttrain run -c` with a LLaMA-Factory YAML or a
native ``data:`` section converts, packs (cached) and trains; logs without a terminal are plain
lines; bad data sections are one line naming the key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sfttrain.cli import main
from tests.conftest import FIXTURES, ROOT
from tests.sfttrain_helpers import demo_shards, sfttrain_cmd, small_model_dir, subprocess_env

TUTORIAL = FIXTURES / "llamafactory" / "tutorial_qwen_sft.yaml"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model folder (a small Llama and the tiny tokenizer), as a downloaded model is."""
    return small_model_dir(tmp_path_factory.mktemp("models") / "tiny-chat", max_positions=2048)


def _run(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``sfttrain ARGS`` in a subprocess: stderr is a pipe (no terminal), as in a cluster job."""
    env = {**subprocess_env(), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        sfttrain_cmd(*map(str, args)), cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_tutorial_llamafactory_yaml_trains_evaluates_and_plots(
    tmp_path: Path, shared_data: Path, tiny_model: Path
) -> None:
    (tmp_path / "data").mkdir()
    shutil.copy(shared_data / "alpaca_en_demo.json", tmp_path / "data" / "grammar.json")
    (tmp_path / "data" / "dataset_info.json").write_text(
        json.dumps({"grammar": {"file_name": "grammar.json"}}), encoding="utf-8"
    )
    cfg = yaml.safe_load(TUTORIAL.read_text(encoding="utf-8"))
    cfg["model_name_or_path"] = str(tiny_model)  # the only change
    (tmp_path / "qwen-sft.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    r = _run("run", "-c", "qwen-sft.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / cfg["output_dir"]
    assert (run / "final" / "adapter_model.safetensors").is_file() and (run / "loss.png").is_file()
    # where a LLaMA-Factory inference config looks for the adapter: output_dir itself
    assert (run / "adapter_model.safetensors").resolve() == (
        run / "final" / "adapter_model.safetensors"
    ).resolve()
    rows = _metrics(run)
    assert any("eval_loss" in m for m in rows) and any("loss" in m for m in rows)
    assert "eval at step" in r.stderr and "data: grammar: 999 records, 200 into the mix" in r.stderr
    index = json.loads(
        next((Path(os.environ["SFTPIPE_CACHE"]) / "data").glob("*/shards/index.json")).read_text()
    )
    # cutoff_len is the row length; longer records are cut as LLaMA-Factory cuts them, kept
    assert index["seq_len"] == 1024 and index["options"]["overflow"] == "cutoff"
    assert index["splits"]["validation"]["records"] == 20  # val_size 0.1 of max_samples 200
    # a second run reuses the shards; overwrite_output_dir: true starts the run afresh. Two
    # steps tell it (and halve the test): the first run's log must be gone, not continued.
    again = _run("run", "-c", "qwen-sft.yaml", "--set", "max_steps=2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already up to date" in again.stderr
    assert "overwrite_output_dir: removed the earlier run" in again.stderr
    fresh = _metrics(run)
    assert fresh[0]["step"] == rows[0]["step"] == 2
    assert max(m["step"] for m in fresh) == 2 < max(m["step"] for m in rows)


@pytest.mark.slow
def test_a_native_data_section_mixes_two_real_files_by_weight(
    tmp_path: Path, shared_data: Path
) -> None:
    cfg = {
        "model_name_or_path": "tiny",
        "max_steps": 2,
        "data": {
            "inputs": [
                {"path": str(shared_data / "alpaca_en_demo.json"), "max_samples": 60},
                {"path": str(shared_data / "qa_en.csv"), "weight": 0.5, "max_samples": 40},
            ],
            "seq_len": 512,
            "overflow": "truncate",
            "val_count": 8,
            "cache_dir": str(tmp_path / "work"),
        },
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    r = CliRunner().invoke(main, ["run", "-c", str(tmp_path / "train.yaml"), "-o",
                                  str(tmp_path / "run"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "60 into the mix" in r.stderr and "20 into the mix" in r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["step"] == 2 and result["final"].endswith("final")
    index = json.loads((tmp_path / "work" / "shards" / "index.json").read_text())
    assert index["counts"]["records_in"] == 80


def test_without_a_terminal_every_log_step_is_one_plain_line(tmp_path: Path) -> None:
    shards = demo_shards(tmp_path, val_count=4)
    r = _run(
        "run", shards, "--model", "tiny", "-o", tmp_path / "run", "--set", "max_steps=4",
        "--set", "logging_steps=2", "--set", "eval_steps=2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    steps = [x for x in lines if x.startswith("step ")]
    assert [x.split(":")[0] for x in steps] == ["step 2/4", "step 4/4"]
    assert all(
        "loss " in x and "lr " in x and "trained tokens/s" in x and "ETA " in x for x in steps
    )
    evals = [x for x in lines if x.startswith("eval at step ")]
    assert [x.split(":")[0] for x in evals] == ["eval at step 2/4", "eval at step 4/4"]
    assert "\x1b[" not in r.stderr and "━" not in r.stderr  # no progress bar, no colour codes


def test_a_cluster_log_says_how_the_run_starts_saves_and_resumes(tmp_path: Path) -> None:
    shards = demo_shards(tmp_path, val_count=4)
    index = json.loads((shards / "index.json").read_text())["splits"]["train"]
    run = tmp_path / "run"
    args = ("run", shards, "--model", "tiny", "-o", run, "--set", "max_steps=4",
            "--set", "save_steps=2", "--set", "gradient_accumulation_steps=2")  # fmt: skip
    r = _run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    start = [x for x in lines if x.startswith("run: ")]
    assert len(start) == 4 and lines.index(start[0]) < min(
        i for i, x in enumerate(lines) if x.startswith("step ")
    )  # the block comes before the first step
    assert "model tiny (LlamaForCausalLM)" in start[0] and "LoRA r=8" in start[0]
    trainable = int(start[0].split(" parameters, ")[1].split(" trainable")[0].replace(",", ""))
    assert 0 < trainable < int(start[0].split(" parameters")[0].split()[-1].replace(",", ""))
    assert start[1] == "run: fp32 on cpu, world size 1"
    assert f"{index['rows']:,} rows of 64 tokens" in start[2]
    assert f"{index['trained_tokens']:,} trained" in start[2]
    assert "4 steps of 2 rows" in start[3] and str(run) in start[3]
    saved = [x for x in lines if x.startswith("checkpoint saved at step ")]
    assert [x.split(":")[0] for x in saved] == ["checkpoint saved at step 2",
                                               "checkpoint saved at step 4"]  # fmt: skip
    assert str(run / "checkpoints" / "step-0000002") in saved[0] and saved[0].endswith(" s)")
    # resumed from a named checkpoint: said at the start, before the first step trained
    again = _run(*args, "--resume", run / "checkpoints" / "step-0000002")
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stderr.splitlines()
    resumed = f"resumed from step 2 (checkpoint {run / 'checkpoints' / 'step-0000002'})"
    assert resumed in lines
    assert lines.index(resumed) < next(i for i, x in enumerate(lines) if x.startswith("step "))
    # overwrite_output_dir says what it removed
    fresh = _run(*args, "--set", "overwrite_output_dir=true")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert f"overwrite_output_dir: removed the earlier run in {run}" in fresh.stderr


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        ({"inputs": [{"path": "IN", "weight": 0}]}, "data.inputs[0].weight: must be a number > 0"),
        ({"inputs": ["missing.json"]}, "data.inputs[0].path: missing.json does not exist"),
        ({"inputs": ["IN"], "template": "no-such"}, "data.template: template 'no-such' is not"),
    ],
)
def test_a_bad_data_section_is_one_line(tmp_path: Path, data: dict, expect: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n", encoding="utf-8")
    text = json.dumps(data).replace('"IN"', json.dumps(str(src)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "tiny", "data": json.loads(text)}))
    r = CliRunner().invoke(main, ["run", "-c", str(cfg), "-o", str(tmp_path / "run")])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ") and expect in r.output
    assert not (tmp_path / "run").exists()


def test_a_hub_id_as_the_model_is_refused_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
                                   "data": {"inputs": [str(cfg)]}}))  # fmt: skip
    r = CliRunner().invoke(main, ["run", "-c", str(cfg), "-o", str(tmp_path / "run")])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "model_name_or_path" in r.output and "local" in r.output


def test_given_shards_win_over_a_data_section_and_one_is_needed(tmp_path: Path) -> None:
    shards = demo_shards(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "tiny", "max_steps": 1,
                                   "data": {"inputs": ["nowhere.json"]}}))  # fmt: skip
    r = CliRunner().invoke(main, ["run", str(shards), "-c", str(cfg), "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert f"training on {shards}" in r.stderr  # the section is not even read
    r = CliRunner().invoke(main, ["run", "--model", "tiny", "-o", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "give SHARDS, or a config" in r.output


@pytest.mark.slow
def test_llamafactory_predict_step_after_training_and_alone(
    tmp_path: Path, shared_data: Path, tiny_model: Path
) -> None:
    """do_predict + predict_with_generate on eval_dataset: LLaMA-Factory's files in output_dir
    after training, and the same predictions from the predict YAML alone (do_train: false, the
    run's adapter): the same greedy model, the same replies."""
    (tmp_path / "data").mkdir()
    records = json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    (tmp_path / "data" / "train.json").write_text(json.dumps(records[:-30]), encoding="utf-8")
    (tmp_path / "data" / "test.json").write_text(json.dumps(records[-30:]), encoding="utf-8")
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(
        {"train": {"file_name": "train.json"}, "test": {"file_name": "test.json"}}
    ), encoding="utf-8")  # fmt: skip
    common = {"model_name_or_path": str(tiny_model), "stage": "sft", "do_predict": True,
              "predict_with_generate": True, "finetuning_type": "lora", "eval_dataset": "test",
              "template": "qwen", "cutoff_len": 256, "max_samples": 12, "max_new_tokens": 6,
              "report_to": "none"}  # fmt: skip
    train = {
        **common,
        "do_train": True,
        "dataset": "train",
        "output_dir": "saves/sft",
        "max_steps": 2,
        "eval_strategy": False,
    }  # fmt: skip  (YAML's unquoted `no`)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train), encoding="utf-8")
    r = _run("run", "-c", "train.yaml", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    sft = tmp_path / "saves" / "sft"
    rows = [json.loads(x) for x in (sft / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(set(x) == {"prompt", "predict", "label"} for x in rows)
    # the labels are the test records' replies (eval_dataset, not the training data)
    test_replies = [x["output"].strip() for x in records[-30:]]
    assert all(any(t.startswith(x["label"]) for t in test_replies) for x in rows)
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    results = json.loads((sft / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l",
            "predict_runtime", "predict_samples_per_second"} <= set(results)  # fmt: skip
    assert result["predict"] == results and results["predict_samples"] == 12
    assert (sft / "predict" / "predictions.jsonl").is_file()  # ours beside LF's

    alone = {**common, "do_train": False, "adapter_name_or_path": "saves/sft",
             "output_dir": "saves/predict", "temperature": 0.7}  # fmt: skip
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(alone), encoding="utf-8")
    r = _run("run", "-c", "predict.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("predict: 12 replies generated: BLEU-4 ")
    assert "temperature" in r.stderr  # generation settings other than greedy: named, ignored
    again = tmp_path / "saves" / "predict" / "generated_predictions.jsonl"
    assert [json.loads(x) for x in again.read_text().splitlines()] == rows
    assert not (tmp_path / "saves" / "predict" / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize(
    ("keys", "expect"),
    [
        ({"do_predict": True}, "do_predict: sfttrain's predict step generates and scores replies: "
                               "set predict_with_generate: true"),
        ({"do_train": False}, "do_train: False with do_predict false leaves nothing to do"),
        ({"adapter_name_or_path": "x"}, "adapter_name_or_path: applies to the predict step alone"),
        ({"eval_strategy": True}, "eval_strategy: True is not one of steps, epoch, no (YAML reads "
                                  "an unquoted yes/no/on/off as true/false: quote the word)"),
    ],
)  # fmt: skip
def test_predict_and_yaml_boolean_mistakes_are_one_line(
    tmp_path: Path, keys: dict, expect: str
) -> None:
    cfg = {"model_name_or_path": "tiny", "stage": "sft", "dataset": "x", "output_dir": "o", **keys}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    r = CliRunner().invoke(main, ["run", "-c", str(tmp_path / "c.yaml")])
    (line,) = r.output.strip().splitlines()
    assert r.exit_code == 1 and line.startswith("Error: ") and expect in line, r.output
