"""The pack summary (``sftdata.pack.report``): overlong records are never dropped quietly, counts
read back from ``index.json``, plurals, and ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from sftdata.cli import main
from sftdata.pack import PackReport
from sftdata.shards import read_index
from tests.sftdata_helpers import fixture_records, write_jsonl


def _pack(*args: object):
    return CliRunner().invoke(main, ["pack", *map(str, args)])


def test_dropped_overlong_records_are_shown_with_their_share_and_a_fix(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", fixture_records())
    r = _pack(data, "-o", tmp_path / "s", "--tokenizer", "tiny", "--seq-len", 256)
    assert r.exit_code == 0, r.output
    c = read_index(tmp_path / "s")["counts"]
    assert c["dropped"]["overflow"] == 1 and c["dropped_tokens"]["overflow"] > 256
    p = c["lengths"]
    assert p["p50"] <= p["p90"] <= p["p99"] <= p["max"] and p["max"] > 256
    # the share of records and of tokens in the summary; the warning (1 of 32 > 1%) on stderr
    assert "1 longer than --seq-len (3.1% of records, " in r.stderr  # stdout is data only
    (warning,) = [x for x in r.stderr.splitlines() if x.startswith("Warning:")]
    assert "--overflow truncate" in warning and f"--seq-len {p['p99']:,}" in warning
    assert "record lengths before any cut: median" in r.stderr and r.stdout == ""


def test_truncation_is_counted_and_does_not_warn(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", fixture_records())
    r = _pack(data, "-o", tmp_path / "s", "--tokenizer", "tiny", "--seq-len", 256,
              "--overflow", "truncate")  # fmt: skip
    assert r.exit_code == 0, r.output
    c = read_index(tmp_path / "s")["counts"]
    assert c["truncated"] == 1 and c["truncated_tokens"] == c["lengths"]["max"] - 256
    assert "Warning" not in r.stderr and "truncated 1 (3.1% of records" in r.stderr


def test_json_report_and_max_samples(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", fixture_records())
    r = _pack(data, "-o", tmp_path / "s", "--tokenizer", "tiny", "--seq-len", 512,
              "--max-samples", 5, "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["records_in"] == 5 and d["output"] == str(tmp_path / "s") and not d["noop"]
    index = read_index(tmp_path / "s")
    assert index["options"]["max_samples"] == 5
    rep = PackReport.from_index(tmp_path / "s", index, noop=True, seconds=0.0)
    assert rep.records_in == 5 and rep.summary_lines()[0].endswith("records)")


def test_plurals() -> None:
    one = PackReport(Path("s"), noop=False, records=1, rows=1, records_in=1, seq_len=64)
    assert one.summary_lines()[0].startswith("packed 1 record into 1 row of 64")
