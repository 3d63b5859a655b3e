"""Hugging Face datasets as `convert` input: Parquet files and `save_to_disk` folders.

(That shards open with ``datasets.Dataset.from_file`` is tested in tests/sftdata/test_shards.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from click.testing import CliRunner

from sftdata.cli import main
from sftdata.conversation import read_jsonl
from sftdata.errors import ConversionError
from sftdata.sources import detect_format, read_conversations
from sftdata.sources.hf import read_hf

datasets.disable_progress_bars()


def _strip(convs) -> list[dict]:
    out = []
    for c in convs:
        d = c.to_dict()
        d.pop("source")
        d.pop("id")
        out.append(d)
    return out


def _error_line(output: str) -> str:
    """The one ``Error:`` line, last in the output (info lines such as "detected ..." may precede it)."""
    lines = output.strip().splitlines()
    assert "Traceback" not in output and sum(ln.startswith("Error:") for ln in lines) == 1
    assert lines[-1].startswith("Error:")
    return lines[-1]


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_parquet_rows_equal_the_json_records(shared_data: Path, tmp_path: Path) -> None:
    raw = shared_data / "alpaca_en_demo.json"
    pq = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(_load(raw)).to_parquet(str(pq))
    assert detect_format(pq) == ("parquet", "extension .parquet")
    out = tmp_path / "o.jsonl"
    res = CliRunner().invoke(main, ["convert", str(pq), "-o", str(out)])
    assert res.exit_code == 0, res.output
    got = list(read_jsonl(out))
    assert _strip(got) == _strip(read_conversations(raw))
    assert str(got[5].source) == f"{pq}:row 6"


def test_saved_dataset_with_tool_calls(shared_data: Path, tmp_path: Path) -> None:
    raw = shared_data / "glaive_toolcall_en_demo.json"
    folder = tmp_path / "glaive"
    datasets.Dataset.from_list(_load(raw)).save_to_disk(str(folder))
    fmt, reason = detect_format(folder)
    assert fmt == "hf" and "save_to_disk" in reason
    got = list(read_conversations(folder))
    assert _strip(got) == _strip(read_conversations(raw))
    assert sum(1 for c in got for m in c.messages if m.tool_calls) > 200


def test_dataset_dict_picks_train_and_names_splits(shared_data: Path, tmp_path: Path) -> None:
    rows = _load(shared_data / "sharegpt_dummy_conversation.json")
    dd = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:30]),
            "test": datasets.Dataset.from_list(rows[30:40]),
        }
    ).save_to_disk(str(dd))
    got = list(read_hf(dd))
    assert [c.id for c in got] == [r["id"] for r in rows[:30]]  # ShareGPT ids are kept
    assert len(list(read_hf(dd, split="test"))) == 10
    other = tmp_path / "other"
    datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(rows[:2]), "b": datasets.Dataset.from_list(rows[2:4])}
    ).save_to_disk(str(other))
    with pytest.raises(ConversionError, match="splits 'a', 'b'; it has no train split"):
        list(read_hf(other))


def test_openai_rows_with_arrow_null_fields(tmp_path: Path) -> None:
    # Arrow gives every message every field of any message: tool_calls/weight come back as None.
    rows = [
        {
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "wx", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "content": '{"t": 21}'},
                {"role": "assistant", "content": "21 degrees.", "weight": 1},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "weight": 0},
            ]
        },
    ]
    pq = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    a, b = read_conversations(pq)
    assert [m.role for m in a.messages] == ["user", "assistant", "tool", "assistant"]
    assert a.messages[1].tool_calls[0]["function"]["name"] == "wx"
    assert a.messages[0].tool_calls is None and a.messages[3].train is None
    assert b.messages[1].train is False


def test_column_mapping_applies_to_parquet(tmp_path: Path) -> None:
    pq = tmp_path / "qa.parquet"
    datasets.Dataset.from_list([{"question": "2+2?", "answer": "4"}]).to_parquet(str(pq))
    out = tmp_path / "o.jsonl"
    res = CliRunner().invoke(
        main, ["convert", str(pq), "--map", "question=instruction,answer=output", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    (conv,) = read_jsonl(out)
    assert [(m.role, m.content) for m in conv.messages] == [("user", "2+2?"), ("assistant", "4")]
    res = CliRunner().invoke(main, ["convert", str(pq), "-o", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 1 and _error_line(res.output)
    assert (
        f"{pq}:row 1: cannot tell the record shape from the columns ('question', 'answer')"
        in res.output
    )


def test_bad_rows_and_files_are_one_line(tmp_path: Path) -> None:
    pq = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(
        [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": ""}]
    ).to_parquet(str(pq))
    out = tmp_path / "o.jsonl"
    res = CliRunner().invoke(main, ["convert", str(pq), "-o", str(out)])
    assert res.exit_code == 1 and res.output.strip().endswith(
        f"{pq}:row 2: empty answer ('output' is blank) (--skip-invalid skips such records, "
        "naming each)"
    )
    assert not out.exists()
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    res = CliRunner().invoke(main, ["convert", str(junk), "-o", str(out)])
    assert res.exit_code == 1
    assert _error_line(res.output).startswith(f"Error: {junk}: not a readable Parquet file")


def test_only_the_checked_files_of_a_saved_dataset_are_read(tmp_path: Path) -> None:
    """A DatasetDict folder that also carries a top-level Dataset's metadata (which
    ``datasets.load_from_disk`` would follow) is read through its dataset_dict.json alone; a data
    file that is not a regular file inside its folder is refused before it is opened."""
    import os

    dd = tmp_path / "dd"
    rows = [{"instruction": "q", "output": "a"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(dd))
    (tmp_path / "secret.arrow").write_bytes(b"not yours")
    (dd / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../secret.arrow"}]}))
    (dd / "dataset_info.json").write_text("{}")
    assert [c.messages[-1].content for c in read_hf(dd)] == ["a"]
    one = tmp_path / "one"
    datasets.Dataset.from_list(rows).save_to_disk(str(one))
    data = next(one.glob("data-*.arrow"))
    data.unlink()
    os.mkfifo(data)  # a FIFO would block the reader for ever
    with pytest.raises(
        ConversionError, match=r"_data_files\[0\]\.filename .* is not a regular file"
    ):
        list(read_hf(one))
