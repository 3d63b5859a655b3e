"""`sfttrain eval`: packed and unpacked shards of the same records give the same loss."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from sfttrain.cli import main
from sfttrain.config import build_config
from sfttrain.train import train
from tests.sfttrain_helpers import demo_shards, metrics, small_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return small_model_dir(tmp_path_factory.mktemp("model"), seed=3)


def _eval(*args: str) -> dict:
    r = CliRunner().invoke(main, ["eval", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_and_unpacked_shards_give_the_same_loss(model_dir, tmp_path, impl) -> None:
    packed = demo_shards(tmp_path / "p", seq_len=128, limit=60)
    unpacked = demo_shards(tmp_path / "u", seq_len=128, limit=60, packed=False)
    assert json.loads((packed / "index.json").read_text())["counts"]["rows"] < 60  # really packed
    a = _eval(str(packed), "--model", str(model_dir), "--attn-implementation", impl)
    b = _eval(
        str(unpacked), "--model", str(model_dir), "--attn-implementation", impl, "--batch-size", "7"
    )
    assert a["split"] == b["split"] == "train"
    assert a["tokens"] == b["tokens"] > 0
    assert abs(a["loss"] - b["loss"]) <= 1e-5
    assert a["perplexity"] == pytest.approx(math.exp(a["loss"]))


def test_eval_of_a_trained_adapter_matches_the_runs_eval_loss(model_dir, tmp_path) -> None:
    shards = demo_shards(tmp_path / "d", seq_len=64, limit=80, val_count=12)
    cfg = build_config({"max_steps": 3, "learning_rate": 1e-2, "report_to": "none"})
    train(
        cfg, shards=shards, output_dir=tmp_path / "run", model_spec=str(model_dir), progress=False
    )
    logged = [r for r in metrics(tmp_path / "run") if "eval_loss" in r][-1]
    got = _eval(
        str(shards), "--model", str(tmp_path / "run" / "final")
    )  # adapter folder: base from its config
    assert got["split"] == "validation" and got["tokens"] == logged["eval_tokens"]
    assert got["loss"] == pytest.approx(logged["eval_loss"], abs=1e-6)
    same = _eval(
        str(shards), "--model", str(model_dir), "--adapter", str(tmp_path / "run" / "final")
    )
    assert same["loss"] == pytest.approx(got["loss"], abs=1e-6)
    base = _eval(str(shards), "--model", str(model_dir))
    assert base["loss"] != pytest.approx(got["loss"], abs=1e-4)


def test_eval_refuses_bad_input(model_dir, tmp_path) -> None:
    r = CliRunner().invoke(main, ["eval", str(tmp_path), "--model", str(model_dir)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "index.json" in r.output
