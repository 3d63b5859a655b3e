"""Benchmark reading a shard folder from object storage against the same folder on local disk, in
one run: time to first batch and rows/s of the trainer's data path.

Data: ../shared/data/alpaca_en_demo.json repeated (450 copies: 449,550 records), packed at
seq_len 4096 with the real Llama-2 tokenizer and the default shard size: about 1 GB in ~16
shards. The object store is moto's standalone S3 server on 127.0.0.1 (the one the tests use),
the folder uploaded with `sftdata.remote.upload`. Each reading mode runs in a fresh process with
a cold cache (`SFTPIPE_CACHE`) and reads what `sfttrain run` reads, in its order: the rows of
this rank's micro-batches, step by step (micro-batch 1, accumulation 8, seed 0), for one epoch,
with no model (so the data path alone is timed, an upper bound on what a model could take):

- local, verify "full": `sfttrain run` on a local folder (every shard hashed and opened first).
- s3, fetched ahead: `sfttrain run` on a URL (index, then shards fetched in the order the
  sampler reads them, 4 at a time, each verified as it arrives; the first step waits for its own).
- s3, whole folder first: every shard fetched and verified before the first step (what
  `sftdata inspect`/`stats` do, and what `sfttrain run` did before fetching ahead).

Time to first batch counts from after the imports to the first micro-batch's rows in memory.
Prints a Markdown table for benchmarks/README.md; raw figures in bench_out/remote_results.json.

    .venv/bin/python benchmarks/bench_remote.py [--copies 450] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import BIN, ROOT, SHARED, last_json_line, run_child
from bench_pack import make_records

OUT = ROOT / "bench_out"
TOKENIZER = SHARED / "tokenizers" / "llama2"

READ = r"""
import json, sys, time
t0 = time.perf_counter()
from sftdata.remote import RemoteFolder, localize
from sftdata.shards import ShardReader
from sfttrain.data import Cursor, StepSampler, shards_in_order
where, mode = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if mode == "local":
    reader = ShardReader(where, verify="full")
elif mode == "whole":
    reader = ShardReader(localize(where), verify="size")  # each shard verified as it was fetched
else:
    folder = RemoteFolder(where)
    reader = ShardReader(folder.path, verify="lazy", fetch=folder.fetch)
sampler = StepSampler(len(reader), micro_batch=1, accumulation=8, seed=0)
cursor = Cursor()
reader.prefetch(shards_in_order(reader, sampler, cursor, sampler.steps_per_epoch))
first = None
rows = 0
for _ in range(sampler.steps_per_epoch):
    for batch in sampler.micro_batches(cursor):
        b = reader.get_batch(batch)
        rows += len(batch)
        if first is None:
            first = time.perf_counter() - start
    cursor = sampler.advance(cursor)
epoch = time.perf_counter() - start
again = time.perf_counter()  # a second epoch: every shard here, the steady state
cursor = Cursor(1, 0)
for _ in range(sampler.steps_per_epoch):
    for batch in sampler.micro_batches(cursor):
        b = reader.get_batch(batch)
    cursor = sampler.advance(cursor)
steady = time.perf_counter() - again
print(json.dumps({"first_batch_s": first, "epoch_s": epoch, "rows": rows,
                  "steady_rows_per_s": rows / steady, "shards": reader.shard_count,
                  "imports_s": start - t0}))
"""


def _pack(copies: int) -> Path:
    shards = OUT / f"remote_shards_x{copies}"
    if (shards / "index.json").is_file():
        return shards
    raw = make_records(copies)
    data = OUT / f"remote_alpaca_x{copies}.jsonl"
    data.unlink(missing_ok=True)
    run_child([str(BIN / "sftdata"), "convert", str(raw), "-o", str(data)])
    run_child([str(BIN / "sftdata"), "pack", str(data), "-o", str(shards), "--tokenizer",
               str(TOKENIZER), "--template", "llama2", "--seq-len", "4096", "--num-proc", "2"])  # fmt: skip
    return shards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=450)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    shards = _pack(args.copies)
    size = sum(p.stat().st_size for p in shards.iterdir())

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}",
                      AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    import fsspec

    from sftdata.remote import upload

    fsspec.filesystem("s3").mkdir("bench")
    url = "s3://bench/shards"
    t0 = time.perf_counter()
    upload(shards, url)
    upload_s = time.perf_counter() - t0
    modes = {"local": str(shards), "ahead": url, "whole": url}
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):  # interleaved, so every mode sees the same machine
        for mode, where in modes.items():
            cache = OUT / "remote_cache"
            shutil.rmtree(cache, ignore_errors=True)
            r = run_child([str(BIN / "python"), "-c", READ, where, mode],
                          env={"SFTPIPE_CACHE": str(cache)})  # fmt: skip
            rows[mode].append({**last_json_line(r["stdout"]), "peak_rss_mb": r["peak_rss_mb"]})
    server.stop()
    best = {m: min(v, key=lambda x: x["first_batch_s"]) for m, v in rows.items()}
    results = {"bytes": size, "upload_s": upload_s, "runs": rows, "date": time.strftime("%Y-%m-%d")}
    (OUT / "remote_results.json").write_text(json.dumps(results, indent=2))
    shard_count = best["local"]["shards"]
    print(f"{size / 1e9:.2f} GB in {shard_count} shards, {best['local']['rows']:,} rows of 4096 "
          f"tokens; upload to the local S3 server {upload_s:.1f} s ({size / 1e6 / upload_s:,.0f} MB/s)\n")  # fmt: skip
    print(f"| reading | time to first batch s (best of {args.repeats}) | first epoch s | "
          "steady rows/s, second epoch (each run) | peak RSS MB |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: |")
    names = {"local": "local disk, verify full (`sfttrain run` on a folder)",
             "ahead": "s3, fetched ahead (`sfttrain run` on a URL)",
             "whole": "s3, whole folder first"}  # fmt: skip
    for mode, name in names.items():
        b = best[mode]
        steady = " / ".join(f"{x['steady_rows_per_s']:,.0f}" for x in rows[mode])
        print(f"| {name} | {b['first_batch_s']:.2f} | {b['epoch_s']:.1f} | {steady} | "
              f"{max(x['peak_rss_mb'] for x in rows[mode]):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
