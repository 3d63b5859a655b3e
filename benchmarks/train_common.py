"""What the three trainer benchmarks (bare loop, ``sfttrain run``, TRL) share: model, LoRA, optimiser.

One place for the settings so the three children cannot drift apart. Also a tiny CLI used by
``bench_train.py`` to build the benchmark model folder in its own process:

    .venv/bin/python benchmarks/train_common.py make-model OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import SHARED

TOKENIZER = SHARED / "tokenizers" / "llama2"
SEED = 42

# A small Llama-2-shaped model: its 32k output head dominates the arithmetic (DESIGN §6).
MODEL_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
}

LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# The same optimiser in all three: AdamW, constant lr (no warm-up: the measured steps must not
# depend on the schedule), no weight decay, global-norm clipping at 1.0 (TRL's and our default).
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0


def add_step_args(ap: argparse.ArgumentParser) -> None:
    """The measurement options every trainer script shares (set by bench_train.py)."""
    ap.add_argument("--mode", choices=("lora", "full"), required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--accumulation", type=int, default=4)


def make_model(out: Path) -> None:
    """Random-init (seeded) fp32 Llama saved as safetensors + the real Llama-2 tokenizer model file.

    The tokenizer folder holds only ``tokenizer.model``; copying that one file into the model
    folder makes ``load_tokenizer(model_dir)`` build the same tokenizer the shards were packed
    with, so the trainer's tokenizer-identity check passes.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).float()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out), safe_serialization=True)
    shutil.copyfile(TOKENIZER / "tokenizer.model", out / "tokenizer.model")
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model_dir": str(out), "parameters": n_params}))


def trained_in(labels) -> int:
    """Trained tokens of an (unshifted) label tensor/array [B, L]: positions the shifted loss sums over."""
    return int((labels[..., 1:] != -100).sum())


def summarise(step_times: list[float], step_trained_tokens: list[int], *, warmup: int) -> dict:
    """Trained tokens/s over optimizer steps ``warmup+1 .. len(step_times)``.

    ``step_times[i]`` is the clock when step ``i+1`` finished and ``step_trained_tokens[i]`` the trained
    tokens that step processed; the window starts when the last warm-up step finished.
    """
    if len(step_times) <= warmup:
        raise SystemExit(f"only {len(step_times)} steps ran; need more than {warmup} warm-up steps")
    seconds = step_times[-1] - step_times[warmup - 1] if warmup else None
    if seconds is None:
        raise SystemExit("need at least one warm-up step to start the clock")
    tokens = sum(step_trained_tokens[warmup:])
    return {
        "measured_steps": len(step_times) - warmup,
        "measured_seconds": seconds,
        "trained_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step_seconds": [
            b - a for a, b in zip(step_times[warmup - 1 : -1], step_times[warmup:], strict=True)
        ],
    }


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "make-model":
        raise SystemExit("usage: train_common.py make-model OUT_DIR")
    make_model(Path(sys.argv[2]))
