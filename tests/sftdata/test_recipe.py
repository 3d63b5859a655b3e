"""Data sections (``sftdata.recipe``): parsing with errors that name the key, mixing by weight and
max_samples, and preparation that equals the two-step ``convert && pack`` path and is cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftdata.convert import convert
from sftdata.errors import ConfigError
from sftdata.pack import PackOptions, pack
from sftdata.recipe import DataInput, mix, mix_counts, parse_data_section, prepare
from sftdata.shards import read_index
from tests.sftdata_helpers import fixture_records, write_jsonl


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"inputs": [{"path": "IN", "weight": 0}]}, "data.inputs[0].weight"),
        ({"inputs": [{"path": "IN", "weight": -1.5}]}, "data.inputs[0].weight"),
        ({"inputs": ["IN", {"path": "nowhere.json"}]}, "data.inputs[1].path"),
        ({"inputs": [{"path": "IN", "from": "yaml"}]}, "data.inputs[0].from"),
        ({"inputs": [{"path": "IN", "max_samples": 0}]}, "data.inputs[0].max_samples"),
        ({"inputs": [{"path": "IN", "colour": 1}]}, "data.inputs[0].colour"),
        ({"inputs": [{"dataset": "alpaca_en_demo"}]}, "data.dataset_info"),
        ({"inputs": ["IN"], "seq_lenn": 512}, "data.seq_lenn"),
        ({"inputs": ["IN"], "overflow": "wrap"}, "data.overflow"),
        ({"inputs": ["IN"], "special_text": "escape"}, "data.special_text"),
        ({"inputs": ["IN"], "missing_stop": "eos"}, "data.missing_stop"),
        ({"inputs": ["IN"], "seq_len": "long"}, "data.seq_len"),
        ({"inputs": []}, "data.inputs"),
        ({"inputs": [{"path": "IN", "dataset": "x"}]}, "data.inputs[0]"),
    ],
)
def test_a_bad_section_is_one_error_naming_the_key(tmp_path: Path, section: dict, key: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", fixture_records())
    text = json.dumps(section).replace('"IN"', json.dumps(str(src)))
    with pytest.raises(ConfigError) as e:
        parse_data_section(json.loads(text))
    assert str(e.value).startswith(f"{key}:") and "\n" not in str(e.value)


def test_a_section_reads_paths_datasets_and_options(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", fixture_records())
    s = parse_data_section(
        {
            "inputs": [str(src), {"path": str(src), "weight": 2, "map": "q=instruction"}],
            "seq_len": 512,
            "overflow": "truncate",
            "val_fraction": 0.1,
            "special_text": "split",
            "missing_stop": "allow",
        }
    )
    opts = s.pack_options("tiny")
    assert (opts.special_text, opts.missing_stop) == ("split", "allow")
    assert s.inputs[0] == DataInput(path=str(src))
    assert s.inputs[1].weight == 2.0 and s.inputs[1].map == {"q": "instruction"}
    assert (opts.seq_len, opts.overflow, opts.val_fraction) == (512, "truncate", 0.1)
    assert opts.train_on == "all-assistant"  # not given: PackOptions' default


def test_mix_counts() -> None:
    assert mix_counts(10, 1.0, None) == (10, 10)
    assert mix_counts(10, 2.0, None) == (10, 20)
    assert mix_counts(10, 0.5, None) == (10, 5)
    assert mix_counts(10, 1.5, 4) == (4, 6)
    assert mix_counts(3, 1.0, 100) == (3, 3)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_mix_repeats_samples_and_keeps_ids_unique(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    convert([write_jsonl(tmp_path / "raw.jsonl", fixture_records())], a, skip_invalid=True)
    n = len(a.read_text().splitlines())
    out = tmp_path / "mix.jsonl"
    inputs = (DataInput(path="a", weight=2.0), DataInput(path="a", weight=0.5, max_samples=10))
    taken = mix([a, a], inputs, out, default_max=None, seed=3)
    assert taken == [2 * n, 5]
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == 2 * n + 5
    first = _ids(a)
    assert ids[:n] == first and ids[n : 2 * n] == [f"{i}#2" for i in first]
    sampled = ids[2 * n :]  # the same records as the first copy, renamed apart
    assert all(s.rstrip("'") in first[:10] for s in sampled)
    again = tmp_path / "again.jsonl"
    mix([a, a], inputs, again, default_max=None, seed=3)
    assert again.read_bytes() == out.read_bytes()  # seeded
    mix([a, a], inputs, again, default_max=None, seed=4)
    assert _ids(again)[2 * n :] != sampled or n <= 5


def test_prepare_equals_the_two_step_path_and_is_cached(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "alpaca_en_demo.json"
    section = parse_data_section(
        {"inputs": [str(src)], "seq_len": 512, "cache_dir": str(tmp_path / "work"),
         "val_count": 20, "overflow": "truncate"}
    )  # fmt: skip
    got = prepare(section, model_spec="tiny")
    assert got.pack is not None and not got.pack.noop and not got.repacked
    convert([src], tmp_path / "data.jsonl")
    opts = PackOptions(seq_len=512, tokenizer="tiny", val_count=20, overflow="truncate")
    pack([tmp_path / "data.jsonl"], tmp_path / "two-step", opts)
    mine, theirs = read_index(got.shards), read_index(tmp_path / "two-step")
    assert mine["fingerprint"] == theirs["fingerprint"]
    assert [s["sha256"] for s in mine["splits"]["train"]["shards"]] == [
        s["sha256"] for s in theirs["splits"]["train"]["shards"]
    ]
    again = prepare(section, model_spec="tiny")
    assert again.pack is not None and again.pack.noop and not again.repacked


def test_two_real_files_mixed_by_weight_and_a_change_repacks(
    tmp_path: Path, shared_data: Path
) -> None:
    section = {
        "inputs": [
            {"path": str(shared_data / "alpaca_en_demo.json"), "max_samples": 100},
            {"path": str(shared_data / "alpaca_zh_demo.json"), "weight": 0.5, "max_samples": 100},
        ],
        "seq_len": 1024,
        "cache_dir": str(tmp_path / "work"),
    }
    got = prepare(parse_data_section(section), model_spec="tiny")
    assert got.mixed == [100, 50]
    assert got.pack is not None and got.pack.records_in == 150
    section["inputs"][1]["weight"] = 1.0
    changed = prepare(parse_data_section(section), model_spec="tiny")
    assert changed.repacked and changed.mixed == [100, 100]
    assert changed.pack is not None and changed.pack.records_in == 200


def test_a_registry_dataset_is_an_input(tmp_path: Path, shared_data: Path) -> None:
    section = parse_data_section(
        {"inputs": [{"dataset": "identity"}], "dataset_info": str(shared_data),
         "seq_len": 512, "cache_dir": str(tmp_path / "work")}
    )  # fmt: skip
    got = prepare(section, model_spec="tiny")
    n = len(json.loads((shared_data / "identity.json").read_text(encoding="utf-8")))
    assert got.mixed == [n] and got.converted[0].records_out == n
