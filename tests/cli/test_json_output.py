"""Standard output is data: with ``--json`` every command prints exactly one strict JSON document
on stdout, whatever mode it runs in (fresh, up to date, repacked, resumed, with warnings, skipped
records, a failed validation); everything else goes to stderr. Each command runs in a real
subprocess, so a stray print anywhere (a library, a worker process) would show."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import FIXTURES, ROOT
from tests.sfttrain_helpers import subprocess_env


def _strict(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: Python writes them, jq refuses them


def one_document(stdout: str) -> dict:
    """The one JSON document of ``stdout`` (json.loads refuses anything before or after it)."""
    return json.loads(stdout, parse_constant=_strict)


def _cli(tool: str, *args: object, ok: bool = True) -> tuple[dict, str]:
    r = subprocess.run(
        [sys.executable, "-m", tool, *map(str, args)], capture_output=True, text=True,
        timeout=600, env=subprocess_env(), cwd=ROOT,
    )  # fmt: skip
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    try:
        return one_document(r.stdout), r.stderr
    except ValueError as e:
        raise AssertionError(
            f"{tool} {args}: stdout is not one JSON document ({e}):\n{r.stdout}"
        ) from None


def sftdata(*args: object, ok: bool = True) -> tuple[dict, str]:
    return _cli("sftdata", *args, ok=ok)


def sfttrain(*args: object, ok: bool = True) -> tuple[dict, str]:
    return _cli("sfttrain", *args, ok=ok)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 demo records as Alpaca JSON, plus a duplicate, a record with no reply (convert's dedup
    and skip modes) and one longer than the packs' 64 tokens (pack's overflow warning)."""
    folder = tmp_path_factory.mktemp("json")
    with (FIXTURES / "demo" / "qa.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:40]
    records = [{"instruction": r["question"], "output": r["answer"]} for r in rows]
    records += [records[0], {"instruction": "no reply", "output": ""},
                {"instruction": "long " * 200, "output": "ok"}]  # fmt: skip
    (folder / "raw.json").write_text(json.dumps(records), encoding="utf-8")
    return folder


@pytest.mark.slow
def test_every_json_command_prints_one_document_in_every_mode(data: Path) -> None:
    raw, conv, shards = data / "raw.json", data / "data.jsonl", data / "shards"
    # convert: skipped and duplicate records are reported on stderr only
    doc, err = sftdata("convert", raw, "-o", conv, "--skip-invalid", "--dedup", "--json")
    assert doc["records_out"] == 41 and "skipped" in err
    # -o -: stdout is the data alone, the report (JSON or words) on stderr
    for fmt in ("--json", None):
        piped = subprocess.run(
            [sys.executable, "-m", "sftdata", "convert", str(raw), "-o", "-", "--skip-invalid",
             *([fmt] if fmt else [])], capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        rows = [json.loads(x) for x in piped.stdout.splitlines()]
        assert len(rows) == 42 and all(r["schema_version"] == 2 for r in rows)
        exported = subprocess.run(
            [sys.executable, "-m", "sftdata", "export", str(conv), "--format", "sharegpt", "-o",
             "-", *([fmt] if fmt else [])], capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert len(json.loads(exported.stdout)) == 41
        if fmt:
            assert json.loads(piped.stderr.splitlines()[-1])["records_out"] == 42
            assert json.loads(exported.stderr.splitlines()[-1])["records"] == 41
    # validate: clean, and failing (the exit code says so, stdout stays one document)
    sftdata("validate", conv, "--json")
    bad = data / "bad.jsonl"
    bad.write_text(conv.read_text(encoding="utf-8") + '{"messages": 1}\n', encoding="utf-8")
    doc, _ = sftdata("validate", bad, "--json", ok=False)
    assert doc
    # pack: fresh with warnings (records past seq_len), up to date, repacked, --no-pack
    pack = ("pack", conv, "-o", shards, "--tokenizer", "tiny", "--seq-len", "64", "--json")
    doc, err = sftdata(*pack)
    assert doc["rows"] > 0 and "--seq-len" in err  # the overflow warning
    sftdata(*pack)
    sftdata(*pack, "--num-proc", "2", "--overflow", "truncate")
    sftdata("pack", conv, "-o", data / "unpacked", "--tokenizer", "tiny", "--seq-len", "64",
            "--no-pack", "--json")  # fmt: skip
    # stats of shards and of JSONL; export to another stack
    sftdata("stats", shards, "--json")
    sftdata("stats", conv, "--tokenizer", "tiny", "--seq-len", "64", "--json")
    sftdata("export", conv, "--format", "sharegpt", "-o", data / "sg.json", "--json")

    # sfttrain run: fresh, resumed, from a config whose data section changed (repacked)
    run = data / "run"
    train = ("run", shards, "--model", "tiny", "-o", run, "--set", "max_steps=2",
             "--set", "save_steps=1", "--json")  # fmt: skip
    doc, err = sfttrain(*train)
    assert doc["step"] == 2 and "checkpoint saved at step 2" in err
    doc, err = sfttrain(*train, "--resume", run / "checkpoints" / "step-0000001")
    assert doc["step"] == 2 and "resumed from step 1" in err
    cfg = data / "train.yaml"
    section = {"inputs": [str(conv)], "tokenizer": "tiny", "seq_len": 64,
               "cache_dir": str(data / "cache")}  # fmt: skip
    for seq_len in (64, 128):  # the second run repacks
        section["seq_len"] = seq_len
        config = {"model_name_or_path": "tiny", "max_steps": 1, "data": section}
        cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
        doc, err = sfttrain("run", "-c", cfg, "-o", data / f"run{seq_len}", "--json")
        assert doc["step"] == 1
    assert "repacked" in err
    # eval (loss, and generation metrics), export
    sfttrain("eval", shards, "--model", run / "final", "--json")
    doc, _ = sfttrain("eval", shards, "--model", run / "final", "--generate", "--max-samples",
                      "2", "--max-new-tokens", "4", "-o", data / "predict", "--json")  # fmt: skip
    assert doc["predicted"] == 2
    sfttrain("export", run / "final", "-o", data / "merged", "--merge", "--json")
