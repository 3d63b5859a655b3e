"""Excel workbooks, row by row in openpyxl's read-only mode.

``data_only=True`` returns the value Excel cached for a formula cell; formulas are never
evaluated (a formula cell without a cached value reads as empty). Blank rows are skipped. The
first non-blank row of the sheet is the header; a record's source is the sheet and Excel row.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

from sftdata.conversation import Conversation
from sftdata.errors import ConversionError, RecordError
from sftdata.sources.base import cell_text, check_input_file, source_of
from sftdata.sources.table import header_width, is_blank, resolve_columns, row_conversation

MAX_MB_ENV = "SFTPIPE_MAX_XLSX_MB"
DEFAULT_MAX_MB = 512
"""Most a workbook may inflate to (all its parts), unless ``SFTPIPE_MAX_XLSX_MB`` says more:
openpyxl parses the inflated XML, at several times its size in memory."""
MAX_RATIO = 500
"""Most a part over 10 MiB may inflate per compressed byte: real sheet XML stays far below (it
repeats markup, not megabytes of one byte); a zip bomb is near 1000."""


def check_archive(path: Path) -> None:
    """Refuse a workbook whose parts inflate past the bounds, or whose XML declares a DOCTYPE
    (entity declarations: expansion bombs, external entities), before anything parses it.

    Raises:
        ConversionError: naming the file, the part and the bound.
    """
    raw = os.environ.get(MAX_MB_ENV, "")
    try:
        max_mb = int(raw) if raw.strip() else DEFAULT_MAX_MB
    except ValueError:
        raise ConversionError(f"{MAX_MB_ENV}={raw!r} is not a whole number of megabytes") from None
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            total = sum(i.file_size for i in infos)
            if total > max_mb << 20:
                raise ConversionError(
                    f"{path}: the workbook inflates to {total / (1 << 20):,.1f} MB, more than "
                    f"{max_mb:,} MB (set {MAX_MB_ENV} to allow more)"
                )
            for i in infos:
                if i.file_size > 10 << 20 and i.file_size > MAX_RATIO * max(i.compress_size, 1):
                    raise ConversionError(
                        f"{path}: part {i.filename} inflates {i.file_size // max(i.compress_size, 1):,}"
                        f" times ({i.file_size >> 20:,} MB), more than {MAX_RATIO} (a zip bomb?)"
                    )
                if i.filename.endswith((".xml", ".rels")):
                    with z.open(i) as f:
                        prolog = f.read(1 << 16)
                    root = re.search(rb"<[A-Za-z_]", prolog)
                    if b"<!DOCTYPE" in prolog[: root.start() if root else None]:
                        raise ConversionError(
                            f"{path}: part {i.filename} declares a DOCTYPE (entity declarations "
                            "are refused; Excel never writes one)"
                        )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise ConversionError(f"{path}: cannot open as an .xlsx workbook ({e})") from None


def open_workbook(path: Path):
    """Open read-only with cached values; a file that is not a workbook is a one-line error."""
    import openpyxl

    head = check_input_file(path)
    if not head.startswith(b"PK"):
        raise ConversionError(f"{path}: not an Excel .xlsx workbook (no zip signature)")
    check_archive(path)
    try:
        return openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, SyntaxError) as e:
        # SyntaxError: xml.etree's ParseError for malformed XML inside the archive
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


EXCEL_MAX_ROWS = 1_048_576
"""Excel's last row: openpyxl yields an empty row for every number skipped, so a 3 KB sheet
whose one row is numbered 999,999,999 would be read for ever; past this it is refused."""


def _rows(ws, where: str) -> Iterator[tuple[int, tuple]]:
    """``(Excel row, cells)``; what openpyxl raises while it parses lazily is one line."""
    rows = enumerate(ws.iter_rows(values_only=True), start=1)
    while True:
        try:
            item = next(rows)
        except StopIteration:
            return
        except (
            SyntaxError,
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            EOFError,
            zipfile.BadZipFile,
        ) as e:  # fmt: skip - IndexError: a shared-string index past the table
            raise ConversionError(
                f"{where}: cannot read the sheet ({type(e).__name__}: {e})"
            ) from None
        if item[0] > EXCEL_MAX_ROWS:
            raise ConversionError(
                f"{where}: a row numbered past {EXCEL_MAX_ROWS:,}, Excel's last row (not a "
                "workbook a spreadsheet program wrote)"
            )
        yield item


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
            names = ", ".join(repr(n[:40]) for n in wb.sheetnames[:10])
            more = f", ... ({len(wb.sheetnames):,} in all)" if len(wb.sheetnames) > 10 else ""
            raise ConversionError(f"{path}: no sheet named {sheet!r} (sheets: {names}{more})")
        name = ws.title
        columns: dict[str, int] | None = None
        headers: list[str] = []
        index = 0
        for rowno, cells in _rows(ws, f"{path}:{name}"):
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
