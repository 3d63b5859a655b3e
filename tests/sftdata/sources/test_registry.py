"""LLaMA-Factory's dataset_info.json registry (sftdata.sources.registry) through convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sftdata.cli import main as sftdata_main
from sftdata.conversation import read_jsonl
from sftdata.errors import ConversionError
from sftdata.sources import read_conversations
from sftdata.sources.registry import HUB_KEYS, read_registered, resolve_entry


def _convert(*args: str):
    return CliRunner().invoke(sftdata_main, ["convert", *args])


def _strip(convs) -> list[dict]:
    out = []
    for c in convs:
        d = c.to_dict()
        d.pop("source")
        d.pop("id")
        out.append(d)
    return out


# --- dataset_info.json: the real registry --------------------------------------------------


def _local_entries(shared_data: Path) -> list[str]:
    info = json.loads((shared_data / "dataset_info.json").read_text(encoding="utf-8"))
    return [
        name
        for name, e in info.items()
        if "file_name" in e
        and not any(k in e for k in HUB_KEYS)
        and (shared_data / e["file_name"]).exists()
    ]


def test_every_local_entry_of_the_real_registry_converts(shared_data: Path, tmp_path: Path) -> None:
    names = _local_entries(shared_data)
    assert {"identity", "alpaca_en_demo", "alpaca_zh_demo", "glaive_toolcall_en_demo"} <= set(names)
    info = json.loads((shared_data / "dataset_info.json").read_text(encoding="utf-8"))
    for name in names:
        out = tmp_path / f"{name}.jsonl"
        res = _convert(
            "--dataset-info",
            str(shared_data / "dataset_info.json"),
            "--dataset",
            name,
            "-o",
            str(out),
        )
        assert res.exit_code == 0, res.output
        got = list(read_jsonl(out))
        # The registry's formatting decides the reader: same records as reading the file with it.
        fmt = info[name].get("formatting", "alpaca")
        want = list(read_conversations(shared_data / info[name]["file_name"], fmt=fmt))
        assert _strip(got) == _strip(want)
        assert len(got) == len(
            json.loads((shared_data / info[name]["file_name"]).read_text("utf-8"))
        )
        if name == "glaive_toolcall_en_demo":  # columns: messages=conversations, tools=tools
            assert sum(bool(c.tools) for c in got) > len(got) // 2
            assert any(m.tool_calls for c in got for m in c.messages)


def test_several_entries_concatenate_in_order(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    res = _convert(
        "--dataset-info",
        str(shared_data),
        "--dataset",
        "identity,glaive_toolcall_en_demo",
        "-o",
        str(out),
    )
    assert res.exit_code == 0, res.output
    got = list(read_jsonl(out))
    assert len(got) == 91 + 300
    assert got[0].source.file.endswith("identity.json")
    assert got[-1].source.file.endswith("glaive_toolcall_en_demo.json")


def test_hub_entries_are_refused_in_one_line(shared_data: Path, tmp_path: Path) -> None:
    info = json.loads((shared_data / "dataset_info.json").read_text(encoding="utf-8"))
    hub = [n for n, e in info.items() if any(k in e for k in HUB_KEYS)]
    assert len(hub) > 50
    for name in hub:
        with pytest.raises(ConversionError, match="only local files are supported"):
            resolve_entry(shared_data / "dataset_info.json", name)
    out = tmp_path / "o.jsonl"
    res = _convert(
        "--dataset-info",
        str(shared_data / "dataset_info.json"),
        "--dataset",
        hub[0],
        "-o",
        str(out),
    )
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert "only local files are supported" in res.output and not out.exists()


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("glaive_toolcall_zh_demo", "does not exist"),
        ("mllm_demo", "column 'images' is not supported"),
        ("dpo_en_demo", "ranking"),
        ("no_such_entry", "is not in the registry"),
    ],
)
def test_registry_refusals(shared_data: Path, tmp_path: Path, name: str, needle: str) -> None:
    res = _convert(
        "--dataset-info",
        str(shared_data / "dataset_info.json"),
        "--dataset",
        name,
        "-o",
        str(tmp_path / "o"),
    )
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1
    assert needle in res.output and name in res.output


def test_option_pairing_errors(tmp_path: Path) -> None:
    assert "needs --dataset-info" in _convert("--dataset", "x", "-o", str(tmp_path / "o")).output
    res = _convert("--dataset-info", str(tmp_path), "-o", str(tmp_path / "o"))
    assert res.exit_code == 1 and "needs --dataset NAME" in res.output
    res = _convert(
        "--dataset-info", str(tmp_path), "--dataset", "a", "--map", "q=instruction", "-o", "o"
    )
    assert res.exit_code == 1 and "--from/--map do not apply" in res.output


# --- dataset_info.json: columns, tags, folders ---------------------------------------------


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def test_alpaca_columns_are_mapped(tmp_path: Path) -> None:
    _write(
        tmp_path / "sub" / "qa.json",
        [
            {
                "q": "What is 2+2?",
                "ctx": "math",
                "a": "4",
                "sys": "Be terse.",
                "hist": [["hi", "hello"]],
            }
        ],
    )
    _write(
        tmp_path / "dataset_info.json",
        {
            "mine": {
                "file_name": "sub/qa.json",
                "columns": {
                    "prompt": "q",
                    "query": "ctx",
                    "response": "a",
                    "system": "sys",
                    "history": "hist",
                },
            }
        },
    )
    (conv,) = read_registered(tmp_path / "dataset_info.json", "mine")
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "Be terse."),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "What is 2+2?\nmath"),
        ("assistant", "4"),
    ]


def test_sharegpt_tags_are_honoured(tmp_path: Path) -> None:
    _write(
        tmp_path / "chat.json",
        [
            {
                "dialog": [
                    {"speaker": "sys", "text": "You are kind."},
                    {"speaker": "person", "text": "weather?"},
                    {
                        "speaker": "bot_call",
                        "text": '{"name": "wx", "arguments": {"city": "Paris"}}',
                    },
                    {"speaker": "result", "text": '{"t": 21}'},
                    {"speaker": "bot", "text": "21 degrees."},
                ],
                "fns": '[{"name": "wx", "parameters": {"type": "object"}}]',
            }
        ],
    )
    tags = {
        "role_tag": "speaker", "content_tag": "text", "user_tag": "person", "assistant_tag": "bot",
        "observation_tag": "result", "function_tag": "bot_call", "system_tag": "sys",
    }  # fmt: skip
    _write(
        tmp_path / "dataset_info.json",
        {
            "c": {
                "file_name": "chat.json",
                "formatting": "sharegpt",
                "columns": {"messages": "dialog", "tools": "fns"},
                "tags": tags,
            }
        },
    )
    out = tmp_path / "o.jsonl"
    res = _convert(
        "--dataset-info", str(tmp_path / "dataset_info.json"), "--dataset", "c", "-o", str(out)
    )
    assert res.exit_code == 0, res.output
    (conv,) = read_jsonl(out)
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[2].tool_calls[0]["function"]["name"] == "wx"
    assert conv.tools and conv.tools[0]["function"]["name"] == "wx"


def test_openai_formatting_and_folder_file_name(tmp_path: Path) -> None:
    for k in (1, 2):
        _write(
            tmp_path / "d" / f"part{k}.json",
            [
                {
                    "messages": [
                        {"role": "user", "content": f"q{k}"},
                        {"role": "assistant", "content": f"a{k}"},
                    ]
                }
            ],
        )
    _write(
        tmp_path / "dataset_info.json",
        {"o": {"file_name": "d", "formatting": "openai", "columns": {"messages": "messages"}}},
    )
    convs = list(read_registered(tmp_path / "dataset_info.json", "o"))
    assert [c.messages[0].content for c in convs] == ["q1", "q2"]


def test_unsupported_column_role_and_tags_named(tmp_path: Path) -> None:
    _write(tmp_path / "x.json", [{"instruction": "a", "output": "b"}])
    _write(
        tmp_path / "dataset_info.json",
        {
            "bad_col": {"file_name": "x.json", "columns": {"answer": "output"}},
            "bad_tag": {
                "file_name": "x.json",
                "formatting": "sharegpt",
                "tags": {"speaker_tag": "x"},
            },
            "txt": {"file_name": "x.json", "formatting": "jsonl"},
        },
    )
    info = tmp_path / "dataset_info.json"
    with pytest.raises(ConversionError, match="column role 'answer'"):
        resolve_entry(info, "bad_col")
    with pytest.raises(ConversionError, match="tag 'speaker_tag'"):
        resolve_entry(info, "bad_tag")
    with pytest.raises(ConversionError, match="formatting 'jsonl'"):
        resolve_entry(info, "txt")


def test_num_samples_is_reported_not_silently_applied(tmp_path: Path) -> None:
    _write(tmp_path / "x.json", [{"instruction": f"q{i}", "output": "a"} for i in range(5)])
    _write(tmp_path / "dataset_info.json", {"x": {"file_name": "x.json", "num_samples": 2}})
    out = tmp_path / "o.jsonl"
    res = _convert("--dataset-info", str(tmp_path), "--dataset", "x", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "num_samples=2 is not applied" in res.output
    assert len(list(read_jsonl(out))) == 5


def test_broken_registry_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "dataset_info.json").write_text('{"a": {', encoding="utf-8")
    res = _convert(
        "--dataset-info",
        str(tmp_path / "dataset_info.json"),
        "--dataset",
        "a",
        "-o",
        str(tmp_path / "o"),
    )
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert "dataset_info.json:1: invalid JSON" in res.output
