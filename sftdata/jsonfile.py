"""Reading a JSON file someone handed us: every way it can be wrong is one line naming the file.

``json.loads`` raises ``RecursionError`` (not a ValueError) for deep nesting, and
``read_text`` raises ``UnicodeDecodeError``; callers that caught ``ValueError`` alone printed a
traceback for ``[[[[…`` in an index or config file. This is the one place that maps them all.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from sftdata import SCHEMAS_DIR
from sftdata.conversation import json_problem, loads_strict
from sftdata.errors import SftError


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
