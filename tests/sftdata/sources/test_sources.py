"""The JSON-shaped adapters (Alpaca, ShareGPT, OpenAI, LLaMA-Factory v1), detection, ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftdata.conversation import Source
from sftdata.errors import ConversionError, RecordError
from sftdata.sources import (
    IdAllocator,
    alpaca,
    detect_format,
    lf_v1,
    openai,
    parse_mapping,
    read_conversations,
    sharegpt,
)
from tests.conftest import FIXTURES

SRC = Source(file="x.json", line=1)
RAW = FIXTURES / "raw"


def roles(conv):
    return [m.role for m in conv.messages]


def contents(conv):
    return [m.content for m in conv.messages]


def _err(fn, value, **kw):
    with pytest.raises(RecordError) as e:
        fn(value, where="x.json:7", source=SRC, rid="r", **kw)
    assert str(e.value).startswith("x.json:7: ")
    return e.value


# --- Alpaca ---------------------------------------------------------------------------


def test_alpaca_joins_instruction_and_input_and_keeps_history_and_system():
    [c] = alpaca.convert(
        {
            "instruction": "Q",
            "input": "ctx",
            "output": "A",
            "system": "S",
            "history": [["q0", "a0"]],
        },
        where="x",
        source=SRC,
        rid="r",
    )
    assert roles(c) == ["system", "user", "assistant", "user", "assistant"]
    assert contents(c) == ["S", "q0", "a0", "Q\nctx", "A"]
    assert c.id == "r" and c.source == SRC


def test_alpaca_seed_task_gives_one_record_per_instance():
    task = {
        "id": "seed_task_9",
        "instruction": "Classify.",
        "instances": [{"input": "a", "output": "x"}, {"input": "", "output": "y"}],
        "is_classification": True,
    }
    convs = alpaca.convert(task, where="x", source=SRC, rid="seed_task_9")
    assert [c.id for c in convs] == ["seed_task_9-0", "seed_task_9-1"]
    assert [contents(c) for c in convs] == [["Classify.\na", "x"], ["Classify.", "y"]]


@pytest.mark.parametrize(
    ("record", "reason", "fragment"),
    [
        ({"instruction": "Q"}, "missing answer", "no answer 'output'"),
        ({"instruction": "Q", "output": "  "}, "empty answer", "empty answer"),
        ({"instruction": "Q", "output": 3}, "wrong type", "'output' must be a string, got number"),
        ({"instruction": ["Q"], "output": "A"}, "wrong type", "must be a string, got array"),
        ({"question": "Q", "output": "A"}, "missing field", "--map KEY=instruction"),
        ({"instruction": "", "output": "A"}, "empty question", "empty question"),
        ({"instruction": "Q", "output": "A", "history": [["q"]]}, "wrong type", "history[0]"),
        ({"instruction": "Q", "instances": []}, "wrong type", "'instances'"),
        ([1, 2], "not an object", "got array"),
        (42, "not an object", "got number"),
    ],
)
def test_alpaca_bad_records(record, reason, fragment):
    e = _err(alpaca.convert, record)
    assert e.reason == reason
    assert fragment in str(e)


# --- ShareGPT -------------------------------------------------------------------------


def test_sharegpt_function_call_observation_and_string_tools():
    tool = {"name": "f", "parameters": {"type": "object"}}
    record = {
        "conversations": [
            {"from": "human", "value": "go"},
            {
                "from": "function_call",
                "value": '[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": "{}"}]',
            },
            {"from": "observation", "value": "42"},
            {"from": "gpt", "value": "done"},
        ],
        "tools": json.dumps([tool]),
    }
    [c] = sharegpt.convert(record, where="x", source=SRC, rid="r")
    assert roles(c) == ["user", "assistant", "tool", "assistant"]
    call = c.messages[1]
    assert call.content == ""
    assert call.tool_calls == [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
        {"type": "function", "function": {"name": "g", "arguments": {}}},
    ]
    assert c.tools == [{"type": "function", "function": tool}]


def test_sharegpt_role_tags_rename_keys_and_roles():
    record = {"messages": [{"role": "Q", "text": "hi"}, {"role": "A", "text": "yo"}]}
    tags = {"role_tag": "role", "content_tag": "text", "user_tag": "Q", "assistant_tag": "A"}
    [c] = sharegpt.convert(record, where="x", source=SRC, rid="r", role_tags=tags)
    assert roles(c) == ["user", "assistant"] and contents(c) == ["hi", "yo"]


@pytest.mark.parametrize(
    ("record", "reason", "fragment"),
    [
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role", "from='bot'"),
        ({"conversations": [{"from": "human", "value": 5}]}, "wrong type", "got number"),
        ({"conversations": [{"from": "human"}]}, "missing field", "no 'value'"),
        ({"conversations": "hi"}, "wrong type", "non-empty list"),
        ({"turns": []}, "missing field", "no 'conversations'"),
        (
            {"conversations": [{"from": "function_call", "value": "{oops"}]},
            "bad tool call",
            "not valid JSON",
        ),
        (
            {"conversations": [{"from": "human", "value": "x"}], "tools": "{bad"},
            "wrong type",
            "'tools'",
        ),
    ],
)
def test_sharegpt_bad_records(record, reason, fragment):
    e = _err(sharegpt.convert, record)
    assert e.reason == reason
    assert fragment in str(e)


# --- OpenAI ---------------------------------------------------------------------------


def test_openai_parts_null_content_weight_and_aliases():
    record = {
        "messages": [
            {"role": "developer", "content": "S"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
            },
            {"role": "function", "content": "r"},
            {"role": "assistant", "content": "ok", "weight": 0},
            {"role": "user", "content": "again", "train": True},
            {"role": "assistant", "content": "fine", "weight": 1},
        ]
    }
    [c] = openai.convert(record, where="x", source=SRC, rid="r")
    assert roles(c) == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert contents(c)[:3] == ["S", "ab", ""]
    assert c.messages[2].tool_calls == [
        {"type": "function", "function": {"name": "f", "arguments": {}}}
    ]
    # Flags equal to the role's default are left out; others are kept.
    assert [m.train for m in c.messages] == [None, None, None, None, False, True, None]


@pytest.mark.parametrize(
    ("record", "reason", "fragment"),
    [
        ({"messages": [{"role": "user", "content": 7}]}, "wrong type", "got number"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role", "'bot'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "unsupported content",
            "image_url",
        ),
        ({"messages": [{"role": "user"}]}, "missing field", "no 'content'"),
        ({"messages": []}, "wrong type", "non-empty list"),
        (
            {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"function": {}}]}]},
            "missing field",
            "no 'name'",
        ),
    ],
)
def test_openai_bad_records(record, reason, fragment):
    e = _err(openai.convert, record)
    assert e.reason == reason
    assert fragment in str(e)


# --- LLaMA-Factory v1 -----------------------------------------------------------------


def test_lf_v1_loss_weight_sets_train_flags():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "q"}], "loss_weight": 1.0},
            {"role": "assistant", "content": [{"type": "text", "value": "a"}], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "text", "value": "q2"}], "loss_weight": 0.0},
            {"role": "assistant", "content": [{"type": "text", "value": "a2"}], "loss_weight": 0.5},
        ]
    }
    [c] = lf_v1.convert(record, where="x", source=SRC, rid="r")
    assert [m.train for m in c.messages] == [True, False, None, None]
    assert [m.trained for m in c.messages] == [True, False, False, True]


def test_lf_v1_non_text_part_is_a_clear_error():
    record = {"messages": [{"role": "user", "content": [{"type": "image", "value": "a.png"}]}]}
    e = _err(lf_v1.convert, record)
    assert e.reason == "unsupported content" and "'image'" in str(e)
    e = _err(
        lf_v1.convert, {"messages": [{"role": "user", "content": [{"type": "text", "value": 1}]}]}
    )
    assert "got number" in str(e)


# --- detection, mapping, ids ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "fragment"),
    [
        ("alpaca.json", "alpaca", '"instruction" and "output"'),
        ("alpaca.jsonl", "alpaca", '"instruction" and "output"'),
        ("sharegpt.json", "sharegpt", '"conversations"'),
        ("openai.jsonl", "openai", '"role"/"content"'),
        ("lf_v1.jsonl", "lf_v1", "{type, value}"),
        ("qa.csv", "csv", "extension .csv"),
        ("qa.tsv", "tsv", "extension .tsv"),
        ("qa.xlsx", "xlsx", "extension .xlsx"),
    ],
)
def test_detect_format_on_fixtures(name, fmt, fragment):
    got, why = detect_format(RAW / name)
    assert got == fmt and fragment in why


def test_detect_by_content_without_a_telling_extension(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n')
    assert detect_format(data)[0] == "sharegpt"
    book = tmp_path / "book.bin"
    book.write_bytes((RAW / "qa.xlsx").read_bytes())
    assert detect_format(book)[0] == "xlsx"
    odd = tmp_path / "odd.json"
    odd.write_text('{"q": "a", "r": "b"}\n')
    with pytest.raises(
        ConversionError, match=r"odd\.json:1: cannot tell the format.*'q', 'r'.*--from"
    ):
        detect_format(odd)
    assert detect_format(odd, mapping={"q": "instruction", "r": "output"})[0] == "alpaca"


def test_parse_mapping_checks_targets():
    assert parse_mapping("问题=instruction, 背景=input,回应=output") == {
        "问题": "instruction",
        "背景": "input",
        "回应": "output",
    }
    with pytest.raises(ConversionError, match="unknown target 'answer'"):
        parse_mapping("q=answer")
    with pytest.raises(ConversionError, match="expected SRC=DST"):
        parse_mapping("question")


def test_mapping_applies_to_json_records(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"q": "Q?", "a": "A."}\n')
    [c] = read_conversations(p, mapping={"q": "instruction", "a": "output"})
    assert contents(c) == ["Q?", "A."]


def test_id_allocator_is_unique_and_deterministic():
    ids = IdAllocator()
    assert ids.stem(Path("a/data.json")) == "data"
    assert ids.stem(Path("b/data.json")) == "data.2"
    assert ids.own("x") == "x"
    assert ids.own("x") == "x.2"
    assert ids.generated("data-0") == "data-0"
    assert ids.own("data-0") == "data-0.2"  # looks like an id generated for input "data"
    assert ids.own("y-1") == "y-1"
    ids2 = IdAllocator()
    assert ids2.own("z-1") == "z-1"  # an earlier input's own id...
    assert ids2.stem(Path("z.json")) == "z"
    assert ids2.generated("z-1") == "z-1.2"  # ...so the later generated one moves aside


def test_read_conversations_raises_on_the_first_bad_record(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"instruction": "Q", "output": "A"}\n{"instruction": "Q"}\n')
    it = read_conversations(p)
    assert next(it).id == "a-0"
    with pytest.raises(ConversionError, match=r"a\.jsonl:2: record has no answer"):
        next(it)


def test_detection_looks_past_bad_first_records(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{broken\n[1]\n{"instruction": "q", "output": "a"}\n')
    assert detect_format(p)[0] == "alpaca"
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("{broken\n")
    with pytest.raises(ConversionError, match=r"bad\.jsonl:1: invalid JSON"):
        detect_format(only_bad)
