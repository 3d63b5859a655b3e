"""Stream JSON records with line numbers: JSON lines line by line, JSON arrays element by element.

A JSON array is never loaded whole: the file is decoded in chunks and each element is parsed
with ``json.JSONDecoder().raw_decode`` on a buffer from which consumed text is dropped (its
newlines counted, so every element knows the line it starts on). Memory is one chunk plus the
largest element, whatever the file size.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftdata.errors import ConversionError
from sftdata.jsonfile import STRICT_DECODER, check_escapes, invalid_json
from sftdata.sources.base import (
    RecordError,
    check_input_file,
    decode_error,
    iter_text_lines,
    refuse_binary,
)
from sftdata.text import counted

CHUNK_CHARS = 1 << 20
_WS = " \t\n\r"
_DECODER = STRICT_DECODER


def json_kind(path: Path, head: bytes) -> str:
    """``"array"`` when the first non-blank character is ``[``, else ``"lines"``."""
    text = head.lstrip(codecs.BOM_UTF8).lstrip()
    if text[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        text = head[2:].replace(b"\x00", b"").lstrip()
    return "array" if text.startswith(b"[") else "lines"


def iter_json(path: Path, *, encoding: str = "utf-8") -> Iterator[tuple[int, Any] | RecordError]:
    """Yield ``(start line, value)`` per record, or a RecordError for a bad JSON line.

    Raises:
        ConversionError: for a file that cannot be read as JSON at all (missing, empty, binary,
            wrong encoding, a broken array).
    """
    head = check_input_file(path)
    refuse_binary(path, head, "JSON")
    if json_kind(path, head) == "array":
        yield from _iter_array(path, encoding)
    else:
        yield from _iter_lines(path, encoding)


def _iter_lines(path: Path, encoding: str) -> Iterator[tuple[int, Any] | RecordError]:
    for lineno, text in iter_text_lines(path, encoding):
        if not text.strip():
            continue
        try:
            value = STRICT_DECODER.decode(text)
        except RecursionError:
            yield RecordError(
                f"{path}:{lineno}: invalid JSON (nested too deeply)", reason="invalid JSON"
            )
            continue
        except json.JSONDecodeError as e:
            hint = ""
            if lineno == 1 and text.strip() in ("{", "{\n"):
                hint = (
                    "; pretty-printed JSON must be an array [...], JSON lines one record per line"
                )
            yield RecordError(f"{path}:{lineno}: {invalid_json(e)}{hint}", reason="invalid JSON")
            continue
        except ValueError as e:  # STRICT_DECODER's own: NaN, 1e999, a huge integer, a duplicate key
            yield RecordError(f"{path}:{lineno}: invalid JSON ({e})", reason="invalid JSON")
            continue
        try:
            check_escapes(text, value)
        except ValueError as e:
            yield RecordError(f"{path}:{lineno}: {e}", reason="not text")
            continue
        yield lineno, value


class _ArrayReader:
    """A growing text buffer over a file, with the line number of the buffer's first character."""

    def __init__(self, path: Path, encoding: str) -> None:
        self.path = path
        self.encoding = encoding
        self.f = path.open("rb")
        self.decoder = codecs.getincrementaldecoder(encoding)()
        self.buf = ""
        self.pos = 0
        self.line = 1  # line of buf[0]
        self._mark = (0, 1)  # (pos, line at pos): line numbers are counted incrementally
        self.eof = False
        self.first = True

    def close(self) -> None:
        self.f.close()

    def line_at(self, pos: int) -> int:
        mark, line = self._mark
        if pos < mark:
            mark, line = 0, self.line
        line += self.buf.count("\n", mark, pos)
        self._mark = (pos, line)
        return line

    def read_more(self) -> bool:
        """Drop consumed text, append the next chunk; False at end of file."""
        if self.eof:
            return False
        if self.pos:
            self.line = self.line_at(self.pos)
            self.buf = self.buf[self.pos :]
            self.pos = 0
            self._mark = (0, self.line)
        raw = self.f.read(CHUNK_CHARS)
        try:
            text = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            line = self.line + self.buf.count("\n") + raw.count(b"\n", 0, e.start)
            raise decode_error(self.path, line, e, self.encoding) from None
        if self.first:
            text = text.lstrip("\ufeff")
            self.first = False
        self.buf += text
        if not raw:
            self.eof = True
        return True

    def peek(self) -> str:
        """Next non-whitespace character (advancing past whitespace), "" at end of file."""
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < n:
                return self.buf[self.pos]
            if not self.read_more():
                return ""

    def error(self, msg: str, pos: int | None = None) -> ConversionError:
        line = self.line_at(self.pos if pos is None else pos)
        return ConversionError(f"{self.path}:{line}: invalid JSON ({msg})")

    def decode(self) -> tuple[int, Any]:
        """Decode the value at the cursor, reading more when it runs past the buffer."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise self.error("nested too deeply") from None
            except json.JSONDecodeError as e:
                # An element cut by the chunk boundary fails at (or, for a string, starts near)
                # the buffer's end: read on and retry. Anything else is a genuine error.
                cut = e.pos >= len(self.buf) - 8 or e.msg.startswith("Unterminated string")
                if cut and self.read_more():
                    continue
                if self.eof and cut:
                    raise self.error(
                        f"file ends inside the record that starts here, truncated? ({e.msg})"
                    ) from None
                raise self.error(e.msg, e.pos) from None
            except (
                ValueError
            ) as e:  # STRICT_DECODER's own (NaN, 1e999, huge integer, duplicate key)
                raise self.error(str(e)) from None
            if end >= len(self.buf) and not self.eof and self.read_more():
                continue  # a number or literal may go on in the next chunk
            start = self.line_at(self.pos)
            try:
                check_escapes(self.buf[self.pos : end], value)
            except ValueError as e:
                raise ConversionError(f"{self.path}:{start}: the record {e}") from None
            self.pos = end
            return start, value


def _iter_array(path: Path, encoding: str) -> Iterator[tuple[int, Any] | RecordError]:
    r = _ArrayReader(path, encoding)
    try:
        if r.peek() != "[":
            raise r.error("expected '['")
        r.pos += 1
        count = 0
        if r.peek() == "]":
            raise ConversionError(
                f"{path}:{r.line_at(r.pos)}: the JSON array is empty (no records)"
            )
        while True:
            ch = r.peek()
            if ch == "":
                raise r.error("file ends inside the array: expected a record or ']', truncated?")
            yield r.decode()
            count += 1
            end_line = r.line_at(r.pos)
            ch = r.peek()
            if ch == ",":
                comma_line = r.line_at(r.pos)
                r.pos += 1
                if r.peek() == "]":
                    raise ConversionError(
                        f"{path}:{comma_line}: invalid JSON (trailing comma before ']')"
                    )
                continue
            if ch == "]":
                r.pos += 1
                break
            if ch == "":
                raise ConversionError(
                    f"{path}:{end_line}: invalid JSON (file ends inside the array after "
                    f"{counted(count, 'record')}: no closing ']', truncated?)"
                )
            raise r.error(f"expected ',' or ']' after a record, found {ch!r}")
        if r.peek() != "":
            raise r.error("extra data after the closing ']'")
    finally:
        r.close()


def first_value(path: Path, *, encoding: str = "utf-8", scan: int = 1000) -> tuple[int, Any]:
    """The first record that is a JSON object (for format detection), looking past bad lines.

    Bad records before it are reported later by the conversion itself (and may be skipped); if
    none of the first ``scan`` records is an object, the first one (or its error) is returned.
    """
    first: tuple[int, Any] | RecordError | None = None
    for n, item in enumerate(iter_json(path, encoding=encoding)):
        if not isinstance(item, RecordError) and isinstance(item[1], dict):
            return item
        first = first or item
        if n + 1 >= scan:
            break
    if isinstance(first, RecordError):
        raise first
    if first is None:
        raise ConversionError(f"{path}: contains no records")
    return first


__all__ = ["first_value", "iter_json", "json_kind"]
