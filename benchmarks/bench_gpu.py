"""GPU trainer benchmark: trained tokens/s, MFU and peak memory of `sfttrain run` vs TRL's SFTTrainer.

Model: Qwen2.5-0.5B's published architecture, random init (seeded): hidden 896, 24 layers, 14
heads, 2 KV heads, intermediate 4864, vocab 151,936, tied embeddings, rope theta 1e6. Weights are
saved fp32 (fp32 master weights; bf16 autocast computes). The tokenizer is the real Llama-2 one
(`../shared/tokenizers/llama2`, 32k ids < 151,936 embeddings): no hub access. Data: Alpaca
(`../shared/data/alpaca_en_demo.json`) → `sftdata convert` → `sftdata pack --template llama2
--seq-len 4096`. Every variant runs in its own process; `sfttrain run` variants read their
tokens/s, MFU and peak memory from metrics.jsonl (median over the steps after the warm-up); TRL's
SFTTrainer (packing, assistant-only loss, bf16, same optimiser) runs on the same model and
records, timed with a callback.

    .venv/bin/python benchmarks/bench_gpu.py                     # all variants, ~20-30 min on an H100
    .venv/bin/python benchmarks/bench_gpu.py --variants full-sdpa,full-flash --steps 30
    .venv/bin/python benchmarks/bench_gpu.py --smoke             # CPU: plumbing only (tiny shapes)

Without CUDA (and without --smoke) it prints one line and exits 2: nothing to measure.
Results: bench_out/gpu/results.json and a Markdown table on stdout (paste into benchmarks/README.md).
Target (issue 5): MFU ≥ 40% for full fine-tuning on an H100, and ahead of TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# ../shared beside the clone; on the GPU machine a carried copy (benchmarks/gpu_session.sh)
SHARED = Path(os.environ.get("SFTPIPE_SHARED", ROOT.parent / "shared"))
TOKENIZER = SHARED / "tokenizers" / "llama2"
DATA = SHARED / "data" / "alpaca_en_demo.json"
BIN = Path(sys.executable).parent


def cli(name: str) -> list[str]:
    """A console script, or ``python -m`` where the project is only on PYTHONPATH (the GPU
    machine runs the tree as sent, not installed)."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


SEED = 42

QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# --smoke: the same code paths on CPU with shapes a laptop runs in seconds
SMOKE = {**QWEN25_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
SMOKE.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=32064)

LORA = {"lora_rank": 16, "lora_alpha": 32, "lora_target": "all"}
# name -> config overrides for `sfttrain run` (all bf16; flash variants need flash-attn)
VARIANTS: dict[str, dict] = {
    "full-sdpa": {"finetuning_type": "full"},
    "full-flash": {"finetuning_type": "full", "attn_implementation": "flash_attention_2"},
    "full-flash-liger": {
        "finetuning_type": "full",
        "attn_implementation": "flash_attention_2",
        "use_liger_kernel": True,
    },
    "full-flash-liger-compile": {
        "finetuning_type": "full",
        "attn_implementation": "flash_attention_2",
        "use_liger_kernel": True,
        "torch_compile": True,
    },
    # flex attention: PyTorch's block-sparse kernel with a per-record BlockMask, no flash-attn
    "full-flex": {"finetuning_type": "full", "attn_implementation": "flex_attention"},
    "full-flex-liger-compile": {
        "finetuning_type": "full",
        "attn_implementation": "flex_attention",
        "use_liger_kernel": True,
        "torch_compile": True,
    },
    "lora-sdpa": {"finetuning_type": "lora", **LORA},
    "lora-flex": {"finetuning_type": "lora", **LORA, "attn_implementation": "flex_attention"},
    "lora-flash": {
        "finetuning_type": "lora",
        **LORA,
        "attn_implementation": "flash_attention_2",
    },
    "lora-flash-liger-compile": {
        "finetuning_type": "lora",
        **LORA,
        "attn_implementation": "flash_attention_2",
        "use_liger_kernel": True,
        "torch_compile": True,
    },
    "trl-full": {"trl": "full"},
    "trl-lora": {"trl": "lora"},
}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"bench_gpu: step failed ({r.returncode}): {' '.join(cmd[:6])} …")
    return r


def make_model(out: Path, shape: dict) -> int:
    """Random-init Qwen2 (seeded), fp32 safetensors + the Llama-2 tokenizer.model beside it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(Qwen2Config(**shape)).float()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out), safe_serialization=True)
    shutil.copyfile(TOKENIZER / "tokenizer.model", out / "tokenizer.model")
    return sum(p.numel() for p in model.parameters())


def prepare(work: Path, *, seq_len: int, shape: dict, records: int | None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    conv, shards, model = work / "alpaca.jsonl", work / "shards", work / "model"
    sh([*cli("sftdata"), "convert", str(DATA), "-o", str(conv)])
    if records is not None:
        lines = conv.read_text(encoding="utf-8").splitlines()[:records]
        conv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # the model folder first: the shards are packed with ITS tokenizer (identity checked at train)
    params = make_model(model, shape)
    shutil.rmtree(shards, ignore_errors=True)
    sh(
        [
            *cli("sftdata"),
            "pack",
            str(conv),
            "-o",
            str(shards),
            "--tokenizer",
            str(model),
            "--template",
            "llama2",
            "--seq-len",
            str(seq_len),
        ]
    )
    return {"conversations": conv, "shards": shards, "model": model, "parameters": params}


def run_ours(name: str, overrides: dict, prep: dict, a: argparse.Namespace, work: Path) -> dict:
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    values = {
        "bf16": not a.smoke,
        "max_steps": a.warmup + a.steps,
        "logging_steps": 1,
        "save_steps": 0,
        "per_device_train_batch_size": a.batch_size,
        "gradient_accumulation_steps": a.accumulation,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "report_to": "none",
        "gradient_checkpointing": a.gradient_checkpointing,
        **overrides,
    }
    if a.peak_tflops:
        values["peak_tflops"] = a.peak_tflops
    sets = [
        x
        for k, v in values.items()
        for x in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")
    ]
    cmd = [*cli("sfttrain"), "run", str(prep["shards"]), "-o", str(out)]
    cmd += ["--model", str(prep["model"]), "--no-progress", *sets]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        # e.g. flash-attn or liger missing: one line from sfttrain; record it, go on
        return {"variant": name, "skipped": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    rows = [
        json.loads(x)
        for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if '"loss"' in x
    ]
    measured = [row for row in rows if row["step"] > a.warmup]
    mfus = [row["mfu"] for row in measured if row.get("mfu") is not None]
    return {
        "variant": name,
        "trained_tokens_per_s": statistics.median(row["tokens_per_s"] for row in measured),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_mem_mb": max(row["peak_mem_mb"] for row in measured),
        "last_loss": measured[-1]["loss"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def run_trl(name: str, mode: str, prep: dict, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_trl-child", str(prep["conversations"])]
    cmd += [str(prep["model"]), "--mode", mode, "--seq-len", str(a.seq_len)]
    cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup)]
    cmd += ["--batch-size", str(a.batch_size), "--accumulation", str(a.accumulation)]
    if a.smoke:
        cmd.append("--cpu")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"variant": name, "skipped": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return {"variant": name, **json.loads(r.stdout.strip().splitlines()[-1])}


def trl_child(argv: list[str]) -> None:
    """TRL SFTTrainer on the same model and records (packing, assistant-only loss, bf16)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("conversations")
    ap.add_argument("model_dir")
    ap.add_argument("--mode", choices=("lora", "full"), required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--accumulation", type=int, required=True)
    ap.add_argument("--cpu", action="store_true")
    a = ap.parse_args(argv)

    import tempfile

    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(HERE))
    from train_trl import trl_inputs  # the same tokenizer set-up and rows as the CPU benchmark

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok, rows = trl_inputs(a.model_dir, a.conversations)
    flash = not a.cpu and _has("flash_attn")
    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir,
        dtype=torch.float32,
        attn_implementation="flash_attention_2" if flash else "sdpa",
        local_files_only=True,
    )
    peft_config = None
    if a.mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"
        )
    times: list[float] = []
    tokens: list[int] = []
    pending = [0]

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not a.cpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            tokens.append(pending[0])
            pending[0] = 0

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            pending[0] += int((inputs["labels"][..., 1:] != -100).sum())
            return super().training_step(model, inputs, *args, **kwargs)

    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            output_dir=out,
            max_length=a.seq_len,
            packing=True,
            packing_strategy="bfd",
            padding_free=flash,
            assistant_only_loss=True,
            per_device_train_batch_size=a.batch_size,
            gradient_accumulation_steps=a.accumulation,
            max_steps=a.warmup + a.steps,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            gradient_checkpointing=False,
            report_to=[],
            disable_tqdm=True,
            bf16=not a.cpu,
            use_cpu=a.cpu,
            seed=SEED,
        )
        trainer = Counting(
            model=model,
            args=cfg,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[Clock()],
        )
        trainer.train()
    w = a.warmup
    seconds = times[-1] - times[w - 1]
    result = {
        "attn": "flash_attention_2" if flash else "sdpa",
        "trained_tokens_per_s": sum(tokens[w:]) / seconds,
        "peak_mem_mb": None if a.cpu else torch.cuda.max_memory_allocated() / 2**20,
    }
    print(json.dumps(result))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def table(results: list[dict]) -> str:
    lines = ["| variant | trained tok/s | MFU | peak mem (MB) | note |", "|---|---:|---:|---:|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | – | – | – | not run: {r['skipped']} |")
            continue
        m = r.get("mfu")
        mem = r.get("peak_mem_mb")
        lines.append(
            f"| {r['variant']} | {r['trained_tokens_per_s']:,.0f} | "
            f"{'–' if m is None else f'{100 * m:.1f}%'} | {'–' if mem is None else f'{mem:,.0f}'} | "
            f"{r.get('attn', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_trl-child":
        trl_child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS)
    )
    ap.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="steps before the clock starts")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1, help="packed rows per micro-batch")
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="override the device peak table"
    )
    ap.add_argument("--records", type=int, default=None, help="use only the first N records")
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "gpu"))
    ap.add_argument(
        "--smoke", action="store_true", help="CPU plumbing check: tiny shapes, seq 256, 2+2 steps"
    )
    a = ap.parse_args()

    import torch

    if a.smoke:
        a.seq_len, a.steps, a.warmup, a.accumulation = 256, 2, 2, 1
        a.records = a.records or 200
        a.peak_tflops = a.peak_tflops or 1.0  # exercises the MFU column; meaningless on a CPU
    elif not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device on this machine, nothing measured "
            "(the GPU benchmark needs one; --smoke checks the plumbing on CPU)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    for need in (TOKENIZER, DATA):
        if not need.exists():
            raise SystemExit(f"bench_gpu: needs {need} beside the project")
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(
            f"bench_gpu: unknown variant {unknown[0]!r} (one of {', '.join(VARIANTS)})"
        )
    work = Path(a.out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prep = prepare(
        work, seq_len=a.seq_len, shape=SMOKE if a.smoke else QWEN25_05B, records=a.records
    )
    device = "cpu (smoke)" if a.smoke else torch.cuda.get_device_name(0)
    results = []
    for name in names:
        spec = VARIANTS[name]
        if a.smoke and any(spec.get(k) for k in ("use_liger_kernel", "torch_compile")):
            results.append({"variant": name, "skipped": "smoke run: GPU-only option"})
            continue
        r = (
            run_trl(name, spec["trl"], prep, a)
            if "trl" in spec
            else run_ours(name, spec, prep, a, work)
        )
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
    summary = {
        "device": device,
        "model": "Qwen2.5-0.5B architecture, random init" if not a.smoke else "smoke shapes",
        "parameters": prep["parameters"],
        "seq_len": a.seq_len,
        "micro_batch": a.batch_size,
        "accumulation": a.accumulation,
        "steps": a.steps,
        "warmup": a.warmup,
        "results": results,
    }
    (work / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"device: {device}; parameters {prep['parameters']:,}; seq-len {a.seq_len}")
    print(table(results))


if __name__ == "__main__":
    main()
