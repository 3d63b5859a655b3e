"""`sftdata validate`: schema + structural rules, every problem, text/github/json output."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sftdata.cli import main
from sftdata.validate import Problem, github_annotation, structure_problems, validate_file
from tests.conftest import FIXTURES


def rec(messages, **kw):
    return {"schema_version": 1, "id": kw.pop("id", "r"), "messages": messages, **kw}


def u(text="q", **kw):
    return {"role": "user", "content": text, **kw}


def a(text="a", **kw):
    return {"role": "assistant", "content": text, **kw}


CALL = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]


def write(path, records):
    path.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records
        ),
        encoding="utf-8",
    )
    return path


def validate(*args):
    return CliRunner().invoke(main, ["validate", *args])


@pytest.mark.parametrize(
    "messages",
    [
        [u(), a()],
        [{"role": "system", "content": "s"}, u(), a(), u(), a()],
        [
            u(),
            a("", tool_calls=CALL),
            {"role": "tool", "content": "1"},
            {"role": "tool", "content": "2"},
            a(),
        ],
        [u(), a("", tool_calls=CALL)],
        [u(), a("x", train=False), u(), a()],
    ],
)
def test_valid_structures(messages):
    assert structure_problems(messages) == []


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([a()], "must start with a user turn"),
        ([{"role": "system", "content": "s"}, a()], "must start with a user turn"),
        ([u(), {"role": "system", "content": "s"}, a()], "a system turn may only come first"),
        ([u(), u(), a()], "two user turns in a row"),
        ([u(), a(), a()], "two assistant turns in a row"),
        (
            [u(), a(), {"role": "tool", "content": "x"}, a()],
            "must follow an assistant turn with tool_calls",
        ),
        (
            [u(), a("", tool_calls=CALL), {"role": "tool", "content": "x"}, u(), a()],
            "user turn after a tool result",
        ),
        ([u(), a(), u()], "ends with a user turn that has no answer"),
        (
            [u(), a("", tool_calls=CALL), {"role": "tool", "content": "x"}],
            "ends with a tool result",
        ),
        ([u(), a(train=False)], "no trained assistant turn"),
        ([u(" "), a()], "messages[0] (user): content is empty"),
        ([u(), a(" ")], "empty answer"),
        ([u(tool_calls=CALL), a()], "only assistant turns may have tool_calls"),
        (
            [u(), a("", tool_calls=[{"type": "function", "function": {"arguments": "{}"}}])],
            "needs function.name",
        ),
        (
            [u(), a("x", tool_calls=[{"function": {"name": "f", "arguments": {}}}])],
            "must be a JSON string",
        ),
    ],
)
def test_structural_problems(messages, fragment):
    problems = structure_problems(messages, version=1)
    assert any(fragment in p for p in problems), problems


def test_every_problem_is_reported_with_file_line_and_source(tmp_path):
    p = write(
        tmp_path / "c.jsonl",
        [
            rec([u(), a()], source={"file": "raw.json", "line": 12}),
            "{not json",
            rec([u(), u()], id="b", source={"file": "raw.xlsx", "sheet": "S", "row": 4}),
            rec([{"role": "bot", "content": 1}], id="c"),
            {"schema_version": 3, "id": "d", "messages": []},
            rec([u(), a()]),  # duplicate id "r"
            [1, 2],
            "",
            rec([u(), a()], id="e", extra=1),
        ],
    )
    report = validate_file(p)
    assert report.records == 8
    text = [str(x) for x in report.problems]
    assert text[0].startswith(f"{p}:2: invalid JSON")
    assert f"{p}:3: messages[1] (user): two user turns in a row (from raw.xlsx:S:row 4)" in text
    assert (
        f"{p}:3: messages[1]: ends with a user turn that has no answer (from raw.xlsx:S:row 4)"
        in text
    )
    line4 = [t for t in text if t.startswith(f"{p}:4: ")]
    assert any("'bot' is not one of" in t for t in line4)
    assert any("1 is not of type 'string'" in t for t in line4)
    assert f"{p}:5: schema_version 3 is not supported (this reads versions 1, 2)" in text
    assert f"{p}:6: duplicate id 'r' (first on line 1)" in text
    assert f"{p}:7: expected a JSON object, got list" in text
    assert any(t.startswith(f"{p}:9: ") and "'extra'" in t for t in text)
    assert not any(t.startswith(f"{p}:1: ") for t in text)


def test_cli_text_exit_codes_and_summary(tmp_path):
    good = write(tmp_path / "good.jsonl", [rec([u(), a()])])
    bad = write(tmp_path / "bad.jsonl", [rec([u(), a()]), rec([a()], id="x")])
    r = validate(str(good))
    assert r.exit_code == 0 and r.stdout == "" and "1 record, ok" in r.stderr
    r = validate(str(good), str(bad))
    assert r.exit_code == 1
    assert r.stdout.splitlines() == [
        f"{bad}:2: messages[0] (assistant): the conversation must start with a user turn"
    ]
    assert "Traceback" not in r.output


def test_cli_github_format(tmp_path):
    bad = write(
        tmp_path / "b,ad.jsonl", [rec([u("q"), a(" ")], source={"file": "raw.csv", "line": 3})]
    )
    r = validate("--format", "github", str(bad))
    assert r.exit_code == 1
    escaped = str(bad).replace(",", "%2C")
    assert r.stdout.splitlines() == [
        f"::error file={escaped},line=1::messages[1] (assistant): empty answer (an assistant turn "
        "may be empty only with tool_calls) (from raw.csv:3)"
    ]
    assert (
        github_annotation(Problem("f.jsonl", 0, "50% bad\nreally"))
        == "::error file=f.jsonl::50%25 bad%0Areally"
    )


def test_cli_json_report(tmp_path):
    bad = write(tmp_path / "b.jsonl", [rec([u(), a()]), "nope"])
    r = validate("--json", str(bad), str(tmp_path / "missing.jsonl"))
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["problems"] == 2 and doc["records"] == 2
    assert doc["files"][0]["problems"][0] == {
        "file": str(bad),
        "line": 2,
        "message": "invalid JSON (Expecting value at column 1)",
        "source": None,
    }
    assert doc["files"][1]["problems"][0]["message"] == "no such file"


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda p: p.write_text(""), "is empty (no records)"),
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: p.write_bytes(b'{"a": "\xff"}\n'), ":1: not valid UTF-8 text"),
        (lambda p: None, "no such file"),
    ],
)
def test_file_level_problems(tmp_path, setup, fragment):
    p = tmp_path / "x.jsonl"
    setup(p)
    r = validate(str(p))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert str(p) in r.stdout and fragment in r.stdout


def test_golden_fixtures_validate_clean():
    files = sorted((FIXTURES / "golden").glob("*.jsonl"))
    assert len(files) == 8
    r = validate(*map(str, files))
    assert r.exit_code == 0, r.stdout


def _mutations():
    def setter(*path, value=None, delete=False):
        def mutate(r):
            target = r
            for key in path[:-1]:
                target = target[key]
            if delete:
                del target[path[-1]]
            else:
                target[path[-1]] = value

        return mutate

    yield setter("schema_version", value=True)
    yield setter("schema_version", value=2)
    yield setter("schema_version", delete=True)
    yield setter("id", value="")
    yield setter("id", value=5)
    yield setter("messages", value=[])
    yield setter("messages", value="x")
    yield setter("messages", 0, value=1)
    yield setter("extra", value=1)
    yield setter("messages", 0, "name", value="x")
    yield setter("messages", 0, "role", value="bot")
    yield setter("messages", 0, "content", value=None)
    yield setter("messages", 0, "content", delete=True)
    yield setter("messages", 3, "train", value=1)
    yield setter("messages", 1, "tool_calls", value={})
    yield setter("messages", 1, "tool_calls", value=[1])
    yield setter("tools", value={})
    yield setter("tools", value=[1])
    yield setter("source", value="f:1")
    yield setter("source", "file", delete=True)
    yield setter("source", "file", value=3)
    yield setter("source", "line", value=0)
    yield setter("source", "line", value=True)
    yield setter("source", "row", value="1")
    yield setter("source", "sheet", value=1)
    yield setter("source", "x", value=1)


def test_fast_schema_check_never_accepts_what_jsonschema_rejects():
    import copy

    from sftdata.validate import _fast_valid, _validator

    base = rec(
        [u(), a("", tool_calls=CALL), {"role": "tool", "content": "x"}, a(train=True)],
        tools=[{"type": "function", "function": {"name": "f"}}],
        source={"file": "f.xlsx", "sheet": "S", "row": 2},
    )
    assert _fast_valid(base) and not list(_validator(base["schema_version"]).iter_errors(base))
    count = 0
    for mutate in _mutations():
        r = copy.deepcopy(base)
        mutate(r)
        assert list(_validator(1).iter_errors(r)), r  # each mutation breaks the schema...
        assert not _fast_valid(r), r  # ...and the fast path sends it to jsonschema
        count += 1
    assert count == 26


def test_nan_infinity_and_deep_nesting_are_not_json(tmp_path) -> None:
    """Canonical JSONL is strict JSON: Python's NaN/Infinity extension and nesting past the
    parser's limit are problems at their line (issue 11), for validate and for every reader."""
    from sftdata.conversation import read_jsonl
    from sftdata.errors import ConversionError

    good = {
        "schema_version": 2,
        "id": "a",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    line = json.dumps(good)
    nan = line.replace('"content": "q"}', '"content": "q", "weight": NaN}')
    inf = line.replace('"id": "a"', '"id": "b", "x": -Infinity')
    deep = '{"id": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([line, nan, inf, deep]) + "\n", encoding="utf-8")
    report = validate_file(path)
    got = {p.line: p.message for p in report.problems}
    assert got[2] == "invalid JSON (NaN is not a JSON number)"
    assert got[3] == "invalid JSON (-Infinity is not a JSON number)"
    assert got[4] == "invalid JSON (nested too deeply)"
    r = validate(str(path))
    assert r.exit_code == 1 and "Traceback" not in r.output
    with pytest.raises(ConversionError, match=r"d.jsonl:2: invalid JSON \(NaN is not"):
        list(read_jsonl(path))


def test_convert_refuses_nan_it_cannot_write(tmp_path) -> None:
    raw = tmp_path / "raw.jsonl"
    rec = {
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
                ],
            },
        ]
    }
    raw.write_text(json.dumps(rec).replace('{"x": 1}', '{"x": NaN}') + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(main, ["convert", str(raw), "-o", str(out), "--from", "openai"])
    assert r.exit_code == 1, r.output
    assert "raw.jsonl:1: invalid JSON (NaN is not a JSON number)" in r.output
    assert "Traceback" not in r.output and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.jsonl"]


def test_a_line_cut_short_is_called_truncated(tmp_path):
    """Not only a column: the line ends inside a record (a file cut short, a line broken in
    two), in validate and in convert alike."""
    from tests.sftdata_helpers import run_cli

    good = json.dumps(rec([u(), a()]))
    bad = tmp_path / "t.jsonl"
    bad.write_text(good + "\n" + good[:40] + "\n", encoding="utf-8")
    r = validate(str(bad))
    assert r.exit_code == 1
    assert f"{bad}:2: invalid JSON (the line ends inside a record, truncated? " in r.output
    raw = tmp_path / "raw.jsonl"
    raw.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "hi", "outp', encoding="utf-8"
    )
    c = run_cli("convert", raw, "-o", tmp_path / "out.jsonl")
    assert c.exit_code == 1 and c.output.strip().splitlines()[-1] == (
        f"Error: {raw}:2: invalid JSON (the line ends inside a record, truncated? Unterminated "
        "string starting at column 23) (--skip-invalid skips such records, naming each)"
    )
