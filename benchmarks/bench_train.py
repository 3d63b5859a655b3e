"""Benchmark `sfttrain run` on CPU against a bare PyTorch loop and TRL's SFTTrainer, in one run.

Set-up (DESIGN §6): a small Llama-2-shaped model (hidden 256, 4 layers, 4 heads, intermediate
688, vocab 32000, fp32, random init with a fixed seed) saved as a local HF folder beside the real
Llama-2 tokenizer; ../shared/data/alpaca_en_demo.json through `sftdata convert` and
`sftdata pack --template llama2 --seq-len 1024`. LoRA r16 / alpha 32 on q,k,v,o and full
fine-tuning; micro-batch 1 x accumulation 4; AdamW, constant lr 1e-4, clipping at 1.0.

Each trainer runs in its own process (`_util.run_child`: wall time and peak RSS of that process):

- bare (`train_bare.py`): the reference. A plain loop over exactly the rows `sfttrain run` trains
  on, in the same order, same init; batches prepared before the clock; no logging/checkpoints.
- ours (`train_ours.py`): the real `sfttrain run` command with logging every `--logging-steps`,
  metrics.jsonl, TensorBoard events, progress bar and a checkpoint every `--save-steps` (at least
  one falls inside the measured window), timed by the loop's `on_step` callback.
- TRL (`train_trl.py`): SFTTrainer 1.16 packing the same conversations itself (BFD, assistant-only
  loss, max_length 1024), same model, LoRA config, batch, optimiser; no checkpoints.

How a figure is measured, identically for all three: the clock is read at the end of every
optimizer step; the window runs from the end of warm-up step `--warmup` to the end of the last
step (`--steps` measured steps), so start-up, model loading, data preparation and the end-of-run
save are outside it. Trained tokens = labels != -100 after the shift (what the loss sums over) of
the rows each trainer actually processed in those steps. Trained tokens/s = tokens / window.
Peak RSS = the child process's maximum resident set (whole process, start-up included).
Also checked: ours and bare log the same losses (same rows, same init), so they do the same work.

    .venv/bin/python benchmarks/bench_train.py [--warmup 2] [--steps 12] [--modes lora,full]
        [--repeat 1] [--skip-trl]

Prints a Markdown table for benchmarks/README.md; raw figures go to bench_out/train_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import BIN, ROOT, SHARED, last_json_line, run_child
from train_common import LORA, MODEL_CONFIG, TOKENIZER

OUT = ROOT / "bench_out"
WORK = OUT / "train"
SEQ_LEN = 1024
HERE = Path(__file__).resolve().parent


def prepare() -> dict:
    """Canonical JSONL, packed shards and the model folder (each step in a child process)."""
    if not TOKENIZER.is_dir():
        raise SystemExit(f"needs {TOKENIZER} beside the project")
    WORK.mkdir(parents=True, exist_ok=True)
    conv, shards, model = WORK / "alpaca.jsonl", WORK / "shards", WORK / "model"
    run_child(
        [
            str(BIN / "sftdata"),
            "convert",
            str(SHARED / "data" / "alpaca_en_demo.json"),
            "-o",
            str(conv),
        ]
    )
    shutil.rmtree(shards, ignore_errors=True)
    run_child(
        [
            str(BIN / "sftdata"),
            "pack",
            str(conv),
            "-o",
            str(shards),
            "--tokenizer",
            str(TOKENIZER),
            "--template",
            "llama2",
            "--seq-len",
            str(SEQ_LEN),
        ]
    )
    made = last_json_line(
        run_child([str(BIN / "python"), str(HERE / "train_common.py"), "make-model", str(model)])[
            "stdout"
        ]
    )
    index = json.loads((shards / "index.json").read_text(encoding="utf-8"))
    return {
        "conversations": conv,
        "shards": shards,
        "model": model,
        "parameters": made["parameters"],
        "rows": index["counts"]["rows"],
        "trained_fraction": index["counts"]["trained_tokens"] / index["counts"]["tokens"],
    }


def run_one(tool: str, mode: str, data: dict, a: argparse.Namespace) -> dict:
    """One trainer, one mode, in its own process; its JSON line plus the process's wall/peak RSS."""
    py = str(BIN / "python")
    common = ["--mode", mode, "--warmup", str(a.warmup), "--steps", str(a.steps)]
    if tool == "bare":
        cmd = [py, str(HERE / "train_bare.py"), str(data["shards"]), str(data["model"]), *common]
    elif tool == "ours":
        run_dir = WORK / f"run_{mode}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [
            py,
            str(HERE / "train_ours.py"),
            str(data["shards"]),
            str(data["model"]),
            str(run_dir),
        ]
        cmd += [*common, "--logging-steps", str(a.logging_steps), "--save-steps", str(a.save_steps)]
    else:
        cmd = [py, str(HERE / "train_trl.py"), str(data["conversations"]), str(data["model"])]
        cmd += [*common, "--logging-steps", str(a.logging_steps)]
    load_before = os.getloadavg()[0]
    r = run_child(cmd)
    res = last_json_line(r["stdout"])
    # The 1-minute load average around the run: above the core count, other jobs were competing.
    res.update(
        process_seconds=r["seconds"],
        peak_rss_mb=r["peak_rss_mb"],
        load_avg=[load_before, os.getloadavg()[0]],
    )
    print(
        f"  {mode:4} {tool:4}: {res['tokens_per_s']:8.1f} trained tokens/s "
        f"({res['trained_tokens']} in {res['measured_seconds']:.1f} s), "
        f"peak RSS {res['peak_rss_mb']:.0f} MB, process {r['seconds']:.0f} s, "
        f"load {res['load_avg'][0]:.1f}->{res['load_avg'][1]:.1f} on {os.cpu_count()} CPUs",
        file=sys.stderr,
        flush=True,
    )
    return res


def loss_gap(bare: dict, ours: dict) -> float:
    """Largest |ours - bare| over ours' logged losses (each the token-weighted mean of its window)."""
    gap, prev = 0.0, 0
    for step_s, loss in sorted(ours["losses_logged"].items(), key=lambda kv: int(kv[0])):
        step = int(step_s)
        toks = bare["step_trained_tokens"][prev:step]
        ref = sum(lo * n for lo, n in zip(bare["losses"][prev:step], toks, strict=True)) / sum(toks)
        gap, prev = max(gap, abs(loss - ref)), step
    return gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps before the clock")
    ap.add_argument("--steps", type=int, default=12, help="measured optimizer steps")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--logging-steps", type=int, default=5)
    ap.add_argument("--save-steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1, help="runs per trainer (median kept)")
    ap.add_argument("--skip-trl", action="store_true")
    a = ap.parse_args()
    if not a.warmup < a.save_steps <= a.warmup + a.steps - 1:
        raise SystemExit("--save-steps must put a checkpoint inside the measured steps")
    t0 = time.perf_counter()
    data = prepare()
    tools = ["bare", "ours"] + ([] if a.skip_trl else ["trl"])
    modes = a.modes.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(a.repeat):
        for mode in modes:
            # Alternate the order between repeats so drift in machine load spreads over all tools.
            for tool in tools if rep % 2 == 0 else tools[::-1]:
                runs.setdefault((mode, tool), []).append(run_one(tool, mode, data, a))
    best = {
        k: sorted(v, key=lambda r: r["tokens_per_s"])[len(v) // 2] for k, v in runs.items()
    }  # the median run (upper median for an even count)

    rows = []
    for mode in modes:
        bare = best[(mode, "bare")]
        trl = best.get((mode, "trl"))
        for tool in tools:
            r = best[(mode, tool)]
            rows.append(
                {
                    "mode": mode,
                    "trainer": tool,
                    "tool": r["tool"],
                    "measured_steps": r["measured_steps"],
                    "trained_tokens": r["trained_tokens"],
                    "measured_seconds": r["measured_seconds"],
                    "tokens_per_s": r["tokens_per_s"],
                    "tokens_per_s_all_repeats": [x["tokens_per_s"] for x in runs[(mode, tool)]],
                    "vs_bare": r["tokens_per_s"] / bare["tokens_per_s"],
                    "vs_trl": r["tokens_per_s"] / trl["tokens_per_s"] if trl else None,
                    "peak_rss_mb": r["peak_rss_mb"],
                    "metrics_tokens_per_s": r.get("metrics_tokens_per_s"),
                    "loss_gap_vs_bare": loss_gap(bare, r) if tool == "ours" else None,
                    "step_seconds": r["step_seconds"],
                    "load_avg": r["load_avg"],
                }
            )

    names = {
        "bare": "bare PyTorch loop (reference)",
        "ours": "`sfttrain run`",
        "trl": "TRL SFTTrainer",
    }
    print(
        f"\nCPU ({platform.processor() or platform.machine()}), seq-len {SEQ_LEN}, micro-batch 1 x "
        f"accumulation 4, {a.warmup} warm-up + {a.steps} measured steps, median of {a.repeat}\n"
    )
    print(
        "| mode | trainer | trained tokens | seconds | trained tokens/s | vs bare | vs TRL | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        vs_trl = f"{x['vs_trl']:.2f}x" if x["vs_trl"] else ""
        print(
            f"| {x['mode']} | {names[x['trainer']]} | {x['trained_tokens']:,} | "
            f"{x['measured_seconds']:.1f} | {x['tokens_per_s']:,.0f} | {x['vs_bare']:.0%} | "
            f"{vs_trl} | {x['peak_rss_mb']:,.0f} |"
        )
    loads = [v for x in rows for v in x["load_avg"]]
    print(
        f"\n1-minute load average around the runs: {min(loads):.1f}-{max(loads):.1f} on "
        f"{os.cpu_count()} CPUs (the benchmark itself adds up to ~2; more means other jobs competed)"
    )
    for x in rows:
        if x["trainer"] == "ours":
            print(
                f"\n{x['mode']}: ours' own metrics.jsonl figure (logging windows inside the measured "
                f"steps, checkpoint time excluded) {x['metrics_tokens_per_s']:,.0f} tokens/s; "
                f"logged loss vs bare loop: max |diff| {x['loss_gap_vs_bare']:.2e}"
            )
    results = {
        "format_version": 1,
        "benchmark": "sfttrain CPU training throughput",
        "settings": {
            "seq_len": SEQ_LEN,
            "micro_batch": 1,
            "accumulation": 4,
            "warmup_steps": a.warmup,
            "measured_steps": a.steps,
            "logging_steps": a.logging_steps,
            "save_steps": a.save_steps,
            "repeat": a.repeat,
            "cpus": os.cpu_count(),
            "model": MODEL_CONFIG,
            "parameters": data["parameters"],
            "lora": LORA,
            "shard_rows": data["rows"],
            "trained_fraction": data["trained_fraction"],
        },
        "results": rows,
        "raw_runs": {f"{m}/{t}": v for (m, t), v in runs.items()},
        "total_seconds": time.perf_counter() - t0,
    }
    (OUT / "train_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(
        f"\n({time.perf_counter() - t0:.0f} s in all; raw figures in {OUT / 'train_results.json'})"
    )


if __name__ == "__main__":
    main()
