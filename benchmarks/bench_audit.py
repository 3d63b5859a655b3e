"""Benchmark `sftdata audit` with every check against `sftdata pack` of the same records, in one
run: wall time, peak memory (the largest process: the main one or a worker), and the MinHash
throughput alone (records/s, one process).

Data: ../shared/data/alpaca_en_demo.json repeated 50x (49,950 records, so every record has 49
exact copies: the duplicate checks have work to do), the real Llama-2 tokenizer, the `llama2`
template, seq_len 2048, two workers; `--eval` is the original 999-record file (every record is
"contaminated": the n-gram matching runs on all of them). Prints a Markdown table for
benchmarks/README.md and writes the raw figures to bench_out/audit_results.json.

    .venv/bin/python benchmarks/bench_audit.py [--copies 50] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import BIN, ROOT, SHARED, byte_compile, run_child
from bench_pack import make_records

OUT = ROOT / "bench_out"
TOKENIZER = SHARED / "tokenizers" / "llama2"

MINHASH = """
import json, sys, time
from sftdata.audit.facts import Facts, signatures, text_facts
from sftdata.conversation import read_jsonl
convs = list(read_jsonl(sys.argv[1]))[: int(sys.argv[2])]
t0 = time.perf_counter()
for k in range(0, len(convs), 2000):  # a task's worth at a time, as the workers do
    part = convs[k : k + 2000]
    signatures(text_facts(part, [Facts(c.id, "", "", 0, "train") for c in part], ngrams=False))
print(json.dumps({"records": len(convs), "seconds": time.perf_counter() - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    byte_compile()
    OUT.mkdir(exist_ok=True)
    raw = make_records(args.copies)
    data = OUT / "audit_alpaca.jsonl"
    data.unlink(missing_ok=True)
    run_child([str(BIN / "sftdata"), "convert", str(raw), "-o", str(data)])
    common = ["--tokenizer", str(TOKENIZER), "--template", "llama2", "--seq-len", "2048",
              "--num-proc", "2"]  # fmt: skip
    evals = SHARED / "data" / "alpaca_en_demo.json"
    rows: dict[str, list[dict]] = {"pack": [], "audit": [], "audit_sampled": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        shutil.rmtree(OUT / "audit_shards", ignore_errors=True)
        rows["pack"].append(run_child([str(BIN / "sftdata"), "pack", str(data), "-o",
                                       str(OUT / "audit_shards"), *common]))  # fmt: skip
        r = run_child([str(BIN / "sftdata"), "audit", str(data), *common, "--eval", str(evals),
                       "--json", "--fail-on", "none"])  # fmt: skip
        r["report"] = json.loads(r["stdout"])
        rows["audit"].append(r)
        r = run_child([str(BIN / "sftdata"), "audit", str(data), *common, "--eval", str(evals),
                       "--json", "--fail-on", "none", "--sample", "10000"])  # fmt: skip
        rows["audit_sampled"].append(r)
    mh = run_child([str(BIN / "python"), "-c", MINHASH, str(data), "10000"])
    minhash = json.loads(mh["stdout"])
    best = {k: min(v, key=lambda x: x["seconds"]) for k, v in rows.items()}
    report = best["audit"]["report"]
    counts = {c["name"]: c["count"] for c in report["checks"]}
    results = {
        "records": report["records"],
        "pack_s": best["pack"]["seconds"], "audit_s": best["audit"]["seconds"],
        "ratio": best["audit"]["seconds"] / best["pack"]["seconds"],
        "audit_sampled_s": best["audit_sampled"]["seconds"],
        "audit_sampled_peak_mb": max(x["peak_rss_mb"] for x in rows["audit_sampled"]),
        "ratio_sampled": best["audit_sampled"]["seconds"] / best["pack"]["seconds"],
        "pack_peak_mb": max(x["peak_rss_mb"] for x in rows["pack"]),
        "audit_peak_mb": max(x["peak_rss_mb"] for x in rows["audit"]),
        "audit_tree_mb": max(x["peak_tree_rss_mb"] for x in rows["audit"]),
        "minhash_records_per_s": minhash["records"] / minhash["seconds"],
        "counts": counts, "date": time.strftime("%Y-%m-%d"),
        "each_run_s": {k: [round(x["seconds"], 2) for x in v] for k, v in rows.items()},
    }  # fmt: skip
    (OUT / "audit_results.json").write_text(json.dumps(results, indent=2))
    print(f"| step | records | wall s (best of {args.repeats}) | peak RSS MB (largest process) |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| sftdata pack | {results['records']:,} | {results['pack_s']:.1f} | {results['pack_peak_mb']:.0f} |"
    )
    print(
        f"| sftdata audit (all checks, --eval) | {results['records']:,} | {results['audit_s']:.1f} | {results['audit_peak_mb']:.0f} |"
    )
    print(
        f"| sftdata audit --sample 10000 | {results['records']:,} | {results['audit_sampled_s']:.1f} | {results['audit_sampled_peak_mb']:.0f} |"
    )
    print(
        f"\naudit / pack: {results['ratio']:.2f}x ({results['ratio_sampled']:.2f}x with --sample 10000); MinHash alone: {results['minhash_records_per_s']:,.0f} records/s (one process)"
    )
    print("counts: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print("each run (s, in order): " + json.dumps(results["each_run_s"]))


if __name__ == "__main__":
    main()
