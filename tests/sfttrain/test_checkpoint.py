"""C4: a run killed with SIGKILL and resumed equals an uninterrupted run; SIGTERM saves and exits 0;
checkpoints are atomic, rotated, and refused when incomplete or from another run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from sftdata.errors import CheckpointError, ConfigError
from sfttrain.checkpoint import MARKER, complete_checkpoints, read_state
from sfttrain.config import build_config
from sfttrain.train import train
from tests.sfttrain_helpers import (
    ROOT,
    demo_shards,
    metrics,
    run_cli,
    sfttrain_cmd,
    small_model_dir,
    subprocess_env,
    train_losses,
)

# LoRA with dropout: resuming must restore the RNG exactly or the dropout masks (and losses) differ.
RUN_SETTINGS = [
    "--set", "max_steps=10",
    "--set", "save_steps=2",
    "--set", "logging_steps=1",
    "--set", "lora_dropout=0.2",
    "--set", "per_device_train_batch_size=2",
    "--set", "gradient_accumulation_steps=2",
    "--set", "warmup_ratio=0.2",
    "--set", "learning_rate=5e-3",
    "--set", "report_to=none",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("data"), seq_len=64, limit=80)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return small_model_dir(tmp_path_factory.mktemp("model"))


def _start(shards, out, model_dir, *extra: str) -> subprocess.Popen:
    cmd = sfttrain_cmd(
        "run",
        str(shards),
        "-o",
        str(out),
        "--model",
        str(model_dir),
        "--no-progress",
        *RUN_SETTINGS,
        *extra,
    )
    return subprocess.Popen(
        cmd,
        env=subprocess_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc: subprocess.Popen, out, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in metrics(out)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


def test_sigkill_and_resume_equals_uninterrupted_run(shards, model_dir, tmp_path) -> None:
    ref = tmp_path / "ref"
    r = run_cli(
        "run",
        str(shards),
        "-o",
        str(ref),
        "--model",
        str(model_dir),
        "--no-progress",
        *RUN_SETTINGS,
    )
    assert r.returncode == 0, r.stderr

    killed = tmp_path / "killed"
    proc = _start(shards, killed, model_dir)
    _wait_for_step(proc, killed, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = complete_checkpoints(killed)
    assert done and read_state(done[-1])["step"] < 10  # it really died before the end
    assert not (killed / "final").exists()

    r = run_cli(
        "run",
        str(shards),
        "-o",
        str(killed),
        "--model",
        str(model_dir),
        "--no-progress",
        "--resume",
        "auto",
        *RUN_SETTINGS,
    )
    assert r.returncode == 0, r.stderr

    want, got = train_losses(ref), train_losses(killed)
    assert sorted(got) == list(
        range(1, 11)
    )  # lines after the checkpoint were replaced, not duplicated
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    wa = load_file(str(ref / "final" / "adapter_model.safetensors"))
    wb = load_file(str(killed / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    # Dropout really was active: a run without it gives different losses.
    nodrop = tmp_path / "nodrop"
    settings = [s if s != "lora_dropout=0.2" else "lora_dropout=0.0" for s in RUN_SETTINGS]
    r = run_cli(
        "run", str(shards), "-o", str(nodrop), "--model", str(model_dir), "--no-progress", *settings
    )
    assert r.returncode == 0, r.stderr
    assert train_losses(nodrop)[3] != pytest.approx(want[3], abs=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_a_checkpoint_and_exits_zero(shards, model_dir, tmp_path, sig) -> None:
    out = tmp_path / "run"
    proc = _start(shards, out, model_dir, "--set", "max_steps=100000", "--set", "save_steps=0")
    _wait_for_step(proc, out, 2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped at step" in stdout
    # said when the signal came, before the step ended and the checkpoint was written
    lines = stderr.splitlines()
    heard = [i for i, x in enumerate(lines) if x.startswith(f"{sig.name}: stopping after step ")]
    saved = [i for i, x in enumerate(lines) if x.startswith("checkpoint saved at step ")]
    assert len(heard) == 1 and saved and heard[0] < saved[-1], stderr
    last = complete_checkpoints(out)[-1]
    state = read_state(last)
    assert state["step"] >= 2 and state["step"] == max(r["step"] for r in metrics(out))
    assert (last / "adapter_model.safetensors").is_file() and (last / "optimizer.pt").is_file()
    assert not (out / "final").exists()


def _cfg(**kw):
    return build_config({"max_steps": 4, "logging_steps": 1, "report_to": "none", **kw})


def test_rotation_keeps_the_newest(shards, model_dir, tmp_path) -> None:
    train(
        _cfg(save_steps=1, save_total_limit=2),
        shards=shards,
        output_dir=tmp_path,
        model_spec=str(model_dir),
        progress=False,
    )
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    for p in complete_checkpoints(tmp_path):
        assert (p / MARKER).is_file()


def test_full_disk_keeps_the_previous_checkpoint(shards, model_dir, tmp_path, monkeypatch) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint writes optimizer.pt and rng.pt; the second fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(
        CheckpointError,
        match=r"step-0000004: could not write the checkpoint .*step-0000002 is still valid",
    ):
        train(
            _cfg(save_steps=2),
            shards=shards,
            output_dir=tmp_path,
            model_spec=str(model_dir),
            progress=False,
        )
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-0000002"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [
        "step-0000002"
    ]  # no temp left
    read_state(tmp_path / "checkpoints" / "step-0000002")


def test_resume_refuses_incomplete_foreign_or_changed_checkpoints(
    shards, model_dir, tmp_path
) -> None:
    run = tmp_path / "run"
    train(
        _cfg(save_steps=2), shards=shards, output_dir=run, model_spec=str(model_dir), progress=False
    )
    ckpt = run / "checkpoints" / "step-0000002"

    def resume(path, **kw):
        return train(
            _cfg(save_steps=2, **kw),
            shards=kw.pop("_shards", shards),
            output_dir=tmp_path / "again",
            model_spec=str(model_dir),
            resume=str(path),
            progress=False,
        )

    with pytest.raises(
        CheckpointError, match=r"different config \(learning_rate: 0\.0001 there, 0\.001 now\)"
    ):
        resume(ckpt, learning_rate=1e-3)
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        resume(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        resume(tmp_path / "nowhere")
    other = demo_shards(tmp_path / "other", seq_len=64, limit=60)
    with pytest.raises(CheckpointError, match="other shards"):
        train(
            _cfg(save_steps=2),
            shards=other,
            output_dir=tmp_path / "x",
            model_spec=str(model_dir),
            resume=str(ckpt),
            progress=False,
        )
    # A resume may change logging/saving keys, and --resume auto on a fresh folder starts at 0.
    r = train(
        _cfg(save_steps=3, logging_steps=2),
        shards=shards,
        output_dir=tmp_path / "again",
        model_spec=str(model_dir),
        resume=str(ckpt),
        progress=False,
    )
    assert r.step == 4
    fresh = train(
        _cfg(),
        shards=shards,
        output_dir=tmp_path / "fresh",
        model_spec=str(model_dir),
        resume="auto",
        progress=False,
    )
    assert fresh.step == 4 and len(train_losses(tmp_path / "fresh")) == 4


def test_checkpoint_state_follows_its_schema(shards, model_dir, tmp_path) -> None:
    import jsonschema

    from sftdata import SCHEMAS_DIR

    train(
        _cfg(max_steps=2, finetuning_type="full"),
        shards=shards,
        output_dir=tmp_path,
        model_spec=str(model_dir),
        progress=False,
    )
    ckpt = complete_checkpoints(tmp_path)[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    jsonschema.validate(state, json.loads((SCHEMAS_DIR / "checkpoint.v1.json").read_text()))
    assert (
        state["cursor"] == {"epoch": 0, "step_in_epoch": 2}
        and state["config"]["finetuning_type"] == "full"
    )
    # A full fine-tuning checkpoint is itself an HF model folder; optimizer/RNG load without pickle.
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    torch.load(ckpt / "optimizer.pt", weights_only=True)
    torch.load(ckpt / "rng.pt", weights_only=True)


def test_fresh_run_refuses_a_folder_with_checkpoints_and_resume_skips_a_torn_line(
    shards, model_dir, tmp_path
) -> None:
    train(
        _cfg(save_steps=2),
        shards=shards,
        output_dir=tmp_path,
        model_spec=str(model_dir),
        progress=False,
    )
    with pytest.raises(ConfigError, match=r"already holds a run .* --resume auto"):
        train(
            _cfg(save_steps=2),
            shards=shards,
            output_dir=tmp_path,
            model_spec=str(model_dir),
            progress=False,
        )
    # A SIGKILL in the middle of a metrics line leaves it torn; resuming drops it.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"format_version": 1, "step": 5, "lo')
    (tmp_path / "checkpoints" / "step-0000004" / MARKER).unlink()  # pretend step 4 never completed
    r = train(
        _cfg(save_steps=2),
        shards=shards,
        output_dir=tmp_path,
        model_spec=str(model_dir),
        resume="auto",
        progress=False,
    )
    assert r.step == 4
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def _flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_is_refused_and_auto_resume_falls_back(
    shards, model_dir, tmp_path
) -> None:
    run = tmp_path / "run"
    common = [str(shards), "--model", str(model_dir), "-o", str(run), "--no-progress"]
    steps = ["--set", "save_steps=2", "--set", "report_to=none", "--set", "logging_steps=1"]
    r = run_cli("run", *common, *steps, "--set", "max_steps=4")
    assert r.returncode == 0, r.stderr
    newest, older = complete_checkpoints(run)[-1], complete_checkpoints(run)[-2]
    marker = json.loads((newest / MARKER).read_text())
    assert marker["format_version"] == 1 and "adapter_model.safetensors" in marker["sha256"]
    _flip_byte(newest / "adapter_model.safetensors")  # a flipped bit on disk: loads fine, wrong

    # an explicit path to the damaged checkpoint: one line naming it and the file
    r = run_cli("run", *common, *steps, "--set", "max_steps=4", "--resume", str(newest))
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines == [
        f"Error: {newest}: adapter_model.safetensors does not match the sha256 recorded when it "
        "was saved (a damaged checkpoint)"
    ], r.stderr

    # auto: the newest intact one, and it says so
    r = run_cli("run", *common, *steps, "--set", "max_steps=4", "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert f"{newest}: adapter_model.safetensors does not match" in r.stderr
    assert f"resuming from {older}, the newest intact checkpoint" in r.stderr
    resumed = [m["step"] for m in metrics(run) if "loss" in m]
    assert resumed == [1, 2, 3, 4]  # steps 3-4 trained again from step 2 (the log kept 1-2)

    # every checkpoint damaged: refused, not restarted from scratch
    for folder in complete_checkpoints(run):
        _flip_byte(folder / "optimizer.pt")
    r = run_cli("run", *common, *steps, "--set", "max_steps=4", "--resume", "auto")
    assert r.returncode != 0
    assert "no intact checkpoint to resume from" in r.stderr and "Traceback" not in r.stderr


def test_unreadable_optimizer_or_rng_state_is_one_line(shards, model_dir, tmp_path) -> None:
    from sfttrain.weights import load_optimizer, load_rng

    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "optimizer.pt").write_bytes(b"PK\x03\x04 not a zip")
    (folder / "rng.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: cannot load optimizer state"):
        load_optimizer(folder, model=None, optimizer=None, scheduler=None)
    with pytest.raises(CheckpointError, match=r"rng\.pt: cannot load RNG state"):
        load_rng(folder)


def test_a_marker_verifies_every_file_or_the_checkpoint_is_refused(
    shards, model_dir, tmp_path
) -> None:
    """A marker that is not JSON, lists nothing, misses a file, or is the old ``step N`` (no
    checksums) is refused, by --resume, eval, generate and export alike; ``--allow-unverified``
    takes the old format only."""
    from sfttrain.checkpoint import verify_checkpoint

    run = tmp_path / "run"
    r = run_cli(
        "run", str(shards), "--model", str(model_dir), "-o", str(run), "--no-progress",
        "--set", "max_steps=2", "--set", "save_steps=2", "--set", "report_to=none",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    good = complete_checkpoints(run)[-1]
    marker = json.loads((good / MARKER).read_text())
    cases = {
        "not-json": ("{step: 2", r"COMPLETE: not a checkpoint marker \(invalid JSON"),
        "empty-map": (
            json.dumps({**marker, "sha256": {}}),
            r"COMPLETE: does not record the checksum of README\.md",
        ),
        "one-missing": (
            json.dumps({**marker, "sha256": {k: v for k, v in marker["sha256"].items() if k != "rng.pt"}}),
            r"COMPLETE: does not record the checksum of rng\.pt",
        ),
        "old-format": ("step 2\n", r"COMPLETE: an old-format marker that records no checksums"),
        "wrong-version": (
            json.dumps({**marker, "format_version": 2}),
            r"COMPLETE: not a checkpoint marker of this version \(format_version",
        ),
    }  # fmt: skip
    for name, (text, expect) in cases.items():
        folder = tmp_path / name
        shutil.copytree(good, folder)
        (folder / MARKER).write_text(text, encoding="utf-8")
        with pytest.raises(CheckpointError, match=expect):
            verify_checkpoint(folder)
    verify_checkpoint(tmp_path / "old-format", allow_unverified=True)  # explicit: accepted
    # an unlisted file added after the save is refused too
    shutil.copytree(good, tmp_path / "added")
    (tmp_path / "added" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"does not record the checksum of notes\.txt"):
        verify_checkpoint(tmp_path / "added")
    # the readers verify before they load: one line each, nothing written
    damaged = tmp_path / "not-json"
    for args in (
        ["eval", str(shards), "--model", str(damaged)],
        ["generate", "--model", str(damaged), "--prompt", "hi"],
        ["export", str(damaged), "-o", str(tmp_path / "exported")],
    ):
        r = run_cli(*args)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode != 0 and len(lines) == 1, r.stderr
        assert "not a checkpoint marker" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "exported").exists()
    old = tmp_path / "old-format"
    r = run_cli("generate", "--model", str(old), "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode != 0 and "--allow-unverified" in r.stderr
    r = run_cli(
        "generate", "--model", str(old), "--prompt", "hi", "--max-new-tokens", "2",
        "--allow-unverified",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
