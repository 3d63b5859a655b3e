"""JSON someone handed us: the strict decoder every JSON text goes through (NaN/Infinity,
non-finite numbers, integers past 64 bits, duplicate keys, NUL and lone surrogates refused), and
reading a JSON file, where every way it can be wrong is one line naming the file.

``json.loads`` raises ``RecursionError`` (not a ValueError) for deep nesting, and
``read_text`` raises ``UnicodeDecodeError``; callers that caught ``ValueError`` alone printed a
traceback for ``[[[[…`` in an index or config file. This is the one place that maps them all.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path
from typing import Any

from sftdata import SCHEMAS_DIR
from sftdata.errors import SftError

# ----------------------------------------------------------------------------- strict decoding


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
"""A JSON escape that can decode to a NUL or a surrogate: only then are the strings walked."""


def text_problem(value: Any) -> str | None:
    """What makes the strings in a parsed JSON value unusable as text, or None: a NUL
    character, or a lone surrogate (``"\\ud800"`` is valid JSON but not Unicode text: it
    cannot be written as UTF-8 or tokenized)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return "holds a NUL character (\\u0000)"
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"holds a lone surrogate \\u{ord(v[e.start]):04x}, which is not Unicode text"
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def check_escapes(text: str, value: Any) -> None:
    """Raise ValueError naming :func:`text_problem` where ``text`` (the JSON ``value`` was
    parsed from) has an escape that could hide one (a cheap test on the raw text first)."""
    if _SUSPECT_ESCAPE.search(text):
        problem = text_problem(value)
        if problem:
            raise ValueError(problem)


INT_BITS = 64
"""Integers in JSON input must fit in a signed 64-bit integer (what every consumer of the data,
Arrow and MindRecord included, can hold); larger ones are refused, not silently widened."""
_INT_LIMIT = 1 << (INT_BITS - 1)


def _int64(text: str) -> int:
    # the length test first: int() of a 5,000-digit string is itself an error (CPython's limit)
    n = int(text) if len(text) <= 21 else None
    if n is None or not -_INT_LIMIT <= n < _INT_LIMIT:
        shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} digits)"
        raise ValueError(f"the integer {shown} does not fit in {INT_BITS} bits")
    return n


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999 is valid JSON syntax but no finite number
        raise ValueError(f"{text[:24]} is not a finite number")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # a second value for a key would silently win
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r} in an object")
            seen.add(key)
    return obj


STRICT_DECODER = json.JSONDecoder(
    parse_constant=_not_json, parse_float=_finite, parse_int=_int64, object_pairs_hook=_unique
)
"""The decoder of every JSON text a user hands us (canonical JSONL, raw JSON inputs, our own
files): NaN/Infinity, non-finite numbers (``1e999``), integers past 64 bits and duplicate keys
are errors (ValueError), not values. One instance: ``json.loads`` with options builds a decoder
per call."""
_STRICT = STRICT_DECODER


def loads_strict(text: str) -> Any:
    """``json.loads`` for canonical JSONL, by :data:`STRICT_DECODER` (NaN/Infinity, non-finite
    numbers, integers past 64 bits and duplicate keys refused).

    Raises:
        ValueError: the problem in words (json.JSONDecodeError, a ValueError, for bad syntax;
            RecursionError is reported as nesting too deep).
    """
    try:
        if text.startswith("\ufeff"):  # json.loads's own message for a BOM
            return json.loads(text)
        value = _STRICT.decode(text)
        check_escapes(text, value)
        return value
    except RecursionError:
        raise ValueError("nested too deeply") from None


def json_problem(e: ValueError) -> str:
    """What :func:`loads_strict` found wrong, without position (callers add their own place)."""
    return e.msg if isinstance(e, json.JSONDecodeError) else str(e)


def invalid_json(e: ValueError) -> str:
    """``loads_strict``'s error as the words after ``FILE:LINE: ``: the column, and where the
    line ends inside a value or a string, that it is cut short (a truncated file or line)."""
    if not isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e})"
    # json's own words end in "starting at" for an open string: the column completes them
    msg = e.msg.removesuffix(" at")
    if not e.doc[e.pos :].strip() or msg.startswith("Unterminated string"):
        return f"invalid JSON (the line ends inside a record, truncated? {msg} at column {e.colno})"
    return f"invalid JSON ({msg} at column {e.colno})"


# ----------------------------------------------------------------------------- files


def read_json(
    path: str | Path, *, error: type[SftError], strict: bool = True, what: str = ""
) -> Any:
    """The parsed content of ``path``.

    Args:
        error: the error class raised (the caller's part of the error tree).
        strict: refuse NaN/Infinity (our own formats); third-party configs may carry them.
        what: what the file is, for the message ("adapter config").

    Raises:
        error: missing, unreadable, not UTF-8, invalid JSON or nested too deeply, naming the file
            (and the line for syntax errors).
    """
    from sftdata.inputs import read_small

    path = Path(path)
    label = f" ({what})" if what else ""
    text = read_small(path, error=error, what=what)
    try:
        if strict:
            return loads_strict(text)
        return json.loads(text)
    except RecursionError:
        raise error(f"{path}: invalid JSON (nested too deeply){label}") from None
    except ValueError as e:
        line = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise error(f"{path}{line}: invalid JSON ({json_problem(e)}){label}") from None


def read_json_object(
    path: str | Path, *, error: type[SftError], strict: bool = True, what: str = ""
) -> dict[str, Any]:
    """:func:`read_json` for a file that must hold one JSON object."""
    value = read_json(path, error=error, strict=strict, what=what)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object{f' ({what})' if what else ''}")
    return value


@cache
def load_schema(name: str) -> Any:
    """The validator of one of our file formats' JSON Schemas (``sftdata/schemas/NAME.json``,
    e.g. ``shard_index.v1``), compiled once per process."""
    import jsonschema

    path = SCHEMAS_DIR / f"{name}.json"
    return jsonschema.Draft202012Validator(json.loads(path.read_text(encoding="utf-8")))


def schema_problem(value: Any, name: str) -> str | None:
    """``"where/in/value: what is wrong"`` for the most relevant error of ``value`` against the
    schema ``name``, or None when it is valid."""
    import jsonschema

    err = jsonschema.exceptions.best_match(load_schema(name).iter_errors(value))
    if err is None:
        return None
    at = "/".join(str(p) for p in err.absolute_path) or "(top level)"
    return f"{at}: {err.message}"
