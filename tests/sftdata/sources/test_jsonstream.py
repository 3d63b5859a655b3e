"""The streaming JSON reader: arrays element by element with line numbers, JSON lines."""

from __future__ import annotations

import json

import pytest

from sftdata.errors import ConversionError, RecordError
from sftdata.sources import jsonstream
from sftdata.sources.jsonstream import iter_json


def _records(path, **kw):
    return list(iter_json(path, **kw))


def test_array_elements_carry_their_start_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"a": 1},\n\n  {"b":\n 2}, {"c": 3}\n]\n')
    assert _records(p) == [(2, {"a": 1}), (4, {"b": 2}), (5, {"c": 3})]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_array_survives_every_chunk_boundary(tmp_path, monkeypatch, chunk):
    # Tiny chunks cut strings, escapes, numbers, literals and multi-byte UTF-8 everywhere.
    monkeypatch.setattr(jsonstream, "CHUNK_CHARS", chunk)
    records = [
        {"s": "x" * 20, "n": 12345.678, "t": True, "z": None},
        {"u": '中文 \\u00e9 \u00e9 "q"', "l": [1, 2, {"k": -0.5e-3}]},
        {"e": ""},
    ]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    got = _records(p)
    assert [v for _, v in got] == records
    text = p.read_text(encoding="utf-8").splitlines()
    for line, _ in got:
        assert text[line - 1].lstrip().startswith("{")


def test_array_with_bom_and_top_level_scalars(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b'\xef\xbb\xbf[1, "two"]')
    assert _records(p) == [(1, 1), (1, "two")]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('[\n{"a": 1},\n{"b": 2\n', 3, "file ends inside the record"),
        ('[\n{"a": 1},\n{"b": 2}\n', 3, "file ends inside the array"),
        ('[\n{"a": 1}\n{"b": 2}]', 3, "expected ',' or ']'"),
        ('[\n{"a": 1},\n]', 2, "trailing comma"),
        ('[\n{"a": tru}]', 2, "invalid JSON"),
        ('[{"a": 1}]\n\nextra', 3, "extra data"),
        ("[\n\n]", 3, "empty"),
    ],
)
def test_broken_arrays_name_the_line(tmp_path, text, line, fragment):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(ConversionError) as e:
        _records(p)
    assert str(e.value).startswith(f"{p}:{line}: ")
    assert fragment in str(e.value)


def test_json_lines_yield_errors_and_go_on(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"b": \n[1]\n')
    got = _records(p)
    assert got[0] == (1, {"a": 1})
    assert isinstance(got[1], RecordError) and str(got[1]).startswith(f"{p}:3: invalid JSON")
    assert got[1].reason == "invalid JSON"
    assert got[2] == (4, [1])


def test_decoding_errors_name_the_line_and_suggest_encoding(tmp_path):
    p = tmp_path / "gbk.jsonl"
    p.write_bytes('{"a": "ok"}\n{"a": "中文"}\n'.encode("gbk"))
    with pytest.raises(ConversionError, match=r"gbk\.jsonl:2: not valid utf-8 text.*gb18030"):
        _records(p)
    assert [v for _, v in _records(p, encoding="gb18030")] == [{"a": "ok"}, {"a": "中文"}]
    arr = tmp_path / "gbk.json"
    arr.write_bytes('[\n{"a": "ok"},\n{"a": "中文"}]'.encode("gbk"))
    with pytest.raises(ConversionError, match=r"gbk\.json:3: not valid utf-8"):
        _records(arr)


def test_utf16_json_lines(tmp_path):
    p = tmp_path / "u16.jsonl"
    p.write_text('{"a": "é"}\n', encoding="utf-16")
    assert _records(p, encoding="utf-16") == [(1, {"a": "é"})]
