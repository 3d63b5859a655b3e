"""CSV and TSV files (RFC 4180 through the ``csv`` module: quoted fields may hold newlines).

The first non-blank row is the header; CRLF line ends inside quoted fields become ``\n``. A record's source line is the line it starts on, so a
multi-line quoted answer is reported where an editor shows the record.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterator
from pathlib import Path

from sftdata.conversation import Conversation
from sftdata.errors import ConversionError
from sftdata.sources.base import (
    RecordError,
    check_input_file,
    locate_decode_error,
    refuse_binary,
    source_of,
)
from sftdata.sources.table import header_width, is_blank, resolve_columns, row_conversation


def _without_nul(lines: Iterator[str], path: Path) -> Iterator[str]:
    """The file's lines, refusing a NUL character (binary data past the sniffed head; the csv
    module would keep it in a cell)."""
    for lineno, line in enumerate(lines, start=1):
        if "\x00" in line:
            raise ConversionError(
                f"{path}:{lineno}: holds a NUL byte (binary data in a text file?)"
            )
        yield line


def iter_table(
    path: Path,
    *,
    delimiter: str,
    encoding: str,
    mapping: dict[str, str] | None,
    stem: str,
) -> Iterator[list[tuple[Conversation, bool]] | RecordError]:
    """Yield one conversation list (or a RecordError) per non-blank data row."""
    what = "CSV" if delimiter == "," else "TSV"
    head = check_input_file(path)
    refuse_binary(path, head, what)
    # utf-8-sig: Excel writes a BOM in front of UTF-8 CSVs.
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        codecs.lookup(enc)
    except LookupError:
        raise ConversionError(f"--encoding {encoding!r}: unknown encoding") from None
    with path.open(encoding=enc, newline="") as f:
        reader = csv.reader(_without_nul(f, path), delimiter=delimiter, strict=True)
        columns: dict[str, int] | None = None
        index = 0
        last = 0
        try:
            for cells in reader:
                start, last = last + 1, reader.line_num
                if is_blank(cells):
                    continue
                if columns is None:
                    headers = [c.strip() for c in cells]
                    columns = resolve_columns(headers, mapping, where=f"{path}:{start}: header")
                    width = header_width(headers)
                    continue
                where = f"{path}:{start}"
                # Quoted fields keep the file's CRLF line ends; text inside a record uses "\n".
                cells = [c.replace("\r\n", "\n") for c in cells]
                try:
                    yield [
                        row_conversation(
                            cells,
                            columns,
                            where=where,
                            source=source_of(path, line=start),
                            rid=f"{stem}-{index}",
                            width=width,
                        )
                    ]
                except RecordError as e:
                    yield e
                index += 1
        except UnicodeDecodeError:
            raise locate_decode_error(path, enc) from None
        except csv.Error as e:
            # the record that broke starts on the line after the last good one (an unclosed
            # quote runs on to the end of the file, where the reader notices)
            start = last + 1
            ran_on = reader.line_num > start
            raise ConversionError(
                f"{path}:{start}: malformed {what} ({e}"
                + (
                    f"; a quote opened in this record runs on to line {reader.line_num})"
                    if ran_on
                    else ")"
                )
            ) from None
        if columns is None:
            raise ConversionError(f"{path}: has no header row")
