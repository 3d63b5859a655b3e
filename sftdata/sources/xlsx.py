"""Excel workbooks, row by row in openpyxl's read-only mode.

``data_only=True`` returns the value Excel cached for a formula cell; formulas are never
evaluated (a formula cell without a cached value reads as empty). Blank rows are skipped. The
first non-blank row of the sheet is the header; a record's source is the sheet and Excel row.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

from sftdata.conversation import Conversation
from sftdata.errors import ConversionError
from sftdata.sources.base import RecordError, cell_text, check_input_file, source_of
from sftdata.sources.table import header_width, is_blank, resolve_columns, row_conversation


def open_workbook(path: Path):
    """Open read-only with cached values; a file that is not a workbook is a one-line error."""
    import openpyxl

    head = check_input_file(path)
    if not head.startswith(b"PK"):
        raise ConversionError(f"{path}: not an Excel .xlsx workbook (no zip signature)")
    try:
        return openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot open as an .xlsx workbook ({e})") from None


class _FormulaView:
    """The same sheet without ``data_only``: tells "empty" from "formula with no cached value".

    Opened only when a mapped cell reads empty, then advanced in step with the value rows, so a
    sheet without empty cells is parsed once and any sheet at most twice.
    """

    def __init__(self, path: Path, sheet: str) -> None:
        import openpyxl

        self.wb = openpyxl.load_workbook(path, read_only=True, data_only=False)
        self.rows = enumerate(self.wb[sheet].iter_rows(values_only=True), start=1)
        self.current: tuple[int, tuple] = (0, ())

    def formula(self, rowno: int, col: int) -> str | None:
        while self.current[0] < rowno:
            self.current = next(self.rows, (rowno + 1, ()))
        cells = self.current[1] if self.current[0] == rowno else ()
        value = cells[col] if col < len(cells) else None
        text = value if isinstance(value, str) else getattr(value, "text", None)
        return text if isinstance(text, str) and text.startswith("=") else None

    def close(self) -> None:
        self.wb.close()


def _check_formulas(
    view: _FormulaView, cells, rowno: int, columns: dict[str, int], headers: list[str], where: str
) -> None:
    for field, col in columns.items():
        if (cells[col] if col < len(cells) else None) is not None:
            continue
        formula = view.formula(rowno, col)
        if formula is not None:
            shown = formula.splitlines()[0][:40]
            raise RecordError(
                f"{where}: the {headers[col]!r} cell ({field}) is a formula with no cached value "
                f"({shown!r}); formulas are never evaluated: open and save the workbook in Excel "
                f"or LibreOffice so it stores the result, or enter the text without a leading '='",
                reason="formula without cached value",
            )


def iter_sheet(
    path: Path, *, sheet: str | None, mapping: dict[str, str] | None, stem: str
) -> Iterator[list[tuple[Conversation, bool]] | RecordError]:
    """Yield one conversation list (or a RecordError) per non-blank data row of ``sheet``."""
    wb = open_workbook(path)
    view: _FormulaView | None = None
    try:
        if sheet is None:
            ws = wb.worksheets[0]
        elif sheet in wb.sheetnames:
            ws = wb[sheet]
        else:
            names = ", ".join(repr(n) for n in wb.sheetnames)
            raise ConversionError(f"{path}: no sheet named {sheet!r} (sheets: {names})")
        name = ws.title
        columns: dict[str, int] | None = None
        headers: list[str] = []
        index = 0
        for rowno, cells in enumerate(ws.iter_rows(values_only=True), start=1):
            if is_blank(cells):
                continue
            if columns is None:
                headers = [cell_text(c).strip() for c in cells]
                columns = resolve_columns(
                    headers, mapping, where=f"{path}:{name}:row {rowno}: header"
                )
                width = header_width(headers)
                continue
            where = f"{path}:{name}:row {rowno}"
            try:
                if any((cells[i] if i < len(cells) else None) is None for i in columns.values()):
                    view = view or _FormulaView(path, name)
                    _check_formulas(view, cells, rowno, columns, headers, where)
                yield [
                    row_conversation(
                        cells,
                        columns,
                        where=where,
                        source=source_of(path, sheet=name, row=rowno),
                        rid=f"{stem}-{index}",
                        width=width,
                    )
                ]
            except RecordError as e:
                yield e
            index += 1
        if columns is None:
            raise ConversionError(f"{path}:{name}: the sheet is empty (no header row)")
    finally:
        wb.close()
        if view is not None:
            view.close()
