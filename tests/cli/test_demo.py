"""`make demo` end to end (fixtures/demo.sh): convert -> pack -> train tiny -> eval -> generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sfttrain_helpers import ROOT


@pytest.mark.slow
def test_demo_script_runs_and_the_loss_falls(tmp_path) -> None:
    env = dict(os.environ)
    env.update(
        DEMO_OUT=str(tmp_path / "demo"),
        BIN=str(Path(sys.executable).parent),
        # Fewer epochs than `make demo` keeps the suite fast; the script's own check (train loss
        # at least halves) still has to pass.
        DEMO_SET="--set num_train_epochs=6 --set eval_steps=20 --no-progress",
    )
    r = subprocess.run(
        ["bash", str(ROOT / "fixtures" / "demo.sh")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train loss" in r.stdout and "validation: loss" in r.stdout
    assert r.stdout.count("\nA: ") == 4
    run = tmp_path / "demo" / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in rows if "loss" in x]
    assert train[-1] < train[0] / 2
    assert (run / "final" / "model.safetensors").is_file() and (run / "loss.png").is_file()
    # steps 6-7: the GGUF export and one chat turn with it in llama.cpp
    assert (tmp_path / "demo" / "model-q8_0.gguf").read_bytes()[:4] == b"GGUF"
    assert "Chatting with" in r.stdout and ">>> " in r.stdout
