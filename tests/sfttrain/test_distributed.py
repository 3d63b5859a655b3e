"""torchrun on CPU (gloo, 2 processes): C3 across ranks, disjoint slices, resume across rank counts,
SIGTERM on one rank, FSDP2, ``--nproc``; the sampler's per-rank padding; CPU refusals; MFU.

The reference runs are ONE process with accumulation 8; the distributed runs are 2 ranks with
accumulation 4 on the same global batch (8 rows per step). 17 training rows make the last step of
each epoch a single row: rank 1 then has no row at all and runs only zero-weight padding
micro-batches (without them DDP/FSDP would hang).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from sftdata.errors import CheckpointError, ConfigError
from sfttrain.checkpoint import complete_checkpoints, read_state
from sfttrain.cli import main
from sfttrain.config import build_config, trajectory_hash
from sfttrain.data import StepSampler, eval_batches, open_split, trained_tokens
from sfttrain.perf import check_platform, device_peak_tflops, mfu, model_flops_per_token
from sfttrain.train import train
from tests.sfttrain_helpers import ROOT, demo_shards, metrics, subprocess_env, train_losses

pytestmark = pytest.mark.slow

COMMON = {
    "per_device_train_batch_size": 1,
    "num_train_epochs": 2,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "save_steps": 2,
    "lr_scheduler_type": "linear",
    "report_to": "none",
    "seed": 7,
    # 3 validation rows, 1 per batch: rank 0 runs 2 eval batches, rank 1 one + a zero-weight pad
    "per_device_eval_batch_size": 1,
    "eval_steps": 3,
}


def _sets(values: dict) -> list[str]:
    out: list[str] = []
    for k, v in values.items():
        out += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(shards: Path, out: Path, values: dict, *extra: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N -m sfttrain run ...`` on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "sfttrain",
        "run",
        str(shards),
        "-o",
        str(out),
        "--model",
        "tiny",
        "--no-progress",
        *_sets(values),
        *extra,
    ]


def run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=ROOT
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def in_process(shards: Path, out: Path, values: dict, resume: str | None = None):
    """One rank, this process (the reference)."""
    return train(
        build_config(values),
        shards=shards,
        output_dir=out,
        model_spec="tiny",
        resume=resume,
        progress=False,
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_same_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], abs=2e-5, rel=1e-5), (s, a[s], b[s])


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in metrics(run_dir) if "eval_loss" in r}


def assert_same_eval(a: Path, b: Path) -> None:
    ea, eb = eval_losses(a), eval_losses(b)
    assert sorted(ea) == sorted(eb) == [3, 6]
    assert_same_losses(ea, eb, [3, 6])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = demo_shards(tmp_path_factory.mktemp("dist"), seq_len=64, limit=38, val_count=6)
    assert (len(open_split(out, "train")), len(open_split(out, "validation"))) == (17, 3)
    return out


@pytest.fixture(scope="module")
def lora_ref(shards, tmp_path_factory) -> Path:
    """1 rank × accumulation 8, LoRA: 3 steps per epoch (8, 8, 1 rows), 6 steps."""
    out = tmp_path_factory.mktemp("lora_ref") / "run"
    r = in_process(shards, out, {**COMMON, "gradient_accumulation_steps": 8})
    assert r.step == 6
    return out


@pytest.fixture(scope="module")
def lora_ddp(shards, tmp_path_factory) -> Path:
    """2 ranks × accumulation 4 under torchrun (DDP, gloo)."""
    out = tmp_path_factory.mktemp("lora_ddp") / "run"
    run(torchrun_cmd(shards, out, {**COMMON, "gradient_accumulation_steps": 4}))
    return out


# ----------------------------------------------------------------------------- sampler (no processes)


@pytest.mark.parametrize(
    ("rows", "world", "micro", "acc"), [(17, 2, 1, 4), (23, 3, 2, 2), (5, 4, 1, 1)]
)
def test_rank_slices_are_disjoint_cover_every_row_once_and_run_equal_micro_batches(
    rows, world, micro, acc
) -> None:
    samplers = [
        StepSampler(rows, micro_batch=micro, accumulation=acc, seed=3, rank=r, world_size=world)
        for r in range(world)
    ]
    one = StepSampler(rows, micro_batch=micro * world, accumulation=acc, seed=3)
    for epoch in range(2):
        seen: list[int] = []
        for step in range(samplers[0].steps_per_epoch):
            cursor = samplers[0].cursor_at(epoch * samplers[0].steps_per_epoch + step)
            padded = [s.padded_micro_batches(cursor) for s in samplers]
            counts = {len(batches) for batches, _ in padded}
            assert len(counts) == 1  # every rank runs the same number of micro-batches
            for (batches, n_real), s in zip(padded, samplers, strict=True):
                assert [b.tolist() for b in batches[:n_real]] == [
                    b.tolist() for b in s.micro_batches(cursor)
                ]
                assert all(len(b) == 1 for b in batches[n_real:])  # padding: one row, weight 0
                seen += [int(x) for b in batches[:n_real] for x in b]
            # the global order does not depend on the number of ranks
            assert sorted(seen[-len(one.step_rows(cursor)) :]) == sorted(one.step_rows(cursor))
        assert sorted(seen) == list(range(rows))  # each row exactly once per epoch
    # the 17-row case: rank 1 has no row in the last step but still runs its micro-batches
    if rows == 17:
        batches, n_real = samplers[1].padded_micro_batches(samplers[1].cursor_at(2))
        assert n_real == 0 and len(batches) == 1


def test_padded_eval_batches_have_the_same_count_on_every_rank() -> None:
    per_rank = [list(eval_batches(7, 2, rank=r, world_size=3, pad=True)) for r in range(3)]
    assert {len(b) for b in per_rank} == {2}
    rows = sorted(int(x) for b in per_rank for batch in b for x in batch)
    assert rows == list(range(7))


# ----------------------------------------------------------------------------- torchrun, DDP


def test_c3_two_ranks_accumulation_4_equal_one_rank_accumulation_8(lora_ref, lora_ddp) -> None:
    ref, ddp = train_losses(lora_ref), train_losses(lora_ddp)
    assert sorted(ref) == sorted(ddp) == list(range(1, 7))
    assert_same_losses(ref, ddp, range(1, 7))
    assert_same_weights(lora_ref / "final", lora_ddp / "final")
    assert_same_eval(lora_ref, lora_ddp)  # evaluation split over ranks, padded, summed
    assert ref[6] < ref[1]  # it trained


def test_every_row_is_trained_exactly_once_per_epoch_across_ranks(shards, lora_ddp) -> None:
    """End to end: the trained-token count of 2 ranks after one epoch is that of all rows, once."""
    reader = open_split(shards, "train")
    epoch_tokens = trained_tokens(reader.get_batch(np.arange(len(reader)))["labels"])
    by_step = {r["step"]: r["trained_tokens"] for r in metrics(lora_ddp) if "loss" in r}
    assert by_step[3] == epoch_tokens and by_step[6] == 2 * epoch_tokens
    state = read_state(complete_checkpoints(lora_ddp)[-1])
    assert state["world_size"] == 2 and state["trained_tokens"] == 2 * epoch_tokens


def test_a_two_rank_checkpoint_resumes_on_one_rank(lora_ref, lora_ddp, tmp_path) -> None:
    step2 = complete_checkpoints(lora_ddp)[0]
    assert step2.name == "step-0000002"
    out = tmp_path / "resumed"
    r = in_process(
        Path(read_state(step2)["shards"]["path"]),
        out,
        {**COMMON, "gradient_accumulation_steps": 8},
        resume=str(step2),
    )
    assert r.step == 6
    assert_same_losses(train_losses(out), train_losses(lora_ref), range(3, 7))
    assert_same_weights(out / "final", lora_ref / "final")


def test_nproc_runs_torchrun_and_resumes_a_one_rank_checkpoint_on_two(
    shards, lora_ref, tmp_path
) -> None:
    step2 = complete_checkpoints(lora_ref)[0]
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "sfttrain", "run", str(shards), "-o", str(out), "--model", "tiny"]
    cmd += ["--no-progress", "--nproc", "2", "--resume", str(step2)]
    cmd += _sets({**COMMON, "gradient_accumulation_steps": 4})
    r = run(cmd)
    assert r.stdout.count("trained 6 steps") == 1  # rank 0 reports, once
    assert read_state(complete_checkpoints(out)[-1])["world_size"] == 2
    assert_same_losses(train_losses(out), train_losses(lora_ref), range(3, 7))
    assert_same_weights(out / "final", lora_ref / "final")


def test_resume_refuses_another_global_batch(lora_ddp, shards, tmp_path) -> None:
    step2 = complete_checkpoints(lora_ddp)[0]
    with pytest.raises(
        CheckpointError, match=r"global batch 8 rows .*1 × accumulation 4 × 2 ranks"
    ):
        in_process(shards, tmp_path / "x", {**COMMON, "gradient_accumulation_steps": 4}, str(step2))


def test_global_batch_not_its_split_is_in_the_trajectory() -> None:
    a = build_config({"gradient_accumulation_steps": 8})
    b = build_config({"gradient_accumulation_steps": 4})
    c = build_config({"gradient_accumulation_steps": 4, "per_device_train_batch_size": 2})
    assert trajectory_hash(a) == trajectory_hash(b, world_size=2) == trajectory_hash(c)
    assert trajectory_hash(a) != trajectory_hash(b)
    assert trajectory_hash(a) == trajectory_hash(
        build_config({"gradient_accumulation_steps": 8, "distributed": "fsdp"})
    )


# ----------------------------------------------------------------------------- SIGTERM on one rank


def _start_and_wait_for_step_2(cmd: list[str], out: Path) -> subprocess.Popen:
    """Start a training run and return once metrics.jsonl has logged step 2 (killed on failure)."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        while not [r for r in metrics(out) if r.get("step", 0) >= 2]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return proc


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_sigterm_on_one_rank_stops_both_with_a_checkpoint(shards, lora_ref, tmp_path) -> None:
    """Under FSDP + LoRA, so the stop checkpoint also shows the adapter gathered from shards."""
    out = tmp_path / "run"
    values = {
        **COMMON,
        "distributed": "fsdp",
        "gradient_accumulation_steps": 4,
        "num_train_epochs": 1000,
        "save_steps": 0,
    }
    proc = _start_and_wait_for_step_2(torchrun_cmd(shards, out, values), out)
    try:
        rank1 = [c for c in _children(proc.pid) if _rank_of(c) == 1]
        assert len(rank1) == 1, _children(proc.pid)
        os.kill(rank1[0], signal.SIGTERM)  # one worker only; rank 0 must learn it from rank 1
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "stopped at step" in stdout
    last = complete_checkpoints(out)[-1]
    state = read_state(last)
    logged = max(r["step"] for r in metrics(out) if "loss" in r)
    assert state["step"] == logged < 3000  # both ranks stopped at the same step and saved it
    assert not (out / "final").exists()
    # the adapter was gathered from the FSDP shards: full shapes, the same keys as one rank's
    got = weights(last)
    want = weights(complete_checkpoints(lora_ref)[0])
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape for k in got)
    assert all(got[k].abs().sum() > 0 for k in got if "lora_B" in k)  # trained (B starts at 0)


def test_sigterm_to_the_nproc_launcher_stops_the_ranks_cleanly(shards, tmp_path) -> None:
    """`sfttrain run --nproc 2` routes SIGTERM to the workers: checkpoint, exit 0, no traceback."""
    out = tmp_path / "run"
    values = {**COMMON, "gradient_accumulation_steps": 4, "num_train_epochs": 1000, "save_steps": 0}
    cmd = [sys.executable, "-m", "sfttrain", "run", str(shards), "-o", str(out), "--model", "tiny"]
    cmd += ["--no-progress", "--nproc", "2", *_sets(values)]
    proc = _start_and_wait_for_step_2(cmd, out)
    try:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped at step" in stdout and "Traceback" not in stderr
    state = read_state(complete_checkpoints(out)[-1])
    assert state["world_size"] == 2
    assert state["step"] == max(r["step"] for r in metrics(out) if "loss" in r)


# ----------------------------------------------------------------------------- FSDP2 on CPU/gloo


def test_fsdp_full_finetuning_matches_one_rank_and_its_checkpoint_resumes_on_one_rank(
    shards, tmp_path
) -> None:
    full = {**COMMON, "finetuning_type": "full", "learning_rate": 1e-4}
    ref = tmp_path / "ref"
    in_process(shards, ref, {**full, "gradient_accumulation_steps": 8})
    fsdp = tmp_path / "fsdp"
    run(
        torchrun_cmd(
            shards, fsdp, {**full, "gradient_accumulation_steps": 4, "distributed": "fsdp"}
        )
    )
    assert_same_losses(train_losses(ref), train_losses(fsdp), range(1, 7))
    assert_same_weights(ref / "final", fsdp / "final")
    assert_same_eval(ref, fsdp)
    # the FSDP checkpoint is a plain full checkpoint: it resumes on one rank, without FSDP
    step2 = complete_checkpoints(fsdp)[0]
    assert (step2 / "model.safetensors").is_file()
    resumed = tmp_path / "resumed"
    in_process(shards, resumed, {**full, "gradient_accumulation_steps": 8}, resume=str(step2))
    assert_same_losses(train_losses(resumed), train_losses(ref), range(3, 7))
    assert_same_weights(resumed / "final", ref / "final")


# ----------------------------------------------------------------------------- CPU refusals, MFU


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("quantization_bit=4", "quantization_bit: 4-bit QLoRA needs a CUDA GPU"),
        ("attn_implementation=flash_attention_2", "flash_attention_2 needs a CUDA GPU"),
        ("attn_implementation=flex_attention", "flex_attention runs on a CUDA GPU only"),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_cuda_only_options_are_refused_on_cpu_in_one_line(setting, message, tmp_path) -> None:
    for extra in ([], ["--nproc", "2"]):
        r = CliRunner().invoke(
            main,
            [
                "run",
                str(tmp_path),
                "-o",
                str(tmp_path / "o"),
                "--model",
                "tiny",
                "--set",
                setting,
                *extra,
            ],
        )
        assert r.exit_code == 1
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.output
        assert not (tmp_path / "o").exists()


def test_liger_missing_or_without_cuda_is_one_config_error() -> None:
    config = build_config({"use_liger_kernel": True})
    with pytest.raises(ConfigError, match="use_liger_kernel: "):
        check_platform(config, torch.device("cpu"))


def test_quantization_needs_lora_and_4_or_8_bits() -> None:
    with pytest.raises(ConfigError, match="quantization_bit: 3 must be 4 or 8"):
        build_config({"quantization_bit": 3})
    with pytest.raises(ConfigError, match="finetuning_type: lora"):
        build_config({"quantization_bit": 4, "finetuning_type": "full"})


def test_model_flops_per_token_is_6n_plus_attention_for_full_and_4n_plus_2_trainable_for_lora() -> (
    None
):
    from sfttrain.model import apply_finetuning, build_tiny

    model = build_tiny(seed=0)
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * 64
    full = apply_finetuning(model, build_config({"finetuning_type": "full"}))
    assert model_flops_per_token(full, seq_len=64) == 6 * n + attention
    lora = apply_finetuning(build_tiny(seed=0), build_config({"lora_rank": 4}))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    n_lora = n + trainable  # the adapters' matmuls run too
    assert model_flops_per_token(lora, seq_len=64) == 4 * n_lora + 2 * trainable + attention


def test_mfu_and_peak_table() -> None:
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), 100.0) == 100.0
    assert mfu(1e9, 1e3, peak_tflops=None, world_size=1) is None
    assert mfu(1e9, 1e3, peak_tflops=1.0, world_size=2) == pytest.approx(0.5)


def test_metrics_report_mfu_only_with_a_peak_on_cpu(shards, lora_ref, tmp_path) -> None:
    assert all(r["mfu"] is None for r in metrics(lora_ref) if "loss" in r)  # no peak on a CPU
    values = {**COMMON, "max_steps": 1, "gradient_accumulation_steps": 8, "save_steps": 0}
    in_process(shards, tmp_path / "b", {**values, "peak_tflops": 0.001, "eval_steps": None})
    rows = [r for r in metrics(tmp_path / "b") if "loss" in r]
    assert rows and all(r["mfu"] > 0 and r["peak_mem_mb"] > 0 for r in rows)


def test_deterministic_kernels_are_switched_on_for_the_process() -> None:
    """In a child process: the switch is process-wide and would leak into other tests here."""
    import subprocess
    import sys

    code = (
        "import os, torch; from sfttrain.perf import deterministic_kernels; "
        "deterministic_kernels(False); a = torch.are_deterministic_algorithms_enabled(); "
        "deterministic_kernels(True); "
        "print(a, torch.are_deterministic_algorithms_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "True", ":4096:8"], r.stderr


def test_a_stop_request_is_reported_when_the_signal_comes_once() -> None:
    """The first SIGTERM/SIGINT calls back from the handler, not at the end of the step (what
    lets `sfttrain run` say at once that it heard); later ones do not repeat it."""
    import threading

    from sfttrain.distributed import StopRequest

    heard: list[str] = []
    with StopRequest(heard.append) as stop:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not heard and time.monotonic() < deadline:
            time.sleep(0.001)
        assert heard == ["SIGTERM"] and stop.requested
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        time.sleep(0.01)
        assert heard == ["SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # restored


@pytest.mark.parametrize("launch", ["nproc", "torchrun"])
def test_a_data_section_is_packed_once_for_every_rank(launch: str, tmp_path: Path) -> None:
    """``run -c`` with a ``data:`` section on two ranks: packed before the ranks start (``--nproc``)
    or by rank 0 while the other waits (a torchrun the user started); both ranks train the same
    shards, and one step's loss is one process's on them."""
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "data": {"inputs": [str(ROOT / "fixtures" / "demo" / "qa.csv")], "seq_len": 128,
                 "cache_dir": str(tmp_path / "work")},
        "max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2,
        "report_to": "none", "seed": 3, "learning_rate": 1e-3,
    }), encoding="utf-8")  # fmt: skip
    common = ["-c", str(tmp_path / "run.yaml"), "--model", "tiny", "--no-progress"]
    if launch == "nproc":
        cmd = [sys.executable, "-m", "sfttrain", "run", *common, "-o", str(tmp_path / "out"),
               "--nproc", "2"]  # fmt: skip
    else:
        cmd = [*torchrun_cmd(tmp_path / "x", tmp_path / "out", {})[:9], *common, "-o",
               str(tmp_path / "out")]  # fmt: skip
    r = run(cmd)
    assert r.stdout.count("trained 1 step,") == 1, r.stdout + r.stderr[-2000:]
    assert (r.stdout + r.stderr).count("data: packed ") == 1  # by one process, once
    shards = tmp_path / "work" / "shards"
    assert (
        read_state(complete_checkpoints(tmp_path / "out")[-1])["shards"]["fingerprint"]
        == (open_split(shards, "train").index["fingerprint"])
    )
    one = {"max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
           "report_to": "none", "seed": 3, "learning_rate": 1e-3}  # fmt: skip
    ref = in_process(shards, tmp_path / "ref", one)
    assert ref.step == 1
    assert_same_losses(train_losses(tmp_path / "out"), train_losses(tmp_path / "ref"), [1])
