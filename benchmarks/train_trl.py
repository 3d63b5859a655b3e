"""Baseline: TRL's ``SFTTrainer`` on the same model folder, conversations, LoRA config and batch.

TRL tokenizes and packs the same canonical conversations itself (``packing=True``, BFD,
``max_length`` = the shards' seq-len, ``assistant_only_loss`` through a Llama-2 chat template
with ``{% generation %}`` markers, the same one ``trl_prep.py`` uses), so its rows hold the same
records grouped differently. fp32 on CPU (``use_cpu=True``, ``bf16=False``), AdamW with the same
constant lr, clipping and no weight decay; logging every ``--logging-steps``; no checkpoints
(``save_strategy="no"``: that only flatters TRL); activation checkpointing off (SFTConfig's
default is on; ours and the bare loop run without it).

Measurement: a ``TrainerCallback`` stamps ``time.perf_counter()`` at the end of each optimizer
step; ``training_step`` is wrapped to count each micro-batch's trained tokens (labels != -100
after the shift, i.e. what the loss sums over). Dataset preparation and model loading happen in
the constructor, before the clock (they count in peak RSS only).

    .venv/bin/python benchmarks/train_trl.py CONVERSATIONS.jsonl MODEL_DIR --mode lora|full --warmup 2 --steps 12
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
from trl_prep import LLAMA2_GENERATION_TEMPLATE


def trl_inputs(model_dir: str, conversations: str) -> tuple[Any, list[dict]]:
    """The tokenizer (Llama-2 format with `{% generation %}` markers) and `messages` rows TRL gets."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.pad_token = tok.unk_token
    tok.chat_template = LLAMA2_GENERATION_TEMPLATE
    rows = []
    with open(conversations, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            rows.append(
                {
                    "messages": [
                        {"role": m["role"], "content": m["content"]} for m in rec["messages"]
                    ]
                }
            )
    return tok, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("conversations", help="canonical JSONL (sftdata convert output)")
    ap.add_argument("model_dir")
    add_step_args(ap)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--logging-steps", type=int, default=5)
    a = ap.parse_args()

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    tok, rows = trl_inputs(a.model_dir, a.conversations)
    ds = datasets.Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    peft_config = None
    if a.mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)

    times: list[float] = []
    step_trained_tokens: list[int] = []
    pending = [0]

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())
            step_trained_tokens.append(pending[0])
            pending[0] = 0

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            pending[0] += trained_in(inputs["labels"])
            return super().training_step(model, inputs, *args, **kwargs)

    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            output_dir=out,
            max_length=a.seq_len,
            packing=True,
            packing_strategy="bfd",
            assistant_only_loss=True,
            dataset_num_proc=1,
            per_device_train_batch_size=a.batch_size,
            gradient_accumulation_steps=a.accumulation,
            max_steps=a.warmup + a.steps,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=MAX_GRAD_NORM,
            logging_steps=a.logging_steps,
            save_strategy="no",
            # SFTConfig turns activation checkpointing ON by default; ours and the bare loop run
            # without it, so it is off here too (on, TRL would recompute every layer: slower still).
            gradient_checkpointing=False,
            report_to=[],
            disable_tqdm=True,
            bf16=False,
            use_cpu=True,
            seed=SEED,
        )
        trainer = CountingSFTTrainer(
            model=model,
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[Clock()],
        )
        trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "tool": f"trl {trl.__version__} SFTTrainer",
        "mode": a.mode,
        "trainable_parameters": trainable,
        "rows": len(trainer.train_dataset),
        "step_trained_tokens": step_trained_tokens,
        "losses_logged": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **summarise(times, step_trained_tokens, warmup=a.warmup),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
