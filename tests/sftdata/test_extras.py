"""Optional extras: `pip install sftpipe` is the data half; a path that needs an extra stops in
one line naming it (`pip install 'sftpipe[EXTRA]'`), before it reads or writes anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import sftdata.extras as extras
from sftdata.errors import ConfigError
from tests.sftdata_helpers import pack_fixture, run_cli


def test_missing_names_the_modules_an_extra_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(extras.EXTRAS, "plot", ("json", "no_such_module_xyz"))
    assert extras.missing("plot") == ["no_such_module_xyz"]
    with pytest.raises(ConfigError) as e:
        extras.require("plot", "--plot")
    assert str(e.value) == (
        "--plot needs the 'plot' extra (no_such_module_xyz missing): pip install 'sftpipe[plot]'"
    )
    monkeypatch.setitem(extras.EXTRAS, "plot", ("json",))
    extras.require("plot", "--plot")  # present: nothing raised


def _without(monkeypatch: pytest.MonkeyPatch, extra: str) -> None:
    real = extras.missing
    monkeypatch.setattr(
        extras, "missing", lambda e: list(extras.EXTRAS[e]) if e == extra else real(e)
    )


def test_data_paths_name_their_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, shards = pack_fixture(tmp_path)
    _without(monkeypatch, "plot")
    r = run_cli("stats", shards, "--plot", tmp_path / "x.png")
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "Error: --plot needs the 'plot' extra (matplotlib missing): pip install 'sftpipe[plot]'"
    ]
    assert not (tmp_path / "x.png").exists()
    _without(monkeypatch, "fastchat")
    r = run_cli(
        "pack", data, "-o", tmp_path / "s", "--tokenizer", "tiny", "--seq-len", 64,
        "--template", "fastchat:vicuna_v1.1",
    )  # fmt: skip
    assert r.exit_code == 1 and "pip install 'sftpipe[fastchat]'" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_a_saved_dataset_is_read_without_the_datasets_package(tmp_path: Path) -> None:
    """A ``save_to_disk`` folder is read by our own reader of its checked Arrow files: the slim
    install converts it with no ``datasets`` (never imported)."""
    import subprocess
    import sys

    datasets = pytest.importorskip("datasets", reason="the test extra installs datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"instruction": "q", "output": "a"}]).save_to_disk(str(saved))
    script = (
        "import sys; from click.testing import CliRunner; from sftdata.cli import main; "
        f"r = CliRunner().invoke(main, ['convert', {str(saved)!r}, '-o', {str(tmp_path / 'o.jsonl')!r}]); "
        "print(r.exit_code, 'datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.split() == ["0", "False"], out.stdout + out.stderr


def test_sfttrain_without_the_train_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfttrain.cli import main

    _without(monkeypatch, "train")
    for args in (["run", "shards", "--model", "tiny"], ["export", "x", "-o", "y"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1
        assert r.output == (
            f"Error: sfttrain {args[0]} needs the 'train' extra (torch, peft, safetensors, "
            "matplotlib, gguf missing): pip install 'sftpipe[train]'\n"
        )
    # the help pages still show
    assert CliRunner().invoke(main, ["run", "--help"]).exit_code == 0
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0


def test_the_data_half_never_imports_torch(tmp_path: Path) -> None:
    """convert, validate, pack (tokenizer snapshot cached), inspect, stats and export run in one
    process of the full install without importing torch (the slim install has none:
    .ci/slim_smoke.sh)."""
    import os
    import subprocess
    import sys

    from tests.conftest import FIXTURES

    script = f"""
import sys
from click.testing import CliRunner
from sftdata.cli import main
run = lambda *a: CliRunner().invoke(main, [str(x) for x in a], catch_exceptions=False)
d = {str(tmp_path)!r}
for args in (
    ("convert", {str(FIXTURES / "demo" / "qa.csv")!r}, "-o", d + "/qa.jsonl",
     "--map", "question=instruction,answer=output"),
    ("validate", d + "/qa.jsonl", "--tokenizer", "tiny"),
    ("pack", d + "/qa.jsonl", "-o", d + "/shards", "--tokenizer", "tiny", "--seq-len", "256"),
    ("inspect", d + "/shards"),
    ("stats", d + "/shards"),
    ("export", d + "/qa.jsonl", "--format", "alpaca", "-o", d + "/qa_alpaca.json"),
):
    assert run(*args).exit_code == 0, args
print("torch" in sys.modules)
"""
    env = {**os.environ, "SFTPIPE_CACHE": str(tmp_path / "cache")}
    prime = [sys.executable, "-c", "from sftdata.tokenizer_cache import load_snapshot; load_snapshot('tiny')"]  # fmt: skip
    subprocess.run(prime, check=True, env=env)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
