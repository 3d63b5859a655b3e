"""CSV/TSV and XLSX adapters: headers, auto-mapping, quoting, blank rows, sheets, formulas."""

from __future__ import annotations

import pytest

from sftdata.errors import ConversionError, RecordError
from sftdata.sources import iter_records, read_conversations
from tests.conftest import FIXTURES

RAW = FIXTURES / "raw"


def contents(conv):
    return [m.content for m in conv.messages]


def test_csv_quoted_newlines_quotes_and_start_lines():
    convs = list(read_conversations(RAW / "qa.csv"))
    assert [c.source.line for c in convs] == [2, 3, 6]  # line 5 is blank
    assert contents(convs[1]) == ['Quote this, please\nHe said "hi"', 'He said "hi".\nTwice.']
    assert contents(convs[2]) == ["List two fruits.", "- apple\n- pear"]
    assert [c.id for c in convs] == ["qa-0", "qa-1", "qa-2"]


def test_tsv_with_system_column():
    convs = list(read_conversations(RAW / "qa.tsv"))
    assert contents(convs[0]) == ["Reverse the word.\nabc", "cba"]
    assert [m.role for m in convs[1].messages] == ["system", "user", "assistant"]


def test_csv_auto_maps_common_headers_and_map_wins(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("Prompt,Response,notes\nhi,hello,x\n")
    [c] = read_conversations(p)
    assert contents(c) == ["hi", "hello"]
    p.write_text("frage,antwort,response\nhi,hallo,hello\n")
    [c] = read_conversations(p, mapping={"frage": "instruction", "antwort": "output"})
    assert contents(c) == ["hi", "hallo"]


def test_csv_ambiguous_or_missing_columns_are_explained(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("question,prompt,answer\na,b,c\n")
    with pytest.raises(ConversionError, match=r"t\.csv:1: header: columns 'question', 'prompt'"):
        list(read_conversations(p))
    p.write_text("question,context\na,b\n")
    with pytest.raises(
        ConversionError,
        match=r"t\.csv:1: header: no column for 'output' \(headers found: question, context\).*--map",
    ):
        list(read_conversations(p))
    with pytest.raises(ConversionError, match=r"--map names column 'answer'"):
        list(read_conversations(p, mapping={"answer": "output"}))


def test_csv_bom_and_gbk_encoding(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffquestion,answer\n问,答\n".encode())
    assert contents(next(read_conversations(p))) == ["问", "答"]
    g = tmp_path / "gbk.csv"
    g.write_bytes("question,answer\nok,fine\n中文问题,中文回答\n".encode("gbk"))
    with pytest.raises(
        ConversionError, match=r"gbk\.csv:3: not valid utf-8 text.*--encoding gb18030"
    ):
        list(read_conversations(g))
    assert contents(list(read_conversations(g, encoding="gb18030"))[1]) == ["中文问题", "中文回答"]


def test_csv_bad_rows_are_record_errors(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('question,answer\n"multi\nline",\nq2,a2\n')
    items = list(iter_records(p))
    assert isinstance(items[0], RecordError) and items[0].reason == "empty answer"
    assert str(items[0]).startswith(f"{p}:2: ")
    assert contents(items[1]) == ["q2", "a2"] and items[1].source.line == 4


def test_xlsx_first_sheet_blank_rows_numbers_and_cached_formula():
    convs = list(read_conversations(RAW / "qa.xlsx", mapping=None))
    assert [(c.source.sheet, c.source.row) for c in convs] == [
        ("QA", 2),
        ("QA", 4),
        ("QA", 5),
        ("QA", 6),
    ]
    assert contents(convs[1]) == ["总结这段话。\n猫喜欢睡觉。\n狗也是。", "宠物爱睡觉。"]
    assert contents(convs[2]) == [
        "The answer?",
        "The answer is 42",
    ]  # cached value, not the formula
    assert contents(convs[3]) == ["Numbers\n3", "4"]
    assert str(convs[0].source) == f"{RAW / 'qa.xlsx'}:QA:row 2"


def test_xlsx_other_sheet_by_name_and_missing_sheet():
    [c] = read_conversations(RAW / "qa.xlsx", sheet="Notes")
    assert contents(c) == ["Which sheet is this?", "Notes"] and c.source.sheet == "Notes"
    with pytest.raises(
        ConversionError, match=r"qa\.xlsx: no sheet named 'Nope' \(sheets: 'QA', 'Notes'\)"
    ):
        list(read_conversations(RAW / "qa.xlsx", sheet="Nope"))


def _book(path, rows, *, title="S"):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = title
    for r in rows:
        ws.append(r)
    wb.save(path)


def test_xlsx_missing_header_names_file_sheet_and_headers(tmp_path):
    p = tmp_path / "h.xlsx"
    _book(p, [["名字", "年龄"], ["a", 1]])
    with pytest.raises(
        ConversionError,
        match=r"h\.xlsx:S:row 1: header: no column for 'instruction' \(headers found: 名字, 年龄\)",
    ):
        list(read_conversations(p))


def test_xlsx_formula_without_cached_value_is_reported_not_evaluated(tmp_path):
    p = tmp_path / "f.xlsx"
    _book(p, [["question", "answer"], ["ok", "fine"], ["sum?", "=1+1"]])
    items = list(iter_records(p))
    assert contents(items[0]) == ["ok", "fine"]
    assert isinstance(items[1], RecordError)
    assert items[1].reason == "formula without cached value"
    assert str(items[1]).startswith(f"{p}:S:row 3: the 'answer' cell (output) is a formula")


def test_sheet_option_only_for_workbooks():
    with pytest.raises(ConversionError, match="--sheet only applies"):
        list(read_conversations(RAW / "qa.csv", sheet="x"))


def test_rows_wider_than_the_header_are_refused_not_cut(tmp_path):
    """A row with text past the header's columns (an unquoted comma, a shifted row) is a record
    error naming its line/row (``--skip-invalid`` counts it); empty trailing cells are fine."""
    p = tmp_path / "w.csv"
    p.write_text("question,answer\nq1,a1\nName a colour,blue,green\nq3,a3,,\n")
    items = list(iter_records(p))
    assert contents(items[0]) == ["q1", "a1"] and contents(items[2]) == ["q3", "a3"]
    assert isinstance(items[1], RecordError) and items[1].reason == "extra cells"
    assert str(items[1]).startswith(f"{p}:3: the row has text in 1 cell(s) past the header's 2")
    x = tmp_path / "w.xlsx"
    _book(x, [["question", "answer", None], ["q1", "a1", None], ["q2", "a2", "stray"]])
    items = list(iter_records(x))
    assert contents(items[0]) == ["q1", "a1"]
    assert isinstance(items[1], RecordError) and str(items[1]).startswith(f"{x}:S:row 3: ")
