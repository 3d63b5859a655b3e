"""Packing at scale (issue 15): peak memory of every process and throughput of `sftdata pack` on
the real Alpaca set repeated to 500,000 and 2,000,000 records, beside the raw batch tokenizer.

Input: ../shared/data/alpaca_en_demo.json -> `sftdata convert`, its 999 records repeated with
fresh ids. `sftdata pack --tokenizer tiny --template chatml --seq-len 1024 --num-proc 2` runs in
its own process (`_util.run_child`: the largest high-water mark of any one process, the main one
or a worker, and of them together); a small pack first fills the tokenizer cache, as a user's
second pack finds it. Throughput = tokens written / wall time of the whole command (reading,
encoding, packing, writing), against the raw fast tokenizer's tokens/s on the same rendered texts
(`raw_tokenizer.py`, first 50,000 records: its rate does not depend on how many there are).

    .venv/bin/python benchmarks/bench_pack_scale.py [--sizes 500000,2000000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import BIN, ROOT, SHARED, last_json_line, run_child

OUT = ROOT / "bench_out" / "pack_scale"


def repeat(base: Path, path: Path, n: int) -> None:
    lines = base.read_text(encoding="utf-8").splitlines()
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            rec = json.loads(lines[i % len(lines)])
            rec["id"] = f"alpaca-{i}"
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def pack_cmd(src: Path, out: Path) -> list[str]:
    return [str(BIN / "sftdata"), "pack", str(src), "-o", str(out), "--tokenizer", "tiny",
            "--template", "chatml", "--seq-len", "1024", "--num-proc", "2", "--json"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="500000,2000000")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    base = OUT / "alpaca.jsonl"
    base.unlink(missing_ok=True)
    run_child([str(BIN / "sftdata"), "convert", str(SHARED / "data" / "alpaca_en_demo.json"),
               "-o", str(base)])  # fmt: skip
    warm = OUT / "warm.jsonl"
    repeat(base, warm, 2000)
    run_child(pack_cmd(warm, OUT / "warm"))  # the tokenizer cache, once
    sample = OUT / "sample.jsonl"
    repeat(base, sample, 50_000)
    raw = last_json_line(run_child([sys.executable, str(ROOT / "benchmarks" / "raw_tokenizer.py"),
                                    str(sample), "--tokenizer", "tiny", "--template", "chatml",
                                    "--repeats", "2"])["stdout"])  # fmt: skip
    raw_tps = raw.get("tokens_per_s") or raw["tokens"] / raw["seconds"]
    rows = []
    for n in (int(x) for x in a.sizes.split(",")):
        src = OUT / f"in{n}.jsonl"
        repeat(base, src, n)
        out = OUT / f"out{n}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_child(pack_cmd(src, out))
        index = json.loads((out / "index.json").read_text())
        c = index["counts"]
        rows.append({"records": n, "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                     "peak_tree_rss_mb": r["peak_tree_rss_mb"], "tokens": c["tokens"],
                     "efficiency": c["packing_efficiency"],
                     "vs_raw": c["tokens"] / r["seconds"] / raw_tps})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        src.unlink()
    (ROOT / "bench_out" / "pack_scale_results.json").write_text(
        json.dumps({"raw": raw, "rows": rows}, indent=2)
    )
    print(f"\nraw tokenizer: {raw_tps:,.0f} tokens/s\n")
    print(
        "| records | wall (s) | peak RSS, one process (MB) | all processes (MB) | efficiency | vs raw tokenizer |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        print(
            f"| {x['records']:,} | {x['seconds']:.0f} | {x['peak_rss_mb']:.0f} | {x['peak_tree_rss_mb']:.0f} "
            f"| {x['efficiency']:.2%} | {x['vs_raw']:.0%} |"
        )


if __name__ == "__main__":
    main()
