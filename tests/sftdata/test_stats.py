"""`sftdata stats` on shards and on JSONL, and the packing estimate it prints."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sftdata.stats import packing_estimate
from tests.sftdata_helpers import fixture_records, pack_fixture, run_cli, write_jsonl


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, Path]:
    return pack_fixture(tmp_path)


def test_stats_on_shards_and_plot(packed: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = packed
    png = tmp_path / "hist.png"
    r = run_cli("stats", out, "--plot", png)
    assert r.exit_code == 0, r.output
    assert "records 30;" in r.output
    m = re.search(
        r"tokens per record: min (\d+), median (\d+), p90 (\d+), p99 (\d+), max (\d+)", r.output
    )
    assert m and int(m[1]) <= int(m[2]) <= int(m[3]) <= int(m[4]) <= int(m[5]) <= 256
    assert re.search(r"trained ratio \d+\.\d%", r.output)
    assert "packing efficiency" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".hist.png.*"))


def test_stats_on_jsonl_counts_and_estimates_packing(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    data, _ = packed
    r = run_cli(
        "stats", data, "--tokenizer", "tiny", "--seq-len", 256, "--plot", tmp_path / "j.png"
    )
    assert r.exit_code == 0, r.output
    assert "records 32;" in r.output  # JSONL stats see every record, even ones pack drops
    assert "1 record longer than seq_len left out" in r.output
    assert (tmp_path / "j.png").is_file()
    r = run_cli("stats", data)
    assert r.exit_code == 1 and "--tokenizer is needed" in r.output


def test_packing_estimate_leaves_out_what_does_not_fit() -> None:
    # 9 > seq_len is left out; 5 | 3+3 fill two rows of 6 with 11 tokens.
    eff, rows, left_out = packing_estimate(np.array([3, 3, 5, 9]), 6)
    assert (rows, left_out) == (2, 1)
    assert eff == pytest.approx(11 / 12)


def test_stats_json_on_jsonl(tmp_path: Path) -> None:
    import json

    data = write_jsonl(tmp_path / "d.jsonl", fixture_records())
    r = run_cli("stats", data, "--tokenizer", "tiny", "--seq-len", 256, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["records"] == 32 and d["seq_len"] == 256 and d["left_out"] >= 1
    assert 0 < d["packing_efficiency"] <= 1 and d["min"] <= d["median"] <= d["max"]


def test_pack_and_stats_give_the_same_percentiles_for_the_same_records(tmp_path: Path) -> None:
    """Nothing dropped or cut: pack's summary and stats of its shards read the same lengths the
    same way (a length some record has), so their p50/p90/p99/max agree."""
    import json

    from tests.sftdata_helpers import fixture_records, write_jsonl

    data = write_jsonl(tmp_path / "data.jsonl", fixture_records())
    out = tmp_path / "shards"
    assert run_cli("pack", data, "-o", out, "--tokenizer", "tiny", "--seq-len", 2048).exit_code == 0
    index = json.loads((out / "index.json").read_text())
    # (a record with no trained token is in neither: pack counts samples it trains)
    assert index["counts"]["dropped"]["overflow"] == index["counts"]["truncated"] == 0
    r = run_cli("stats", out, "--json")
    s = json.loads(r.stdout)
    p = index["counts"]["lengths"]
    assert (s["median"], s["p90"], s["p99"], s["max"]) == (p["p50"], p["p90"], p["p99"], p["max"])


def test_a_chinese_file_name_in_the_plot_title_is_never_drawn_as_boxes(tmp_path: Path) -> None:
    """The title's characters are drawn by the default font or an installed CJK font; one that
    no font here has is written as its escape, so matplotlib never draws a box for it."""
    import warnings

    from sftdata.stats import drawable, write_histogram

    families, text = drawable("问答 café — 999 records")
    assert families[0] == "DejaVu Sans" and "café — 999 records" in text  # kept as written
    # with a CJK font installed it draws them; without one, their escapes stand in
    assert ("问答" in text) if len(families) > 1 else ("\\u95ee\\u7b54" in text)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        write_histogram(np.array([3, 5, 8]), tmp_path / "h.png", title="问答.xlsx: 3 records",
                        seq_len=None)  # fmt: skip
    assert not [w for w in seen if "missing from font" in str(w.message)]
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_stats_of_jsonl_renders_under_the_same_os_bounds_as_pack(tmp_path: Path) -> None:
    """stats renders and tokenizes in pack's bounded worker: a record whose template escapes
    every count is named with the bound it went past, not a hang."""
    from tests.sftdata.pack.test_workers import SLOW, _records, bounded_cli

    (tmp_path / "slow.jinja").write_text(SLOW, encoding="utf-8")
    data = tmp_path / "slow.jsonl"
    _records(data, "slow")
    r = bounded_cli("stats", data, "--tokenizer", "tiny", "--template", tmp_path / "slow.jinja")
    assert r.returncode == 1, r.stderr
    assert re.search(r"slow\.jsonl:3: record 'r2': .*more than 1 CPU seconds", r.stderr), r.stderr
