"""Real data from ../shared/data: every file converts, with the right counts and content, and
the output validates clean."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sftdata.cli import main
from sftdata.convert import convert
from sftdata.validate import validate_file

ZH_MAP = "问题=instruction,背景=input,回应=output"

# file -> (format detected, conversations written)
EXPECTED = {
    # LLaMA-Factory's alpaca_en_demo.json holds 999 records (its README rounds to 1000).
    "alpaca_en_demo.json": ("alpaca", 999),
    "alpaca_zh_demo.json": ("alpaca", 1000),
    "identity.json": ("alpaca", 91),
    "glaive_toolcall_en_demo.json": ("sharegpt", 300),
    "v1_sft_demo.jsonl": ("lf_v1", 500),
    "sharegpt_dummy_conversation.json": ("sharegpt", 500),
    "alpaca_seed_tasks.jsonl": ("alpaca", 175),  # 175 tasks with one instance each
    "qa_en.csv": ("csv", 999),
}


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _convert(path, out, **kw):
    report = convert([path], out, **kw)
    check = validate_file(out)
    assert check.ok, [str(p) for p in check.problems[:5]]
    assert check.records == report.records_out
    rows = _rows(out)
    return report, rows


def _texts(rows):
    return [[(m["role"], m["content"]) for m in r["messages"]] for r in rows]


def test_every_shared_file_is_covered(shared_data):
    files = {p.name for p in shared_data.iterdir() if p.is_file()}
    assert files - {"dataset_info.json", "README.md"} == set(EXPECTED) | {"qa_zh.xlsx"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_file_converts_and_validates(shared_data, tmp_path, name):
    fmt, count = EXPECTED[name]
    report, rows = _convert(shared_data / name, tmp_path / "o.jsonl")
    assert report.inputs[0].format == fmt
    assert (report.records_in, report.records_out, sum(report.dropped.values())) == (
        count,
        count,
        0,
    )
    assert len({r["id"] for r in rows}) == count
    assert all(r["source"]["file"] == str(shared_data / name) for r in rows)


def test_alpaca_en_content_and_lines(shared_data, tmp_path):
    _, rows = _convert(shared_data / "alpaca_en_demo.json", tmp_path / "o.jsonl")
    raw = json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    first = rows[0]
    assert first["messages"][0] == {
        "role": "user",
        "content": "Describe a process of making crepes.",
    }
    assert first["messages"][1]["content"] == raw[0]["output"]
    assert first["source"] == {"file": str(shared_data / "alpaca_en_demo.json"), "line": 2}
    lines = (shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8").splitlines()
    # Every record's source line is where its object opens in the pretty-printed array.
    assert all(lines[r["source"]["line"] - 1].strip() == "{" for r in rows)
    for r, x in zip(rows, raw, strict=True):
        prompt = "\n".join(p for p in (x["instruction"], x["input"]) if p.strip())
        assert _texts([r])[0] == [("user", prompt), ("assistant", x["output"])]


def test_identity_placeholders_are_kept(shared_data, tmp_path):
    _, rows = _convert(shared_data / "identity.json", tmp_path / "o.jsonl")
    assert rows[0]["messages"] == [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?",
        },
    ]


def test_glaive_tool_calls(shared_data, tmp_path):
    _, rows = _convert(shared_data / "glaive_toolcall_en_demo.json", tmp_path / "o.jsonl")
    raw = json.loads((shared_data / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    msgs = [m for r in rows for m in r["messages"]]
    calls = [m for m in msgs if m.get("tool_calls")]
    assert len(calls) == 211 and sum(m["role"] == "tool" for m in msgs) == 211
    assert all(m["role"] == "assistant" and m["content"] == "" for m in calls)
    first = calls[0]["tool_calls"][0]
    assert first["type"] == "function" and first["function"]["name"] == "search_recipes"
    assert first["function"]["arguments"] == {"ingredients": ["chicken", "bell peppers", "rice"]}
    tools = [t for r in rows for t in r.get("tools", [])]
    assert sum("tools" in r for r in rows) == sum(1 for x in raw if json.loads(x["tools"] or "[]"))
    assert all(t["type"] == "function" and "name" in t["function"] for t in tools)
    assert rows[0]["tools"][0]["function"]["name"] == "search_recipes"


def test_v1_and_sharegpt_dummy(shared_data, tmp_path):
    _, v1 = _convert(shared_data / "v1_sft_demo.jsonl", tmp_path / "v1.jsonl")
    assert _texts(v1)[2] == [("user", "Who are you?"), ("assistant", _texts(v1)[2][1][1])]
    # loss_weight 0 on users and 1 on assistants equal the defaults: no explicit flags.
    assert not any("train" in m for r in v1 for m in r["messages"])
    assert [r["source"]["line"] for r in v1[:3]] == [1, 2, 3]
    _, dummy = _convert(shared_data / "sharegpt_dummy_conversation.json", tmp_path / "d.jsonl")
    assert dummy[0]["id"] == "identity_0" and len(dummy[0]["messages"]) == 4
    assert dummy[0]["messages"][1]["content"].startswith("I am Vicuna")
    assert sum(len(r["messages"]) for r in dummy) == 2000


def test_seed_tasks(shared_data, tmp_path):
    _, rows = _convert(shared_data / "alpaca_seed_tasks.jsonl", tmp_path / "o.jsonl")
    assert [r["id"] for r in rows[:2]] == ["seed_task_0", "seed_task_1"]
    assert rows[1]["messages"][0]["content"] == (
        "What is the relation between the given pairs?\nNight : Day :: Right : Left"
    )


def test_csv_matches_the_alpaca_it_was_made_from(shared_data, tmp_path):
    _, csv_rows = _convert(shared_data / "qa_en.csv", tmp_path / "c.jsonl")
    _, json_rows = _convert(shared_data / "alpaca_en_demo.json", tmp_path / "j.jsonl")
    assert _texts(csv_rows) == _texts(json_rows)
    # Records with newlines inside quoted fields start on the right physical line.
    lines = (shared_data / "qa_en.csv").read_text(encoding="utf-8").splitlines()
    for r in csv_rows[:50]:
        head = r["messages"][0]["content"].split("\n")[0][:20]
        assert lines[r["source"]["line"] - 1].lstrip('"').startswith(head)


def test_xlsx_with_chinese_headers(shared_data, tmp_path):
    xlsx = shared_data / "qa_zh.xlsx"
    out = tmp_path / "zh.jsonl"
    runner = CliRunner()
    # Row 826's answer starts with "=", so the workbook holds it as a formula with no cached
    # value: never evaluated, reported, and skipped only when asked.
    r = runner.invoke(main, ["convert", str(xlsx), "-o", str(out), "--map", ZH_MAP])
    assert r.exit_code == 1 and not out.exists()
    assert (
        f"{xlsx}:SFT数据:row 826: the '回应' cell (output) is a formula with no cached value"
        in r.stderr
    )
    r = runner.invoke(
        main, ["convert", str(xlsx), "-o", str(out), "--map", ZH_MAP, "--skip-invalid"]
    )
    assert r.exit_code == 0, r.output
    assert "(1000 in, 1 dropped: 1 formula without cached value)" in r.stderr
    assert runner.invoke(main, ["validate", str(out)]).exit_code == 0
    rows = _rows(out)
    assert len(rows) == 999
    assert {r["source"]["sheet"] for r in rows} == {"SFT数据"}
    used_rows = [r["source"]["row"] for r in rows]
    assert (
        102 not in used_rows and 504 not in used_rows and 826 not in used_rows
    )  # blank, blank, formula
    assert used_rows[0] == 2 and used_rows[-1] == 1003
    raw = json.loads((shared_data / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    del raw[822]  # the record behind row 826 (rows 2..101, blank 102, 103..503, blank 504, ...)
    expected = [
        [
            ("user", "\n".join(p for p in (x["instruction"], x["input"]) if p.strip())),
            ("assistant", x["output"]),
        ]
        for x in raw
    ]
    assert _texts(rows) == expected
    # The headers map themselves too (问题/背景/回应 are common Chinese headers).
    report = convert([xlsx], tmp_path / "auto.jsonl", skip_invalid=True)
    assert report.records_out == 999
    # The notes sheet has no Q&A header: a one-line error naming file, sheet and headers.
    r = runner.invoke(main, ["convert", str(xlsx), "-o", str(out), "--sheet", "说明"])
    assert (
        r.exit_code == 1 and f"{xlsx}:说明:row 1: header: no column for 'instruction'" in r.stderr
    )


def test_all_json_files_together(shared_data, tmp_path):
    names = sorted(EXPECTED)
    out = tmp_path / "all.jsonl"
    report = convert([shared_data / n for n in names], out, dedup=True)
    assert validate_file(out).ok
    assert report.records_in == sum(c for _, c in EXPECTED.values())
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == len(set(ids)) == report.records_out
    # qa_en.csv repeats alpaca_en_demo.json record for record.
    assert report.dropped["duplicate"] >= 999
