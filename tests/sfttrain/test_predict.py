"""Generation metrics (``sfttrain.predict``): prompts and references taken from the shards equal
the records', BLEU/ROUGE equal the libraries' own on known answers, and ``eval --generate`` and
``eval_generate`` write predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from sfttrain.cli import main
from sfttrain.config import build_config
from sfttrain.predict import examples, scores
from sfttrain.train import train
from tests.sfttrain_helpers import demo_jsonl, demo_shards, metrics


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_shards(tmp_path_factory.mktemp("pred"), val_count=5, seq_len=128)


def test_known_answers() -> None:
    same = scores(["The opposite of short is long."], ["The opposite of short is long."])
    assert same == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    apart = scores(["blue sky"], ["green grass"])
    assert apart["rouge-1"] == apart["rouge-2"] == apart["rouge-l"] == 0.0
    assert apart["bleu-4"] < 1.0


def test_scores_are_the_libraries_own_on_jieba_tokens() -> None:
    import jieba
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = ["今天天气很好，我们去公园。", "The cat sat on the mat."]
    refs = ["今天天气不错，我们去公园散步。", "A cat sat on a mat."]

    class Jieba:
        def tokenize(self, text: str) -> list[str]:
            return [t for t in jieba.cut(text) if t.strip()]

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Jieba())
    want = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for p, r in zip(preds, refs, strict=True):
        tp, tr = " ".join(Jieba().tokenize(p)), " ".join(Jieba().tokenize(r))
        want["bleu-4"] += sacrebleu.sentence_bleu(tp, [tr], tokenize="none").score / 2
        s = scorer.score(r, p)
        for ours, theirs in (("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL")):
            want[ours] += 100 * s[theirs].fmeasure / 2
    got = scores(preds, refs)
    assert got == pytest.approx(want, abs=1e-3)
    assert 0 < got["rouge-1"] < 100 and 0 < got["bleu-4"] < 100


def test_prompts_and_references_are_the_records(shards: Path, tmp_path: Path) -> None:
    from sftdata.tokenizer import load_tokenizer
    from sfttrain.data import open_split

    tok = load_tokenizer("tiny")
    reader = open_split(shards, "validation")
    stop = {tok.convert_tokens_to_ids("<|im_end|>")}
    records = {
        json.loads(x)["id"]: json.loads(x)
        for x in demo_jsonl(tmp_path / "src").read_text(encoding="utf-8").splitlines()
    }
    got = list(examples(reader, stop))
    assert len(got) == 5
    for e in got:
        msgs = records[e.record_id]["messages"]
        assert tok.decode(e.reference_ids) == msgs[-1]["content"]
        prompt = tok.decode(e.prompt_ids)
        assert prompt.endswith("<|im_start|>assistant\n") and msgs[0]["content"] in prompt


def test_eval_generate_writes_predictions_and_scores(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    r = CliRunner().invoke(main, ["eval", str(shards), "--model", "tiny", "--generate", "-o",
                                  str(out), "--max-new-tokens", "8", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert result["predicted"] == len(rows) == 5
    assert set(rows[0]) == {"id", "prompt", "reference", "prediction"}
    assert json.loads((out / "generate_metrics.json").read_text()) == result
    assert {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "loss"} <= set(result)
    r = CliRunner().invoke(main, ["eval", str(shards), "--model", "tiny", "--generate"])
    assert r.exit_code == 2 and "-o/--output" in r.output


def test_eval_generate_during_training(shards: Path, tmp_path: Path) -> None:
    cfg = build_config({"max_steps": 2, "eval_steps": 1, "eval_generate": True,
                        "max_new_tokens": 4, "report_to": "none"})  # fmt: skip
    train(cfg, shards=shards, output_dir=tmp_path / "run", model_spec="tiny", progress=False)
    evals = [m for m in metrics(tmp_path / "run") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [1, 2]
    assert all({"eval_bleu-4", "eval_rouge-l"} <= set(m) for m in evals)
    for step in (1, 2):
        lines = tmp_path / "run" / "predictions" / f"step-{step:07d}" / "predictions.jsonl"
        assert len(lines.read_text().splitlines()) == 5


def test_eval_takes_a_run_folder_and_keeps_earlier_predictions(
    shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = build_config({"max_steps": 2, "eval_steps": 1, "eval_generate": True,
                        "max_new_tokens": 4, "report_to": "none"})  # fmt: skip
    train(cfg, shards=shards, output_dir=run, model_spec="tiny", progress=False)

    def cli(*args: object):
        return CliRunner().invoke(main, ["eval", *map(str, args)])

    # a run folder: the shards it trained on and its final weights, as if both were named
    by_run = cli(run, "--json")
    named = cli(shards, "--model", run / "final", "--json")
    assert by_run.exit_code == named.exit_code == 0, by_run.output
    assert json.loads(by_run.stdout) == json.loads(named.stdout)
    out = tmp_path / "pred"
    first = cli(run, "--generate", "-o", out, "--max-new-tokens", "4", "--max-samples", "2")
    assert first.exit_code == 0, first.output
    assert (
        "BLEU-4" in first.stdout and len((out / "predictions.jsonl").read_text().splitlines()) == 2
    )
    # a second evaluation into the same folder needs --overwrite
    again = cli(run, "--generate", "-o", out, "--max-new-tokens", "4")
    assert again.exit_code == 1 and "already holds predictions.jsonl" in again.output
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2  # untouched
    assert cli(run, "--generate", "-o", out, "--max-new-tokens", "4", "--overwrite").exit_code == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 5
    # the eval line of a run with eval_generate carries the scores (console and cluster log)
    r = CliRunner().invoke(main, ["run", str(shards), "--model", "tiny", "-o", str(tmp_path / "r2"),
                                  "--set", "max_steps=1", "--set", "eval_generate=true",
                                  "--set", "max_new_tokens=2", "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("eval at step 1/1")]
    assert all(f"{m} " in line for m in ("BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L")), line
    # shards packed again since the run: named, not silently evaluated
    index = json.loads((shards / "index.json").read_text())
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    (moved / "index.json").write_text(json.dumps(index, indent=1))
    state = run / "checkpoints" / "step-0000002" / "trainer_state.json"
    s = json.loads(state.read_text())
    s["shards"]["path"] = str(moved)
    state.write_text(json.dumps(s))
    r = cli(run, "--json", "--allow-unverified")
    assert r.exit_code == 1 and "were packed again since the run" in r.output
