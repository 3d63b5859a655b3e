"""`sftdata export --format sharegpt|alpaca|openai` (sftdata/export/chat.py): round trips on real data, refusals, schemas.

(Named apart from tests/sfttrain/export/test_hf.py, which tests sfttrain/export/hf.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from sftdata.cli import main
from sftdata.conversation import Conversation, Message, Source, read_jsonl
from sftdata.errors import ConversionError
from sftdata.export.chat import to_alpaca, to_openai, to_sharegpt
from sftdata.sources import read_conversations
from tests.conftest import ROOT


def _canonical(raw: Path, out: Path) -> list[Conversation]:
    convs = list(read_conversations(raw))
    out.write_text("".join(c.to_json() + "\n" for c in convs), encoding="utf-8")
    return convs


def _export(src: Path, fmt: str, out: Path) -> None:
    res = CliRunner().invoke(main, ["export", str(src), "--format", fmt, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert f"to {out}" in res.output


def _without_source(c: Conversation, *, keep_id: bool = True) -> dict:
    d = c.to_dict()
    d.pop("source")
    if not keep_id:
        d.pop("id")
    return d


def _schema(name: str) -> dict:
    return json.loads((ROOT / "schemas" / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "name", ["sharegpt_dummy_conversation.json", "glaive_toolcall_en_demo.json"]
)
def test_sharegpt_round_trip_is_identity(shared_data: Path, tmp_path: Path, name: str) -> None:
    canon = tmp_path / "c.jsonl"
    convs = _canonical(shared_data / name, canon)
    out = tmp_path / "out.json"
    _export(canon, "sharegpt", out)
    exported = json.loads(out.read_text(encoding="utf-8"))
    jsonschema.validate(exported, _schema("export-sharegpt.json"))
    back = list(read_conversations(out, fmt="sharegpt"))
    assert [_without_source(c) for c in back] == [_without_source(c) for c in convs]
    assert sum(1 for c in convs for m in c.messages if m.tool_calls) > (
        200 if "glaive" in name else -1
    )


def test_sharegpt_export_reproduces_fastchat_file(shared_data: Path, tmp_path: Path) -> None:
    """FastChat's own file comes back byte-for-byte equal as JSON values."""
    raw = shared_data / "sharegpt_dummy_conversation.json"
    canon = tmp_path / "c.jsonl"
    _canonical(raw, canon)
    out = tmp_path / "out.json"
    _export(canon, "sharegpt", out)
    assert json.loads(out.read_text("utf-8")) == json.loads(raw.read_text("utf-8"))


def test_sharegpt_export_matches_llamafactory_glaive_layout(
    shared_data: Path, tmp_path: Path
) -> None:
    raw = shared_data / "glaive_toolcall_en_demo.json"
    canon = tmp_path / "c.jsonl"
    _canonical(raw, canon)
    out = tmp_path / "out.json"
    _export(canon, "sharegpt", out)
    orig = json.loads(raw.read_text("utf-8"))
    mine = json.loads(out.read_text("utf-8"))
    assert len(mine) == len(orig)
    for a, b in zip(orig, mine, strict=True):
        assert [t["from"] for t in a["conversations"]] == [t["from"] for t in b["conversations"]]
        for ta, tb in zip(a["conversations"], b["conversations"], strict=True):
            if ta["from"] == "function_call":
                assert json.loads(ta["value"]) == json.loads(tb["value"])
            else:
                assert ta["value"] == tb["value"]
        assert json.loads(a["tools"] or "[]") == json.loads(b.get("tools", "[]"))


def test_alpaca_round_trip(shared_data: Path, tmp_path: Path) -> None:
    raw = shared_data / "alpaca_en_demo.json"
    canon = tmp_path / "c.jsonl"
    convs = _canonical(raw, canon)
    out = tmp_path / "out.json"
    _export(canon, "alpaca", out)
    exported = json.loads(out.read_text("utf-8"))
    jsonschema.validate(exported, _schema("export-alpaca.json"))
    orig = [r for r in json.loads(raw.read_text("utf-8"))]
    by_output = {r["output"]: r for r in orig}
    for rec in exported[:50]:
        o = by_output[rec["output"]]
        assert rec["instruction"] == "\n".join(
            p for p in (o["instruction"], o["input"]) if p.strip()
        )
    back = list(read_conversations(out, fmt="alpaca"))
    # Alpaca has no id field: ids are regenerated, everything else is identical.
    assert [_without_source(c, keep_id=False) for c in back] == [
        _without_source(c, keep_id=False) for c in convs
    ]


def test_alpaca_history_and_system(tmp_path: Path) -> None:
    conv = Conversation(
        id="x",
        source=Source("f.json", line=3),
        messages=[
            Message("system", "be brief"),
            Message("user", "q1"),
            Message("assistant", "a1"),
            Message("user", "q2"),
            Message("assistant", "a2"),
        ],
    )
    rec = to_alpaca(conv)
    assert rec == {
        "instruction": "q2",
        "input": "",
        "output": "a2",
        "system": "be brief",
        "history": [["q1", "a1"]],
    }


def test_openai_round_trip_keeps_train_flags(shared_data: Path, tmp_path: Path) -> None:
    conv = Conversation(
        id="w",
        source=Source("f.jsonl", line=1),
        messages=[
            Message("user", "q1"),
            Message("assistant", "a1", train=False),
            Message("user", "q2"),
            Message("assistant", "a2"),
        ],
    )
    convs = [*read_conversations(shared_data / "glaive_toolcall_en_demo.json"), conv]
    canon = tmp_path / "c.jsonl"
    canon.write_text("".join(c.to_json() + "\n" for c in convs), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    _export(canon, "openai", out)
    lines = [json.loads(x) for x in out.read_text("utf-8").splitlines()]
    schema = _schema("export-openai.json")
    for line in lines:
        jsonschema.validate(line, schema)
    assert lines[-1]["messages"][1]["weight"] == 0
    back = list(read_conversations(out, fmt="openai"))
    assert [_without_source(c, keep_id=False) for c in back] == [
        _without_source(c, keep_id=False) for c in convs
    ]


def test_alpaca_refuses_tool_records_with_file_line(shared_data: Path, tmp_path: Path) -> None:
    canon = tmp_path / "c.jsonl"
    _canonical(shared_data / "glaive_toolcall_en_demo.json", canon)
    out = tmp_path / "out.json"
    res = CliRunner().invoke(main, ["export", str(canon), "--format", "alpaca", "-o", str(out)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {canon}:1 ")
    assert "tools" in lines[0] and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == [canon]  # no partial output, no temp file


@pytest.mark.parametrize(
    ("messages", "fn", "needle"),
    [
        (
            [Message("user", "q"), Message("tool", "r"), Message("assistant", "a")],
            to_alpaca,
            "tool turn",
        ),
        ([Message("user", "q")], to_alpaca, "pairs"),
        ([Message("assistant", "a"), Message("user", "q")], to_alpaca, "alternate"),
        ([Message("user", "q", train=True), Message("assistant", "a")], to_sharegpt, "train=true"),
        ([Message("user", "q", train=True), Message("assistant", "a")], to_openai, "train=true"),
        (
            [
                Message("user", "q"),
                Message(
                    "assistant",
                    "let me look",
                    tool_calls=[{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                ),
            ],
            to_sharegpt,
            "both text and tool calls",
        ),
    ],
)
def test_inexpressible_records_are_refused(messages, fn, needle) -> None:
    conv = Conversation(id="r", source=Source("raw.json", line=7), messages=messages)
    with pytest.raises(ConversionError, match=needle) as e:
        fn(conv)
    assert str(e.value).startswith("raw.json:7: ")


def test_parallel_tool_calls_become_a_json_list(tmp_path: Path) -> None:
    calls = [
        {"type": "function", "function": {"name": "a", "arguments": {"x": 1}}},
        {"type": "function", "function": {"name": "b", "arguments": {}}},
    ]
    conv = Conversation(
        id="p",
        source=Source("raw.json", line=1),
        messages=[
            Message("user", "q"),
            Message("assistant", "", tool_calls=calls),
            Message("tool", "r1"),
            Message("tool", "r2"),
            Message("assistant", "done"),
        ],
    )
    rec = to_sharegpt(conv)
    assert json.loads(rec["conversations"][1]["value"]) == [
        {"name": "a", "arguments": {"x": 1}},
        {"name": "b", "arguments": {}},
    ]
    canon = tmp_path / "c.jsonl"
    canon.write_text(conv.to_json() + "\n", encoding="utf-8")
    out = tmp_path / "o.json"
    _export(canon, "sharegpt", out)
    back = next(read_conversations(out, fmt="sharegpt"))
    assert _without_source(back) == _without_source(conv)


def test_mindrecord_only_options_are_refused_for_chat_formats(tmp_path: Path) -> None:
    canon = tmp_path / "c.jsonl"
    canon.write_text("", encoding="utf-8")
    res = CliRunner().invoke(
        main,
        [
            "export",
            str(canon),
            "--format",
            "sharegpt",
            "-o",
            str(tmp_path / "o"),
            "--layout",
            "mcore",
        ],
    )
    assert res.exit_code == 1 and "--layout only applies to --format mindrecord" in res.output


def test_missing_input_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main,
        ["export", str(tmp_path / "nope.jsonl"), "--format", "openai", "-o", str(tmp_path / "o")],
    )
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: {tmp_path / 'nope.jsonl'}: no such file"
    assert not (tmp_path / "o").exists()


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    canon = tmp_path / "c.jsonl"
    canon.write_text("", encoding="utf-8")
    out = canon / "sub" / "o.json"  # below a file: neither the folder nor the file can be made
    res = CliRunner().invoke(main, ["export", str(canon), "--format", "alpaca", "-o", str(out)])
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: {out}: cannot write here (Not a directory)"


def test_bad_utf8_is_named_at_its_own_line(tmp_path: Path) -> None:
    """Far past the first read-ahead block: the error names the line of the bad byte."""
    canon = tmp_path / "c.jsonl"
    good = (
        '{"schema_version": 1, "id": "a", "messages": [{"role": "user", "content": "q"}, '
        '{"role": "assistant", "content": "a"}]}\n'
    )
    canon.write_bytes(good.encode() * 300 + b'{"id": "\xff"}\n')
    res = CliRunner().invoke(
        main, ["export", str(canon), "--format", "openai", "-o", str(tmp_path / "o.jsonl")]
    )
    assert res.exit_code == 1
    assert res.output.strip() == f"Error: {canon}:301: not valid UTF-8 text"


def test_export_reads_what_convert_wrote(tmp_path: Path) -> None:
    """read_jsonl is the reader: records without a source are named by the JSONL line."""
    canon = tmp_path / "c.jsonl"
    canon.write_text(
        '{"schema_version": 1, "id": "a", "messages": [{"role": "user", "content": "q"}, '
        '{"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}\n',
        encoding="utf-8",
    )
    assert next(read_jsonl(canon)).id == "a"
    res = CliRunner().invoke(
        main, ["export", str(canon), "--format", "alpaca", "-o", str(tmp_path / "o.json")]
    )
    assert res.exit_code == 1 and f"{canon}:1" in res.output


V2 = Conversation(
    id="v2",
    source=Source("raw.jsonl", line=3),
    messages=[
        Message("user", "Weather in Oslo and Rome?"),
        Message(
            "assistant",
            "",
            reasoning="Two cities: two calls.",
            tool_calls=[
                {
                    "id": "call_o",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Oslo"}},
                },
                {
                    "id": "call_r",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Rome"}},
                },
            ],
        ),
        Message("tool", '{"c": 3}', tool_call_id="call_o", name="weather"),
        Message("tool", '{"c": 21}', tool_call_id="call_r", name="weather"),
        Message("assistant", "Oslo 3, Rome 21.", reasoning="Read both results."),
    ],
)


def test_openai_export_writes_string_arguments_ids_and_reasoning(tmp_path: Path) -> None:
    rec = to_openai(V2)
    jsonschema.validate(rec, _schema("export-openai.json"))
    call = rec["messages"][1]["tool_calls"][0]
    assert call == {
        "id": "call_o",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
    }
    assert rec["messages"][1]["reasoning_content"] == "Two cities: two calls."
    assert rec["messages"][3] == {
        "role": "tool",
        "content": '{"c": 21}',
        "tool_call_id": "call_r",
        "name": "weather",
    }
    canon = tmp_path / "c.jsonl"
    canon.write_text(V2.to_json() + "\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    _export(canon, "openai", out)
    back = next(read_conversations(out, fmt="openai"))
    assert _without_source(back, keep_id=False) == _without_source(V2, keep_id=False)


def test_sharegpt_export_keeps_reasoning_as_think_and_refuses_reordered_results(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConversionError, match=r"text and tool calls \(or reasoning"):
        to_sharegpt(V2)  # reasoning on a tool-call turn: no ShareGPT form
    msgs = list(V2.messages)
    msgs[1] = Message("assistant", "", tool_calls=msgs[1].tool_calls)
    plain = Conversation("v2", msgs, V2.source)
    rec = to_sharegpt(plain)
    assert rec["conversations"][-1]["value"] == (
        "<think>\nRead both results.\n</think>\n\nOslo 3, Rome 21."
    )
    canon = tmp_path / "c.jsonl"
    canon.write_text(plain.to_json() + "\n", encoding="utf-8")
    out = tmp_path / "o.json"
    _export(canon, "sharegpt", out)
    back = next(read_conversations(out, fmt="sharegpt"))
    assert back.messages[-1].reasoning == "Read both results."
    assert back.messages[-1].content == "Oslo 3, Rome 21."
    # results answering the calls out of order cannot be paired by position
    swapped = [*msgs[:2], msgs[3], msgs[2], msgs[4]]
    with pytest.raises(ConversionError, match=r"raw.jsonl:3: messages\[2\] answers call 'call_r'"):
        to_sharegpt(Conversation("v2", swapped, V2.source))
    alp = to_alpaca(Conversation("a", [msgs[0], msgs[4]], V2.source))
    assert alp["output"].startswith("<think>\nRead both results.\n</think>\n\n")


def test_export_json_summary(shared_data: Path, tmp_path: Path) -> None:
    import json

    src = tmp_path / "c.jsonl"
    convs = _canonical(shared_data / "identity.json", src)
    res = CliRunner().invoke(main, ["export", str(src), "--format", "sharegpt", "-o",
                                    str(tmp_path / "o.json"), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"format": "sharegpt", "output": str(tmp_path / "o.json"),
                                      "records": len(convs)}  # fmt: skip
