"""`sftdata convert`: golden round trips, the CLI, every kind of bad input, streaming memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from sftdata.cli import main
from sftdata.conversation import read_jsonl
from sftdata.convert import convert
from sftdata.errors import ConversionError
from sftdata.validate import validate_file
from tests.conftest import FIXTURES, ROOT

sys.path.insert(0, str(FIXTURES))
from make_fixtures import GOLDEN_CASES

RAW = FIXTURES / "raw"


def run(*args: str):
    return CliRunner().invoke(main, ["convert", *args])


def load(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# --- golden round trips ---------------------------------------------------------------


@pytest.mark.parametrize("raw", sorted(GOLDEN_CASES))
def test_golden_round_trip(raw, tmp_path, monkeypatch):
    golden, extra = GOLDEN_CASES[raw]
    monkeypatch.chdir(ROOT)  # sources are recorded as the path given: fixtures/raw/<name>
    out = tmp_path / "out.jsonl"
    result = run(f"fixtures/raw/{raw}", "-o", str(out), *extra)
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == (FIXTURES / "golden" / golden).read_text(
        encoding="utf-8"
    )
    assert validate_file(out).ok
    assert len(list(read_jsonl(out))) == len(load(out))


# --- CLI behaviour --------------------------------------------------------------------


def test_detection_line_and_summary_on_stderr(tmp_path):
    out = tmp_path / "o.jsonl"
    r = run(str(RAW / "alpaca.json"), "-o", str(out))
    assert r.exit_code == 0
    assert (
        f'{RAW / "alpaca.json"}: detected alpaca (first record has "instruction" and "output"); '
        "use --from to override" in r.stderr
    )
    assert f"wrote 3 records to {out} (3 in, 0 dropped)" in r.stderr
    assert r.stdout == ""


def test_several_inputs_are_concatenated_with_unique_ids(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    rec = '{"id": "x", "instruction": "q", "output": "%s"}\n{"instruction": "q2", "output": "a2"}\n'
    (a / "data.jsonl").write_text(rec % "1")
    (b / "data.jsonl").write_text(rec % "2")
    out = tmp_path / "o.jsonl"
    r = run(str(a / "data.jsonl"), str(b / "data.jsonl"), str(RAW / "qa.csv"), "-o", str(out))
    assert r.exit_code == 0, r.output
    rows = load(out)
    assert [x["id"] for x in rows] == ["x", "data-1", "x.2", "data.2-1", "qa-0", "qa-1", "qa-2"]
    assert [x["source"]["file"] for x in rows][:4] == [str(a / "data.jsonl")] * 2 + [
        str(b / "data.jsonl")
    ] * 2
    assert "wrote 7 records" in r.stderr
    # Deterministic: a second run writes the same bytes.
    out2 = tmp_path / "o2.jsonl"
    run(str(a / "data.jsonl"), str(b / "data.jsonl"), str(RAW / "qa.csv"), "-o", str(out2))
    assert out2.read_bytes() == out.read_bytes()


def test_dedup_counts_exact_duplicates(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        '{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "a"}\n'
        '{"instruction": "q", "output": "b"}\n{"instruction": "q", "input": "", "output": "a"}\n'
    )
    out = tmp_path / "o.jsonl"
    r = run(str(p), "-o", str(out), "--dedup")
    assert r.exit_code == 0
    assert [x["messages"][1]["content"] for x in load(out)] == ["a", "b"]
    assert "(4 in, 2 dropped: 2 duplicate)" in r.stderr
    r = run(str(p), "-o", str(out))
    assert len(load(out)) == 4


def test_system_option_adds_or_replaces(tmp_path):
    out = tmp_path / "o.jsonl"
    assert run(str(RAW / "sharegpt.json"), "-o", str(out), "--system", "Be nice.").exit_code == 0
    for rec in load(out):
        assert rec["messages"][0] == {"role": "system", "content": "Be nice."}
        assert [m["role"] for m in rec["messages"]].count("system") == 1


def test_map_option_for_chinese_headers_and_from_override(tmp_path):
    p = tmp_path / "zh.csv"
    p.write_text("题目,资料,答复\n一加一？,,二\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    r = run(str(p), "-o", str(out), "--map", "题目=instruction,资料=input,答复=output")
    assert r.exit_code == 0, r.output
    assert load(out)[0]["messages"] == [
        {"role": "user", "content": "一加一？"},
        {"role": "assistant", "content": "二"},
    ]
    r = run(str(RAW / "alpaca.jsonl"), "-o", str(out), "--from", "sharegpt")
    assert r.exit_code == 1
    assert f"Error: {RAW / 'alpaca.jsonl'}:1: record has no 'conversations'" in r.stderr
    r = run(str(RAW / "alpaca.jsonl"), "-o", str(out), "--map", "output=answer")
    assert r.exit_code == 1 and "unknown target 'answer'" in r.stderr


def test_xlsx_sheet_option(tmp_path):
    out = tmp_path / "o.jsonl"
    r = run(str(RAW / "qa.xlsx"), "-o", str(out), "--sheet", "Notes")
    assert r.exit_code == 0
    assert load(out)[0]["source"] == {"file": str(RAW / "qa.xlsx"), "sheet": "Notes", "row": 2}


def test_library_report_counts(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(
        '{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": ""}\nnot json\n'
    )
    report = convert([p], tmp_path / "o.jsonl", skip_invalid=True)
    assert (report.records_in, report.records_out) == (3, 1)
    assert dict(report.dropped) == {"empty answer": 1, "invalid JSON": 1}
    assert report.examples[0].startswith(f"{p}:2: empty answer")
    assert report.inputs[0].format == "alpaca"


def test_structure_is_checked_at_convert_time(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
        '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}\n'
    )
    out = tmp_path / "o.jsonl"
    r = run(str(p), "-o", str(out))
    assert r.exit_code == 1
    assert (
        f"Error: {p}:2: messages[0] (assistant): the conversation must start with a user turn"
        in r.stderr
    )
    assert not out.exists()
    r = run(str(p), "-o", str(out), "--skip-invalid")
    assert r.exit_code == 0 and "1 bad structure" in r.stderr


def test_output_problems(tmp_path):
    r = run(str(RAW / "qa.csv"), "-o", str(tmp_path / "missing" / "o.jsonl"))
    assert r.exit_code == 1 and "output folder does not exist" in r.stderr
    r = run(str(RAW / "qa.csv"), "-o", str(tmp_path))
    assert r.exit_code == 1 and "is a folder" in r.stderr
    same = tmp_path / "same.jsonl"
    same.write_text('{"instruction": "q", "output": "a"}\n')
    r = run(str(same), "-o", str(same))
    assert r.exit_code == 1 and "the output would overwrite the input" in r.stderr
    r = run(str(RAW / "qa.csv"), "-o", str(same / "o.jsonl"))  # parent is a file
    assert r.exit_code == 1
    assert r.stderr.strip() == f"Error: {same / 'o.jsonl'}: cannot write here (Not a directory)"
    assert same.read_text() == '{"instruction": "q", "output": "a"}\n'


# --- bad input: one clear line, non-zero exit, nothing left behind -----------------------

GOOD = '{"instruction": "q", "output": "a"}'
SHARE_GOOD = '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))


def _xlsx(path, rows, title="Sheet1"):
    import openpyxl

    wb = openpyxl.Workbook()
    wb.active.title = title
    for row in rows:
        wb.active.append(row)
    wb.save(path)


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


# name, file content (None: do not create; "DIR": a folder), extra args, location in the
# message, a fragment of the message, and whether --skip-invalid turns it into a counted drop.
BAD = [
    (
        "trunc.json",
        f"[\n{GOOD},\n" + '{"instruction": "q", "out',
        [],
        "trunc.json:3:",
        "truncated",
        False,
    ),
    (
        "trunc.jsonl",
        f'{GOOD}\n{{"instruction": "q", "outp',
        [],
        "trunc.jsonl:2:",
        "invalid JSON",
        True,
    ),
    (
        "invalid.jsonl",
        f"{GOOD}\n{{instruction: q}}\n",
        [],
        "invalid.jsonl:2:",
        "invalid JSON",
        True,
    ),
    ("invalid.json", f"[\n{GOOD},\n{{'a': 1}}]", [], "invalid.json:3:", "invalid JSON", False),
    ("number.json", "42\n", [], "number.json:1:", "got number", False),
    ("list.jsonl", f"{GOOD}\n[1, 2]\n", [], "list.jsonl:2:", "got array", True),
    (
        "content_num.json",
        f'[{SHARE_GOOD},\n{{"conversations": [{{"from": "human", "value": 5}}]}}]',
        [],
        "content_num.json:2:",
        "'value' must be a string, got number",
        True,
    ),
    (
        "noanswer.jsonl",
        f'{GOOD}\n{{"instruction": "q"}}\n',
        [],
        "noanswer.jsonl:2:",
        "no answer",
        True,
    ),
    (
        "emptyanswer.jsonl",
        f'{GOOD}\n{{"instruction": "q", "output": " "}}\n',
        [],
        "emptyanswer.jsonl:2:",
        "empty answer",
        True,
    ),
    (
        "nonstring.jsonl",
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
        '{"messages": [{"role": "user", "content": {"x": 1}}]}\n',
        [],
        "nonstring.jsonl:2:",
        "'content' must be a string, got object",
        True,
    ),
    (
        "role.json",
        f'[{SHARE_GOOD},\n{{"conversations": [{{"from": "bot", "value": "x"}}]}}]',
        [],
        "role.json:2:",
        "unknown role from='bot'",
        True,
    ),
    (
        "gbk.csv",
        "question,answer\nok,fine\n问题,回答\n".encode("gbk"),
        [],
        "gbk.csv:3:",
        "--encoding gb18030",
        False,
    ),
    ("nocol.csv", "question,context\nq,c\n", [], "nocol.csv:1:", "no column for 'output'", False),
    (
        "sheet.xlsx",
        "XLSX",
        ["--sheet", "Data"],
        "sheet.xlsx:",
        "no sheet named 'Data' (sheets: 'Sheet1')",
        False,
    ),
    (
        "header.xlsx",
        "XLSX_NOHEADER",
        [],
        "header.xlsx:Sheet1:row 1:",
        "headers found: name, age",
        False,
    ),
    ("empty.json", "", [], "empty.json:", "is empty", False),
    ("blank.jsonl", "\n  \n", [], "blank.jsonl:", "is empty", False),
    ("image.json", PNG, [], "image.json:1:", "looks like a PNG image", False),
    ("random.bin", bytes(range(256)) * 4, [], "random.bin:1:", "binary file", False),
    ("fake.xlsx", "question,answer\n", [], "fake.xlsx:", "not an Excel .xlsx workbook", False),
    ("old.xls", "whatever", [], "old.xls:", ".xls workbooks are not supported", False),
    ("missing.json", None, [], "missing.json:", "no such file", False),
    ("folder.json", "DIR", [], "folder.json:", "is a folder", False),
]


def _make(tmp_path, name, content):
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    if content == "DIR":
        path.mkdir()
    elif content == "XLSX":
        _xlsx(path, [["question", "answer"], ["q", "a"]])
    elif content == "XLSX_NOHEADER":
        _xlsx(path, [["name", "age"], ["x", 3]])
    elif content is not None:
        _write(path, content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "args", "where", "fragment", "skippable"), BAD, ids=[b[0] for b in BAD]
)
def test_bad_input(tmp_path, name, content, args, where, fragment, skippable):
    path = _make(tmp_path, name, content)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "o.jsonl"
    r = run(str(path), "-o", str(out), *args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, r.stderr
    assert where in errors[0] and str(path.parent) in errors[0], errors[0]
    assert fragment in errors[0], errors[0]
    assert list(outdir.iterdir()) == []  # no output, no temp file
    r = run(str(path), "-o", str(out), "--skip-invalid", *args)
    if skippable:
        assert r.exit_code == 0, r.output
        assert len(load(out)) == 1
        assert "1 dropped" in r.stderr and f"skipped {path}:" in r.stderr
    else:
        assert r.exit_code == 1 and where in r.stderr
        assert list(outdir.iterdir()) == []


def test_xlsx_formula_without_cached_value_cli(tmp_path):
    p = tmp_path / "f.xlsx"
    _xlsx(p, [["question", "answer"], ["q", "=A2"], ["q2", "a2"]], title="Data")
    out = tmp_path / "o.jsonl"
    r = run(str(p), "-o", str(out))
    assert (
        r.exit_code == 1
        and "f.xlsx:Data:row 2: the 'answer' cell (output) is a formula" in r.stderr
    )
    assert run(str(p), "-o", str(out), "--skip-invalid").exit_code == 0
    assert len(load(out)) == 1


def test_failure_after_records_were_written_leaves_no_file(tmp_path):
    p = tmp_path / "late.jsonl"
    p.write_text("".join(f"{GOOD}\n" for _ in range(1000)) + '{"instruction": "q"}\n')
    out = tmp_path / "o.jsonl"
    with pytest.raises(ConversionError, match=r"late\.jsonl:1001: record has no answer"):
        convert([p], out)
    assert list(tmp_path.iterdir()) == [p]


# --- streaming: memory does not grow with input size ----------------------------------

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from sftdata.convert import convert
    n, path = int(sys.argv[1]), sys.argv[2]
    with open(path, "w") as f:
        f.write("[\\n")
        for i in range(n):
            sep = "," if i else ""
            f.write(sep + json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) + "\\n")
        f.write("]\\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = convert([path], path + ".out")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(report.records_out, (after - before) // 1024)
    """
)


def _peak_growth_mb(tmp_path, n: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(n), str(tmp_path / f"big{n}.json")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    count, growth = proc.stdout.split()
    assert int(count) == n
    return int(growth)


def test_memory_is_flat_in_input_size(tmp_path):
    # A JSON array of 200k records is 12 MB of text and would take >150 MB as Python objects;
    # the streaming reader holds one 1 MB chunk plus the current record.
    small = _peak_growth_mb(tmp_path, 20_000)
    large = _peak_growth_mb(tmp_path, 200_000)
    assert large <= small + 6, (small, large)
    assert large < 20


def test_encoding_option_reads_gbk_csv(tmp_path):
    p = tmp_path / "gbk.csv"
    p.write_bytes("问题,背景,回应\n一加一？,,二\n".encode("gbk"))
    out = tmp_path / "o.jsonl"
    r = run(str(p), "-o", str(out))
    assert r.exit_code == 1 and "gbk.csv:1: not valid utf-8 text" in r.stderr
    assert "--encoding gb18030" in r.stderr
    r = run(str(p), "-o", str(out), "--encoding", "gb18030")
    assert r.exit_code == 0, r.output
    assert load(out)[0]["messages"][1] == {"role": "assistant", "content": "二"}
    r = run(str(p), "-o", str(out), "--encoding", "klingon")
    assert r.exit_code == 1 and "unknown encoding" in r.stderr


def test_skip_invalid_when_the_first_record_is_bad(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text('{"instruction": "q"}\nnot json\n{"instruction": "q", "output": "a"}\n')
    out = tmp_path / "o.jsonl"
    r = run(str(p), "-o", str(out), "--skip-invalid")
    assert r.exit_code == 0, r.output
    assert "(3 in, 2 dropped: 1 invalid JSON, 1 missing answer)" in r.stderr
    assert [x["id"] for x in load(out)] == ["f-2"]
    only_bad = tmp_path / "b.jsonl"
    only_bad.write_text('{"instruction": "q"}\n')
    r = run(str(only_bad), "-o", str(out), "--skip-invalid")
    assert r.exit_code == 1 and "no records to write (1 read, 1 dropped)" in r.stderr


def test_sheet_applies_to_workbooks_among_other_inputs(tmp_path):
    out = tmp_path / "o.jsonl"
    r = run(str(RAW / "qa.csv"), str(RAW / "qa.xlsx"), "-o", str(out), "--sheet", "Notes")
    assert r.exit_code == 0, r.output
    assert [x["source"].get("sheet") for x in load(out)] == [None, None, None, "Notes"]
    r = run(str(RAW / "qa.csv"), "-o", str(out), "--sheet", "Notes")
    assert r.exit_code == 1 and "none of the inputs is an .xlsx workbook" in r.stderr
    r = run(str(RAW / "qa.csv"), "-o", str(out), "--system", " ")
    assert r.exit_code == 1 and "--system: the system prompt is empty" in r.stderr


def test_convert_json_report(tmp_path) -> None:
    src = tmp_path / "a.json"
    src.write_text(json.dumps([{"instruction": "Hi?", "output": "Hello."}] * 2), encoding="utf-8")
    r = run(str(src), "-o", str(tmp_path / "o.jsonl"), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["records_in"], d["records_out"]) == (2, 2) and d["inputs"][0]["format"] == "alpaca"
    assert "wrote 2 records" in r.stderr
