"""`sftdata inspect` (``sftdata.rowview``): trained and masked text apart (CliRunner output is
piped: text markers)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sftdata.cli import main
from sftdata.conversation import read_jsonl
from sftdata.rowview import classify, plain_text, runs
from sftdata.shards import ShardReader
from tests.sftdata_helpers import fixture_records, pack_fixture, run_cli, write_jsonl


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, Path]:
    return pack_fixture(tmp_path)


def test_inspect_row_marks_trained_text_and_record_boundaries(packed: tuple[Path, Path]) -> None:
    data, out = packed
    convs = {c.id: c for c in read_jsonl(data)}
    reader = ShardReader(out)
    row = reader[1]
    r = run_cli("inspect", out, "--row", 1)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(
        f"row 1 of {len(reader)} (split train, seq_len 256): {len(row['record_ids'])} records"
    )
    assert "trained text is wrapped in [[ ]]" in lines[0]
    heads = re.findall(
        r"^--- record (\S+) \((\d+) tokens, (\d+) trained\) ---$", r.output, flags=re.M
    )
    assert [h[0] for h in heads] == row["record_ids"]
    assert [int(h[1]) for h in heads] == row["seq_lens"][: len(heads)].tolist()
    # the marked text is exactly the assistant turns, each followed by its stop token
    marked = re.findall(
        r"\[\[(?!stop: )(.*?)\]\]\[\[stop: (.*?)\]\]", "\n".join(lines[1:]), flags=re.S
    )
    want = [m.content for rid in row["record_ids"] for m in convs[rid].messages if m.trained]
    assert len(marked) == len(want)
    for (got, stop), content in zip(marked, want, strict=True):
        assert got == content and stop == "<|im_end|>"
    assert "user" in r.output and not any("Question" in m for m in marked)
    if row["num_pad"]:
        assert f"--- padding ({row['num_pad']} tokens, not trained) ---" in r.output


def test_inspect_record_and_errors(packed: tuple[Path, Path]) -> None:
    _, out = packed
    r = run_cli("inspect", out, "--record", "r4")
    assert r.exit_code == 0, r.output
    assert r.output.count("--- record ") == 1 and "--- record r4 (" in r.output
    assert "It is 8." in r.output and "[[16.]][[stop: <|im_end|>]]" in r.output
    r = run_cli("inspect", out, "--row", 10_000)
    assert r.exit_code == 1 and "--row 10000" in r.output and "Traceback" not in r.output
    r = run_cli("inspect", out, "--record", "missing")
    assert r.exit_code == 1 and "no record 'missing'" in r.output
    r = run_cli("inspect", out.parent / "data.jsonl")
    assert r.exit_code == 1 and "not a folder" in r.output


def test_runs_pieces_join_to_the_whole_decode() -> None:
    from sftdata.tokenizer import load_tokenizer

    tok = load_tokenizer("tiny")

    ids = np.asarray(tok.encode("Hello there, general Kenobi.", add_special_tokens=False))
    trained = np.zeros(len(ids), bool)
    trained[2:4] = True
    pieces = runs(ids, trained, lambda x: tok.decode(x))
    assert "".join(t for _, t in pieces) == tok.decode(ids.tolist())
    assert [tr for tr, _ in pieces] == [False, True, False]
    assert plain_text(classify(pieces, [])).count("[[") == 1


def test_classify_sets_reasoning_and_stop_tokens_apart() -> None:
    pieces = [
        (False, "<|im_start|>assistant\n"),
        (True, "<think>\nAdd.\n</think>\n\n4<|im_end|>"),
        (False, "\n"),
    ]
    got = classify(pieces, ["<|im_end|>", "<|endoftext|>"])
    assert got == [
        ("masked", "<|im_start|>assistant\n"),
        ("reasoning", "<think>\nAdd.\n</think>"),
        ("reply", "\n\n4"),
        ("stop", "<|im_end|>"),
        ("masked", "\n"),
    ]
    assert plain_text(got) == (
        "<|im_start|>assistant\n[[reasoning: <think>\nAdd.\n</think>]][[\n\n4]]"
        "[[stop: <|im_end|>]]\n"
    )
    # gpt-oss: the analysis channel is reasoning, <|return|> the stop
    harmony = [(True, "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant"
                      "<|channel|>final<|message|>4<|return|>")]  # fmt: skip
    kinds = [k for k, _ in classify(harmony, ["<|return|>", "<|call|>"])]
    assert kinds == ["reasoning", "reply", "stop"]


def test_inspect_shows_reasoning_and_stop_token_distinctly(tmp_path: Path) -> None:
    rec = {
        "schema_version": 2,
        "id": "think1",
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning": "Add two and two."},
        ],
    }
    data = write_jsonl(tmp_path / "data.jsonl", [rec])
    out = tmp_path / "shards"
    r = run_cli("pack", data, "-o", out, "--tokenizer", "tiny", "--seq-len", 128, "--no-pack")
    assert r.exit_code == 0, r.output
    r = run_cli("inspect", out)
    assert r.exit_code == 0, r.output
    assert "; stop tokens " in r.output.splitlines()[0]
    assert "[[reasoning: <think>\nAdd two and two.\n</think>]]" in r.output
    assert re.search(r"\[\[\n*4\]\]\[\[stop: <\|im_end\|>\]\]", r.output), r.output


def test_inspect_colour_on_a_terminal_has_no_markers(packed: tuple[Path, Path]) -> None:
    _, out = packed
    r = CliRunner().invoke(
        main, ["inspect", str(out), "--row", "0"], env={"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}
    )
    assert r.exit_code == 0, r.output
    if "\x1b[" not in r.output:
        pytest.fail("rich did not treat FORCE_COLOR as a terminal: colour path untested")
    assert "[[" not in r.output and "--- record " in r.output
    r = CliRunner().invoke(main, ["inspect", str(out), "--plain"], env={"FORCE_COLOR": "1"})
    assert "\x1b[" not in r.output and "[[" in r.output


def test_inspect_record_searches_every_split(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", fixture_records())
    out = tmp_path / "s"
    assert (
        run_cli(
            "pack", data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256, "--val-count", 3
        ).exit_code
        == 0
    )
    val = ShardReader(out, split="validation")
    rid = val[0]["record_ids"][0]
    r = run_cli("inspect", out, "--record", rid)
    assert r.exit_code == 0, r.output
    assert "(split validation," in r.output and f"--- record {rid} (" in r.output
    r = run_cli("inspect", out, "--record", rid, "--split", "train")
    assert r.exit_code == 1 and f"no record {rid!r} in split 'train'" in r.output
