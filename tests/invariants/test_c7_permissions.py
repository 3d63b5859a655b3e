"""Outputs follow the umask, like files written by ``open()`` (issue 11): a teammate or a serving
container running as another user reads them. Temp files from mkstemp/mkdtemp (0600/0700) must
not keep their private modes once moved into place."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def _run(umask: int, *args: object, cwd: Path) -> None:
    r = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(umask),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for p in [root, *root.rglob("*")]:
        out[str(p.relative_to(root.parent))] = stat.S_IMODE(p.stat().st_mode)
    return out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_output_has_the_umask_mode(tmp_path: Path, umask: int) -> None:
    qa = ROOT / "fixtures" / "demo" / "qa.csv"
    _run(umask, BIN / "sftdata", "convert", qa, "-o", "qa.jsonl",
         "--map", "question=instruction,answer=output", cwd=tmp_path)  # fmt: skip
    _run(umask, BIN / "sftdata", "pack", "qa.jsonl", "-o", "shards", "--tokenizer", "tiny",
         "--seq-len", 256, "--val-count", 8, cwd=tmp_path)  # fmt: skip
    _run(umask, BIN / "sftdata", "export", "qa.jsonl", "--format", "openai", "-o", "o.jsonl",
         cwd=tmp_path)  # fmt: skip
    _run(umask, BIN / "sfttrain", "run", "shards", "-o", "run", "--model", "tiny",
         "--set", "max_steps=2", "--set", "save_steps=2", "--set", "eval_steps=2",
         "--set", "logging_steps=1", cwd=tmp_path)  # fmt: skip
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    modes = {
        "qa.jsonl": stat.S_IMODE((tmp_path / "qa.jsonl").stat().st_mode),
        "o.jsonl": stat.S_IMODE((tmp_path / "o.jsonl").stat().st_mode),
        **_modes(tmp_path / "shards"),
        **_modes(tmp_path / "run"),
    }
    assert any(k.startswith("run/final/") for k in modes) and "shards/index.json" in modes
    wrong = {
        k: oct(v)
        for k, v in modes.items()
        if v != (dir_mode if (tmp_path / k).is_dir() else file_mode)
    }
    assert not wrong, wrong
