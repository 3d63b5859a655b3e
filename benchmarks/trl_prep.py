"""Baseline: TRL SFTTrainer's dataset preparation (assistant-only loss, BFD packing).

Run as its own process by bench_pack.py so its peak RSS is measured separately. Prints one
JSON line: seconds, tokens, rows, efficiency. Only TRL's preparation is timed (SFTTrainer
tokenizes and packs in its constructor); the tiny model it needs is built before the clock.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

# The same Llama-2 chat format our `--template llama2` renders, with TRL's `{% generation %}`
# markers so `assistant_only_loss=True` can find the assistant tokens.
LLAMA2_GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{% generation %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("records", help="Alpaca JSON array")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--num-proc", type=int, default=2)
    a = ap.parse_args()

    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(a.tokenizer, local_files_only=True)
    tok.pad_token = tok.unk_token
    with open(a.records, encoding="utf-8") as f:
        raw = json.load(f)
    rows = [
        {
            "messages": [
                {"role": "user", "content": (r["instruction"] + "\n\n" + r["input"]).strip()},
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in raw
    ]
    ds = datasets.Dataset.from_list(rows)
    del raw, rows
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=a.seq_len,
        )
    )
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            output_dir=out,
            max_length=a.seq_len,
            packing=True,
            packing_strategy="bfd",
            assistant_only_loss=True,
            dataset_num_proc=a.num_proc,
            report_to=[],
            bf16=False,
            use_cpu=True,
        )
        tok.chat_template = LLAMA2_GENERATION_TEMPLATE
        t0 = time.perf_counter()
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
        seconds = time.perf_counter() - t0
    train = trainer.train_dataset
    n_rows = len(train)
    lens = train["seq_lengths"] if "seq_lengths" in train.column_names else None
    tokens = (
        sum(sum(x) for x in lens) if lens is not None else sum(len(x) for x in train["input_ids"])
    )
    print(
        json.dumps(
            {
                "tool": f"trl {__import__('trl').__version__} SFTTrainer prep",
                "num_proc": a.num_proc,
                "seconds": seconds,
                "tokens": tokens,
                "rows": n_rows,
                "efficiency": tokens / (n_rows * a.seq_len),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
