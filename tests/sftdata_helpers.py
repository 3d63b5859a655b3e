"""Small canonical JSONL inputs shared by the sftdata tests."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from sftdata.cli import main

LONG = " ".join(f"word{i}" for i in range(400))


def _rec(i: int, messages: list[dict], *, file: str = "data.jsonl") -> dict:
    return {
        "schema_version": 1,
        "id": f"r{i}",
        "messages": messages,
        "source": {"file": file, "line": i + 1},
    }


def fixture_records() -> list[dict]:
    recs = []
    for i in range(30):
        msgs = [
            {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}." + " Indeed." * (i % 7)},
        ]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "You are terse."})
        if i % 4 == 0:
            msgs += [
                {"role": "user", "content": "And times?"},
                {"role": "assistant", "content": f"{i * i}."},
            ]
        recs.append(_rec(i, msgs))
    # zero trained tokens: every message flagged untrained
    recs.append(
        _rec(
            30,
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "no", "train": False},
            ],
        )
    )
    # longer than the seq-len used below
    recs.append(
        _rec(
            31,
            [{"role": "user", "content": "Tell me a lot."}, {"role": "assistant", "content": LONG}],
        )
    )
    return recs


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def run_cli(*args: object):
    """``sftdata ARGS`` through click's CliRunner (output piped)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def pack_fixture(tmp_path: Path) -> tuple[Path, Path]:
    """The fixture records as JSONL and packed with the tiny tokenizer at seq_len 256."""
    data = write_jsonl(tmp_path / "data.jsonl", fixture_records())
    out = tmp_path / "shards"
    r = run_cli("pack", data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256)
    assert r.exit_code == 0, r.output
    return data, out
