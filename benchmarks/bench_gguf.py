"""Benchmark `sfttrain export --format gguf` and the exported file in llama.cpp, on CPU.

Set-up: a model with Qwen2.5-0.5B's shape built from a `Qwen2Config` (hidden 896, intermediate
4864, 24 layers, 14 heads / 2 KV heads, q/k/v biases, tied embeddings, vocab rows 151,936,
rope theta 1e6; 494M parameters, fp32, seeded random init) saved with `save_pretrained`. Its
tokenizer is the project's tiny byte-level BPE under Qwen2's split rule (4,096 tokens; the rest of
the 151,936 embedding rows are written as unused [PAD] tokens), since no real Qwen tokenizer is
available offline; the tensors are full size, so export time and file sizes are the real ones.

1. Export: `sfttrain export MODEL --format gguf --quant Q` for every type (k-quants through
   llama.cpp's quantiser, from an f16 file written first), each in its own process
   (`_util.run_child`: wall time, including loading the 2 GB model, and peak RSS); file size.
2. Speed: the same 128-token prompt, then 128 generated tokens greedily (the stop token ignored,
   so every engine makes exactly 128), on the same 2 threads:
   - llama.cpp (`llama-cpp-python`) on the q8_0, q4_k_m and f16 files: prompt tokens/s and generated
     tokens/s from its own clock around `eval` and each sampled token;
   - transformers on the fp32 HF folder: prompt (one forward) and generation (`generate` with the
     KV cache, min = max = 128 new tokens) timed the same way.

    .venv/bin/python benchmarks/bench_gguf.py [--quants f32,f16,...] [--tokens 128]

Prints a Markdown table for benchmarks/README.md; raw figures go to bench_out/gguf_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import BIN, ROOT, last_json_line, run_child

OUT = ROOT / "bench_out" / "gguf"
THREADS = 2


def build_model(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from sftdata.tokenizer import load_tokenizer
    from sfttrain.export.gguf.vocab import SPLIT_RULES

    load_tokenizer("tiny").save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    rule = next(r for r, name in SPLIT_RULES.items() if name == "qwen2")
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": rule}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = load_tokenizer(folder)
    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    model.save_pretrained(folder)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))


def prompt_ids(n: int) -> list[int]:
    from sftdata.tokenizer import load_tokenizer

    tok = load_tokenizer("tiny")
    text = " ".join(f"The quick brown fox number {i} jumps over the lazy dog." for i in range(200))
    return tok(text, add_special_tokens=False)["input_ids"][:n]


def speed_llama(path: str, n: int) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=2 * n + 8, n_threads=THREADS, n_batch=n, verbose=False)
    ids = prompt_ids(n)
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    # generate() finds the prompt already in its cache and samples at once, then feeds each
    # sampled token back itself
    for made, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1), start=1):
        if made == n:
            break
    t2 = time.perf_counter()
    llm.close()
    print(json.dumps({"prompt_tps": n / (t1 - t0), "gen_tps": n / (t2 - t1)}))


def speed_hf(folder: str, n: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(n)])
    with torch.no_grad():
        model(ids)  # warm-up
        t0 = time.perf_counter()
        model(ids)
        t1 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             min_new_tokens=n, max_new_tokens=n, pad_token_id=0)  # fmt: skip
        t2 = time.perf_counter()
    assert out.shape[1] - ids.shape[1] == n
    # generate() runs the prompt again before its first token: take that forward out
    print(json.dumps({"prompt_tps": n / (t1 - t0), "gen_tps": n / ((t2 - t1) - (t1 - t0))}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--quants",
        default="f32,f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0,q6_k,q5_k_m,q5_k_s,q4_k_m,q4_k_s,q3_k_l,"
        "q3_k_m,q3_k_s,q2_k",
    )
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--child", choices=["build", "llama", "hf"], default=None)
    ap.add_argument("--path", default=None)
    args = ap.parse_args()
    if args.child == "build":
        return build_model(Path(args.path))
    if args.child == "llama":
        return speed_llama(args.path, args.tokens)
    if args.child == "hf":
        return speed_hf(args.path, args.tokens)

    OUT.mkdir(parents=True, exist_ok=True)
    model = OUT / "model"
    me = [sys.executable, __file__]
    params = last_json_line(run_child([*me, "--child", "build", "--path", str(model)])["stdout"])
    results: dict = {"parameters": params["parameters"], "export": {}, "speed": {}}
    for q in args.quants.split(","):
        target = OUT / f"model-{q}.gguf"
        r = run_child([str(BIN / "sfttrain"), "export", str(model), "--format", "gguf",
                       "--quant", q, "-o", str(target), "--overwrite", "--json"])  # fmt: skip
        results["export"][q] = {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                                "mib": target.stat().st_size / 2**20}  # fmt: skip
        print(
            f"export {q}: {r['seconds']:.1f} s, {target.stat().st_size / 2**20:.0f} MiB", flush=True
        )
    env = {"OMP_NUM_THREADS": str(THREADS)}
    for q in ("q8_0", "q4_k_m", "f16"):
        if q in results["export"]:
            r = run_child([*me, "--child", "llama", "--path", str(OUT / f"model-{q}.gguf"),
                           "--tokens", str(args.tokens)], env=env)  # fmt: skip
            results["speed"][f"llama.cpp {q}"] = last_json_line(r["stdout"]) | {
                "peak_rss_mb": r["peak_rss_mb"]
            }
    r = run_child(
        [*me, "--child", "hf", "--path", str(model), "--tokens", str(args.tokens)], env=env
    )
    results["speed"]["transformers fp32"] = last_json_line(r["stdout"]) | {
        "peak_rss_mb": r["peak_rss_mb"]
    }
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    (ROOT / "bench_out" / "gguf_results.json").write_text(json.dumps(results, indent=2))

    print(f"\n{params['parameters'] / 1e6:.0f}M parameters\n")
    print("| `--quant` | export (s) | peak RSS (MB) | file (MiB) |\n|---|---:|---:|---:|")
    for q, e in results["export"].items():
        print(f"| {q} | {e['seconds']:.1f} | {e['peak_rss_mb']:.0f} | {e['mib']:.0f} |")
    print(
        f"\n| engine ({THREADS} threads) | prompt tokens/s | generated tokens/s | peak RSS (MB) |\n|---|---:|---:|---:|"
    )
    for name, s in results["speed"].items():
        print(f"| {name} | {s['prompt_tps']:.0f} | {s['gen_tps']:.1f} | {s['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
