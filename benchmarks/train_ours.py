"""Ours: the real ``sfttrain run`` command, in this process, with a clock on each optimizer step.

The click command runs exactly as from the shell (config parsing, shard verification, model
load, LoRA/full set-up, the loop with masks/isolation, progress bar, metrics.jsonl, TensorBoard
events, checkpoints every ``save_steps``, final weights, loss.png). The only addition is the
``on_step`` callback of ``sfttrain.train.train`` (called after each optimizer step, after that
step's logging, before that step's checkpoint), which appends ``time.perf_counter()`` to a list.
So the measured window (end of the last warm-up step -> end of the last step) includes the
logging and every checkpoint saved inside it; it excludes the end-of-run save, ``final/`` and
``loss.png``, which a run pays once, not per step.

Trained tokens per step come from the same ``StepSampler`` rows (labels != -100 after the shift)
and are cross-checked against metrics.jsonl's cumulative ``trained_tokens``; the run's own
tokens/s of the logging windows inside the measured steps is reported too (``metrics_tokens_per_s``;
it leaves checkpoint time out by design).

    .venv/bin/python benchmarks/train_ours.py SHARDS MODEL_DIR RUN_DIR --mode lora|full --warmup 2 --steps 12
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_common import (
    LEARNING_RATE,
    LORA,
    MAX_GRAD_NORM,
    SEED,
    WEIGHT_DECAY,
    add_step_args,
    summarise,
    trained_in,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("model_dir")
    ap.add_argument("run_dir")
    add_step_args(ap)
    ap.add_argument("--logging-steps", type=int, default=5)
    ap.add_argument("--save-steps", type=int, default=10)
    ap.add_argument("--profile", metavar="FILE", help="write cProfile stats of the run to FILE")
    a = ap.parse_args()
    total = a.warmup + a.steps

    import sfttrain.train as train_mod
    from sfttrain.cli import main as sfttrain_main

    times: list[float] = []
    real_train = train_mod.train

    def timed_train(*args, **kwargs):
        kwargs["on_step"] = lambda step: times.append(time.perf_counter())
        return real_train(*args, **kwargs)

    train_mod.train = timed_train  # the command imports it from the module at call time
    sets = {
        "finetuning_type": a.mode,
        "lora_rank": LORA["r"],
        "lora_alpha": LORA["lora_alpha"],
        "lora_dropout": LORA["lora_dropout"],
        "lora_target": ",".join(LORA["target_modules"]),
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM,
        "max_steps": total,
        "per_device_train_batch_size": a.batch_size,
        "gradient_accumulation_steps": a.accumulation,
        "logging_steps": a.logging_steps,
        "save_steps": a.save_steps,
        "seed": SEED,
    }
    argv = ["run", a.shards, "-o", a.run_dir, "--model", a.model_dir]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]

    def run() -> None:
        sfttrain_main.main(args=argv, prog_name="sfttrain", standalone_mode=False)

    if a.profile:
        import cProfile

        cProfile.runctx("run()", globals(), {"run": run}, a.profile)
    else:
        run()

    # Trained tokens of each step: the rows the trainer's sampler gave it.
    from sftdata.shards import ShardReader
    from sfttrain.data import StepSampler

    reader = ShardReader(a.shards, split="train", verify=False)
    sampler = StepSampler(
        len(reader), micro_batch=a.batch_size, accumulation=a.accumulation, seed=SEED
    )
    step_trained_tokens, cursor = [], sampler.cursor_at(0)
    for _ in range(total):
        step_trained_tokens.append(
            sum(trained_in(reader.get_batch(r)["labels"]) for r in sampler.micro_batches(cursor))
        )
        cursor = sampler.advance(cursor)

    metrics = [
        json.loads(ln)
        for ln in (Path(a.run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        if ln.strip()
    ]
    logged = [m for m in metrics if "loss" in m]
    if logged[-1]["trained_tokens"] != sum(step_trained_tokens):
        raise SystemExit(
            f"metrics.jsonl counts {logged[-1]['trained_tokens']} trained tokens, we count {sum(step_trained_tokens)}"
        )
    # The run's own figure: logging windows that lie wholly inside the measured steps.
    toks, secs, prev = 0, 0.0, 0
    for m in logged:  # each row covers the steps since the previous logged one
        if prev >= a.warmup:
            n = sum(step_trained_tokens[prev : m["step"]])
            toks, secs = toks + n, secs + n / m["tokens_per_s"]
        prev = m["step"]
    metrics_tps = toks / secs if secs else None
    checkpoints = sorted(p.name for p in (Path(a.run_dir) / "checkpoints").iterdir())
    result = {
        "tool": "sfttrain run",
        "mode": a.mode,
        "steps_timed": len(times),
        "step_trained_tokens": step_trained_tokens,
        "losses_logged": {m["step"]: m["loss"] for m in logged},
        "metrics_tokens_per_s": metrics_tps,
        "checkpoints": checkpoints,
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **summarise(times, step_trained_tokens, warmup=a.warmup),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
