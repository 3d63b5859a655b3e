"""Reference: a bare PyTorch training loop over exactly the rows ``sfttrain run`` trains on.

Same model folder (same init), same LoRA config and init seed, same rows in the same order
(``sfttrain.data.StepSampler`` with the same seed, micro-batch and accumulation), fp32,
``position_ids`` + ``use_cache=False`` (records isolated), transformers' own loss on the labels
normalised by the step's trained tokens (``num_items_in_batch``), AdamW, constant lr, clipping.
Nothing else: every batch is read and converted to tensors before the clock starts; no
logging, no metrics, no checkpoints, no progress bar.

Prints one JSON line: per-step clock and trained tokens, losses (to compare with ours), summary.

    .venv/bin/python benchmarks/train_bare.py SHARDS MODEL_DIR --mode lora|full --warmup 2 --steps 12
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
    add_step_args(ap)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from sftdata.shards import ShardReader
    from sfttrain.data import StepSampler

    reader = ShardReader(a.shards, split="train")
    sampler = StepSampler(
        len(reader), micro_batch=a.batch_size, accumulation=a.accumulation, seed=SEED
    )
    total = a.warmup + a.steps
    steps = []  # per step: (micro-batches as tensors, trained tokens of the step)
    cursor = sampler.cursor_at(0)
    for _ in range(total):
        micro = []
        for rows in sampler.micro_batches(cursor):
            b = reader.get_batch(rows)
            micro.append(
                {
                    k: torch.from_numpy(b[k].astype("int64"))
                    for k in ("input_ids", "labels", "position_ids")
                }
            )
        steps.append((micro, sum(trained_in(m["labels"]) for m in micro)))
        cursor = sampler.advance(cursor)

    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    torch.manual_seed(SEED)  # the LoRA init draws from here: same seed as sfttrain => same adapter
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    times, losses = [], []
    for micro, n_tokens in steps:
        step_loss = torch.zeros(())
        for m in micro:
            out = model(
                input_ids=m["input_ids"],
                position_ids=m["position_ids"],
                labels=m["labels"],
                use_cache=False,
                num_items_in_batch=n_tokens,  # loss = sum over the micro-batch / step's tokens
            )
            out.loss.backward()
            step_loss += out.loss.detach()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
        losses.append(step_loss)

    result = {
        "tool": "bare PyTorch loop",
        "mode": a.mode,
        "threads": torch.get_num_threads(),
        "trainable_parameters": sum(p.numel() for p in params),
        "step_trained_tokens": [n for _, n in steps],
        "losses": [float(x) for x in losses],
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **summarise(times, [n for _, n in steps], warmup=a.warmup),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
