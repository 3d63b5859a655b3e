"""The CUDA path: what can be checked on CPU (row flattening for flash varlen, the QLoRA merge
refusal) and the GPU tests proper (``pytest -m gpu``; skipped when CUDA is unavailable)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from sftdata.errors import ConfigError
from sfttrain.config import build_config
from sfttrain.data import open_split, to_tensors
from sfttrain.export.hf import check_mergeable_base
from sfttrain.loss import LossModel, forward_kwargs
from sfttrain.model import build_tiny, load_base_model
from tests.sfttrain_helpers import demo_shards, small_model_dir, train_losses

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_bf16 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
    reason="needs a CUDA device with bf16",
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return demo_shards(tmp_path_factory.mktemp("gpu"), seq_len=128, limit=60)


def _packed_rows(shards, n: int = 2) -> dict:
    reader = open_split(shards, "train")
    host = reader.get_batch(np.arange(n))
    restarts = (np.diff(host["position_ids"], axis=1) != 1).sum(axis=1)
    assert (restarts >= 1).all(), "each test row must hold at least two records"
    return host


def test_flattening_rows_for_varlen_keeps_records_apart_on_cpu(shards) -> None:
    """[B, L] -> [1, B·L] (what flash_attention_2 needs to see restarts) gives the per-row loss."""
    model = build_tiny(seed=3).eval()
    batch = to_tensors(_packed_rows(shards, 3))
    with torch.no_grad():
        per_row = LossModel(model, isolation="position_ids", flatten_rows=False)(**batch)
        flat = LossModel(model, isolation="position_ids", flatten_rows=True)(**batch)
        # and the non-selective path (full logits) flattens the same way
        flat_full = LossModel(
            model, isolation="position_ids", flatten_rows=True, selective_head=False
        )(**batch)
    assert flat.item() == pytest.approx(per_row.item(), rel=1e-5)
    assert flat_full.item() == pytest.approx(per_row.item(), rel=1e-5)
    # a flattened batch WITHOUT restarts at row starts would leak: the test can fail
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].numel()).reshape(1, -1))
    with torch.no_grad():
        wrong = LossModel(model, isolation="position_ids", flatten_rows=False)(
            input_ids=batch["input_ids"].reshape(1, -1),
            labels=batch["labels"].reshape(1, -1),
            position_ids=leaky["position_ids"],
        )
    assert abs(wrong.item() - per_row.item()) > 1e-3


def test_merge_into_a_quantised_base_folder_is_refused(tmp_path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}})
    )
    with pytest.raises(ConfigError, match=r"quantised weights .*original full-precision"):
        check_mergeable_base(base)
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    check_mergeable_base(base)  # a full-precision base is fine


def test_quantising_the_tiny_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="tiny model cannot be quantised"):
        load_base_model("tiny", quantization_bit=4)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["flex_attention", "flash_attention_2"])
def test_c1_under_the_fast_paths_in_bf16(impl, shards, tmp_path) -> None:
    """Packed rows under flex attention (a per-record BlockMask from position ids) and flash
    varlen equal sdpa's block-diagonal mask and the records run alone, in bf16 (rel 2e-2)."""
    if impl == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed on this GPU machine")
    folder = small_model_dir(tmp_path / "m", seed=1)
    host = _packed_rows(shards, 2)
    batch = to_tensors(host, "cuda")
    flash, _ = load_base_model(folder, attn_implementation=impl)
    sdpa, _ = load_base_model(folder, attn_implementation="sdpa")
    flash, sdpa = flash.cuda().eval(), sdpa.cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = LossModel(flash, isolation="position_ids")(**batch)  # flattened varlen
        want = LossModel(sdpa, isolation="position_ids")(**batch)  # block-diagonal via sdpa
        # each record on its own, summed: the definition of C1
        alone = 0.0
        for b in range(host["input_ids"].shape[0]):
            pos = host["position_ids"][b]
            starts = [*np.flatnonzero(pos == 0).tolist(), len(pos)]
            for s, e in itertools.pairwise(starts):
                one = {k: v[b : b + 1, s:e] for k, v in batch.items()}
                alone += float(LossModel(sdpa, isolation="position_ids")(**one))
    assert got.item() == pytest.approx(want.item(), rel=2e-2)
    assert got.item() == pytest.approx(alone, rel=2e-2)
    kw = forward_kwargs(batch["input_ids"], batch["position_ids"], isolation="position_ids")
    assert "attention_mask" not in kw  # no L×L mask is built by us for either


@pytest.mark.gpu
@needs_cuda
def test_qlora_step_trains_and_merges_into_the_original_weights(shards, tmp_path) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed on this GPU machine")
    from sfttrain.export.hf import export_checkpoint
    from sfttrain.train import train

    folder = small_model_dir(tmp_path / "m", seed=1)
    cfg = build_config(
        {
            "quantization_bit": 4,
            "bf16": True,
            "max_steps": 3,
            "logging_steps": 1,
            "learning_rate": 1e-3,
            "report_to": "none",
        }
    )
    # the tiny tokenizer packed the shards; the small model folder carries the same tokenizer
    result = train(cfg, shards=shards, output_dir=tmp_path / "run", model_spec=str(folder))
    losses = train_losses(tmp_path / "run")
    assert result.step == 3 and all(np.isfinite(list(losses.values())))
    what = export_checkpoint(tmp_path / "run" / "final", tmp_path / "merged", merge=True)
    assert what == "merged model"


@pytest.mark.gpu
@needs_bf16
def test_bf16_loss_is_within_tolerance_of_fp32(shards, tmp_path) -> None:
    from sfttrain.train import train

    base = {"max_steps": 4, "logging_steps": 1, "learning_rate": 1e-3, "report_to": "none"}
    train(build_config(base), shards=shards, output_dir=tmp_path / "fp32", model_spec="tiny")
    train(
        build_config({**base, "bf16": True}),
        shards=shards,
        output_dir=tmp_path / "bf16",
        model_spec="tiny",
    )
    a, b = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2), (step, a[step], b[step])


@pytest.mark.gpu
@needs_cuda
def test_flex_attention_trains_like_sdpa(shards, tmp_path) -> None:
    from sfttrain.train import train

    base = {"max_steps": 4, "logging_steps": 1, "learning_rate": 1e-3, "report_to": "none",
            "bf16": torch.cuda.is_bf16_supported(), "per_device_train_batch_size": 2}  # fmt: skip
    for impl in ("sdpa", "flex_attention"):
        cfg = build_config({**base, "attn_implementation": impl})
        train(cfg, shards=shards, output_dir=tmp_path / impl, model_spec="tiny")
    a, b = train_losses(tmp_path / "sdpa"), train_losses(tmp_path / "flex_attention")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-2), (step, a[step], b[step])


@pytest.mark.gpu
@needs_cuda
def test_sigkill_and_resume_is_exact_on_cuda(shards, tmp_path) -> None:
    """C4 on the GPU: deterministic kernels make the resumed losses and weights bit-equal."""
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    from tests.sfttrain_helpers import ROOT, metrics, sfttrain_cmd, subprocess_env

    settings = ["--set", "max_steps=12", "--set", "save_steps=2", "--set", "logging_steps=1",
                "--set", "deterministic=true", "--set", "learning_rate=1e-3",
                "--set", "report_to=none", "--no-progress"]  # fmt: skip

    def cmd(out, *extra):
        return sfttrain_cmd(
            "run", str(shards), "-o", str(out), "--model", "tiny", *settings, *extra
        )

    env = subprocess_env()
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert subprocess.run(cmd(ref), env=env, cwd=ROOT, capture_output=True).returncode == 0
    proc = subprocess.Popen(
        cmd(killed), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= 7 for r in metrics(killed)):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 7"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "final").exists()
    r = subprocess.run(
        cmd(killed, "--resume", "auto"), env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert train_losses(killed) == train_losses(ref)
    want = load_file(str(ref / "final" / "adapter_model.safetensors"))
    got = load_file(str(killed / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)
