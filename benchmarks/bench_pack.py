"""Benchmark `sftdata pack` end to end against the raw tokenizer and TRL, in one run.

Data: ~50k Alpaca records made from ../shared/data/alpaca_en_demo.json (its unique records
repeated), the real Llama-2 tokenizer, the `llama2` template; the same records on the real
Llama 3 vocabulary with the `llama3` template; and the Glaive tool-call file repeated the same
way on the real Qwen2 vocabulary with the `qwen2.5` template (tool schemas, calls and results
rendered natively) and with the folder's own template (`--template auto`). Every step runs in its
own process so its wall time and peak RSS are its own; each real-vocabulary pack is timed in
``--rounds`` rounds interleaved with the raw tokenizer on the same texts. The control-token check
(C8) is also timed alone over the same records. Prints a Markdown table for
benchmarks/README.md and writes the raw figures to bench_out/pack_results.json.

    .venv/bin/python benchmarks/bench_pack.py [--copies 50] [--skip-trl] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import BIN, ROOT, SHARED, byte_compile, last_json_line, machine, run_child

OUT = ROOT / "bench_out"
TOKENIZER = SHARED / "tokenizers" / "llama2"
CACHE = OUT / "tokenizer_cache"
"""The packs' SFTPIPE_CACHE: emptied first, so the first pack loads the tokenizer cold."""


def make_records(copies: int, name: str = "alpaca_en_demo") -> Path:
    """Write the records of ``../shared/data/NAME.json`` repeated ``copies`` times as one array.

    999 Alpaca records x 50 = 49,950, the record count of DESIGN §6's anchors.
    """
    src = json.loads((SHARED / "data" / f"{name}.json").read_text(encoding="utf-8"))
    path = OUT / f"{name.split('_')[0]}_x{copies}.json"
    path.write_text(json.dumps(src * copies, ensure_ascii=False), encoding="utf-8")
    return path


FIRST_BATCH = """
import sys, time
t0 = time.perf_counter()
from sftdata.shards import ShardReader
reader = ShardReader(sys.argv[1])
batch = reader.get_batch(list(range(8)))
assert batch["input_ids"].shape[0] == 8
print(time.perf_counter() - t0)
"""


CONTROL_CHECK = """
import json, sys, time
from sftdata.conversation import read_jsonl
from sftdata.render import ControlTokens, find_control
from sftdata.tokenizer_cache import load_snapshot
convs = list(read_jsonl(sys.argv[1]))
control = ControlTokens.of(load_snapshot(sys.argv[2]).backend_tokenizer)
t0 = time.perf_counter()
found = sum(find_control(c, control) is not None for c in convs)
print(json.dumps({"records": len(convs), "seconds": time.perf_counter() - t0, "found": found}))
"""
"""The control-token check alone (what ``--special-text refuse`` adds to rendering), in one
process over every record, to compare with a one-process pack of the same records."""


def pack(
    conv: Path,
    seq_len: int,
    num_proc: int,
    tag: str,
    *,
    note: str = "",
    tokenizer: Path = TOKENIZER,
    template: str = "llama2",
    repeats: int = 3,
) -> dict:
    """One pack step: the median wall time of ``repeats`` fresh packs (1 for a cold step)."""
    out = OUT / f"shards_{tag}"
    runs = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)  # each run packs from scratch
        runs.append(
            run_child(
                [
                    str(BIN / "sftdata"),
                    "pack",
                    str(conv),
                    "-o",
                    str(out),
                    "--tokenizer",
                    str(tokenizer),
                    "--seq-len",
                    str(seq_len),
                    "--template",
                    template,
                    "--num-proc",
                    str(num_proc),
                ],
                env={"SFTPIPE_CACHE": str(CACHE)},
            )
        )
    # The median run, as the raw tokenizer's figure is the median of its calls; memory is the
    # largest of the runs.
    r = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]
    r = {
        **r,
        "peak_rss_mb": max(x["peak_rss_mb"] for x in runs),
        "peak_tree_rss_mb": max(x["peak_tree_rss_mb"] for x in runs),
    }
    index = json.loads((out / "index.json").read_text())
    counts = index["counts"]
    return {
        "step": f"sftdata pack seq {seq_len}, num-proc {num_proc}{note}",
        "seconds": r["seconds"],
        "peak_rss_mb": r["peak_rss_mb"],
        "peak_tree_rss_mb": r["peak_tree_rss_mb"],
        "records": counts["records_in"],
        "tokens": counts["tokens"],
        "rows": counts["rows"],
        "efficiency": counts["packing_efficiency"],
        "floor_rows": -(-counts["tokens"] // seq_len),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=50)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds per real-vocabulary pack"
    )
    a = ap.parse_args()
    if not TOKENIZER.is_dir():
        raise SystemExit("needs ../shared/tokenizers/llama2 beside the project")
    OUT.mkdir(exist_ok=True)
    byte_compile()
    raw = make_records(a.copies)
    conv = OUT / f"alpaca_x{a.copies}.jsonl"
    results = []

    r = run_child([str(BIN / "sftdata"), "convert", str(raw), "-o", str(conv)])
    n_records = sum(1 for _ in conv.open(encoding="utf-8"))
    results.append(
        {
            "step": "sftdata convert",
            "seconds": r["seconds"],
            "peak_rss_mb": r["peak_rss_mb"],
            "peak_tree_rss_mb": r["peak_tree_rss_mb"],
            "records": n_records,
        }
    )

    def raw_tokenizer(
        when: str,
        data: Path = conv,
        tokenizer: Path = TOKENIZER,
        template: str = "llama2",
        into: list | None = None,
    ) -> dict:
        r = run_child(
            [
                str(BIN / "python"),
                str(ROOT / "benchmarks" / "raw_tokenizer.py"),
                str(data),
                "--tokenizer",
                str(tokenizer),
                "--template",
                template,
            ]
        )
        base = last_json_line(r["stdout"])
        step = {"step": f"raw batch tokenizer (same texts), {when}", **base}
        step["peak_tree_rss_mb"] = r["peak_tree_rss_mb"]
        (results if into is None else into).append(step)
        return step

    # The reference is measured before and after the packs; the faster of the two is used, so
    # a machine that slows down during the run cannot flatter the ratio.
    raw_first = raw_tokenizer("before the packs")

    # The first pack with a tokenizer converts it through transformers and caches a snapshot
    # (sftdata.tokenizer_cache.load_snapshot); every later one loads the snapshot.
    shutil.rmtree(CACHE, ignore_errors=True)
    results.append(
        pack(conv, 4096, 2, "4096_2_cold", note=", first use of the tokenizer", repeats=1)
    )
    for seq_len, num_proc in [(4096, 1), (4096, 2), (1024, 2)]:
        results.append(pack(conv, seq_len, num_proc, f"{seq_len}_{num_proc}"))

    r = run_child([str(BIN / "python"), "-c", FIRST_BATCH, str(OUT / "shards_4096_2")])
    first_batch_s = float(r["stdout"].strip().splitlines()[-1])

    # Peak memory must be flat in record count: the same pack on a fifth and on twice the data.
    for copies in (max(1, a.copies // 5), 2 * a.copies):
        other = OUT / f"alpaca_x{copies}.jsonl"
        run_child([str(BIN / "sftdata"), "convert", str(make_records(copies)), "-o", str(other)])
        results.append(pack(other, 4096, 2, f"4096_2_x{copies}"))

    if not a.skip_trl:
        for num_proc in (1, 2):
            r = run_child(
                [
                    str(BIN / "python"),
                    str(ROOT / "benchmarks" / "trl_prep.py"),
                    str(raw),
                    "--tokenizer",
                    str(TOKENIZER),
                    "--seq-len",
                    "4096",
                    "--num-proc",
                    str(num_proc),
                ]
            )
            t = last_json_line(r["stdout"])
            t["peak_rss_mb_process"] = r["peak_rss_mb"]
            t["peak_tree_rss_mb"] = r["peak_tree_rss_mb"]
            results.append({"step": f"TRL SFTTrainer prep seq 4096, num_proc {num_proc}", **t})

    raw_last = raw_tokenizer("after the packs")
    raw_tps = max(raw_first["tokens_per_s"], raw_last["tokens_per_s"])
    raw_rps = max(x["records"] / x["seconds"] for x in (raw_first, raw_last))

    # Real vocabularies: each pack against the raw tokenizer on its own texts.
    qwen2, llama3 = SHARED / "tokenizers" / "qwen2", SHARED / "tokenizers" / "llama3"
    glaive = OUT / f"glaive_x{a.copies}.jsonl"
    run_child(
        [
            str(BIN / "sftdata"),
            "convert",
            str(make_records(a.copies, "glaive_toolcall_en_demo")),
            "-o",
            str(glaive),
        ]
    )
    # Each real-vocabulary pack is timed in rounds interleaved with the raw tokenizer on the same
    # texts (raw, pack, raw, pack, ..., raw): the raw tokenizer's own time drifts by up to a fifth
    # within half an hour on these machines, more than the differences sought, so each pack is
    # compared with the references just before and after it (the faster of the two, so a
    # slowing machine cannot flatter it), and the line is read off the median round.
    groups: list[dict] = []
    for data, tok, template, note in (
        (glaive, qwen2, "qwen2.5", "Glaive, Qwen2 vocabulary, qwen2.5"),
        (glaive, qwen2, "auto", "Glaive, Qwen2 vocabulary, its own template (auto)"),
        (conv, llama3, "llama3", "Alpaca, Llama 3 vocabulary, llama3"),
    ):
        tag = f"{tok.name}_{template}"
        # warm: its first pack converts the tokenizer folder (what "first use" shows above)
        pack(data, 4096, 2, f"{tag}_cold", tokenizer=tok, template=template, repeats=1)
        raws: list[dict] = []
        packs: list[dict] = []
        raw_tokenizer(f"{note}, round 0", data, tok, template, raws)
        for k in range(a.rounds):
            packs.append(
                pack(
                    data,
                    4096,
                    2,
                    tag,
                    note=f", {note}",
                    tokenizer=tok,
                    template=template,
                    repeats=1,
                )
            )
            raw_tokenizer(f"{note}, round {k + 1}", data, tok, template, raws)
        ratios = [
            p["records"] / p["seconds"] / max(x["records"] / x["seconds"] for x in raws[k : k + 2])
            for k, p in enumerate(packs)
        ]
        groups.append({"data": note, "raw": raws, "packs": packs, "ratios": ratios})

    # The control-token check alone against a one-process pack of the same records.
    control_rows = []
    for data, tok, template, note in (
        (conv, llama3, "llama3", "Alpaca, Llama 3 vocabulary"),
        (glaive, qwen2, "qwen2.5", "Glaive, Qwen2 vocabulary"),
    ):
        one = pack(data, 4096, 1, f"{tok.name}_1", tokenizer=tok, template=template)
        r = run_child([str(BIN / "python"), "-c", CONTROL_CHECK, str(data), str(tok)])
        check = last_json_line(r["stdout"])
        control_rows.append(
            f"control-token check alone, {note}: {check['seconds']:.2f} s over "
            f"{check['records']:,} records ({check['found']} holding one), "
            f"{check['seconds'] / one['seconds']:.1%} of a one-process pack ({one['seconds']:.2f} s)"
        )

    cpu = machine()
    print(f"machine: {cpu}\n")
    print(
        "| step | records | tokens | seconds | records/s | tokens/s | vs raw tokenizer | rows (floor) | "
        "efficiency | peak RSS MB, largest process | peak RSS MB, all processes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in results:
        tokens = x.get("tokens")
        tps = tokens / x["seconds"] if tokens else None
        rows = f"{x['rows']} ({x.get('floor_rows', '')})" if "rows" in x else ""
        speed = f"{tps / 1e6:.3f}M" if tps else ""
        rps = f"{x['records'] / x['seconds']:,.0f}" if x.get("records") and tokens else ""
        # Records/s against the raw tokenizer on the same records: a pack tokenizes every
        # record, also those it then drops as longer than --seq-len (whose tokens it does not
        # count); where nothing is dropped this equals the tokens/s ratio.
        same = x.get("records") and "efficiency" in x
        ratio = f"{x['records'] / x['seconds'] / raw_rps:.0%}" if same else ""
        if tps and not same:
            ratio = f"{tps / raw_tps:.0%}"
        eff = f"{x['efficiency']:.2%}" if "efficiency" in x else ""
        print(
            f"| {x['step']} | {x.get('records', '')} | {tokens or ''} | {x['seconds']:.2f} | "
            f"{rps} | {speed} | {ratio} | {rows} | {eff} | {x['peak_rss_mb']:.0f} | "
            f"{x.get('peak_tree_rss_mb', 0):.0f} |"
        )
    print(
        "\n| data, vocabulary, template | records | raw tokenizer s (rounds 0..n) | pack s "
        "(rounds 1..n) | vs raw, each round | **median** | rows (floor) | efficiency | "
        "peak RSS MB, largest / all |"
    )
    print("|---|---|---|---|---|---|---|---|---|")

    def seconds(steps: list[dict]) -> str:
        return ", ".join(f"{x['seconds']:.2f}" for x in steps)

    for g in groups:
        p, ratios = g["packs"], g["ratios"]
        print(
            f"| {g['data']} | {p[0]['records']} | "
            f"{seconds(g['raw'])} | {seconds(p)} | "
            f"{', '.join(f'{r:.0%}' for r in ratios)} | **{statistics.median(ratios):.0%}** | "
            f"{p[0]['rows']} ({p[0]['floor_rows']}) | {p[0]['efficiency']:.2%} | "
            f"{max(x['peak_rss_mb'] for x in p):.0f} / {max(x['peak_tree_rss_mb'] for x in p):.0f} |"
        )
    print(
        f"\ntime to first batch (open + verify + 8 rows, imports included): {first_batch_s:.2f} s"
    )
    for line in control_rows:
        print(line)
    results.append(
        {"step": "time to first batch", "seconds": first_batch_s, "peak_rss_mb": r["peak_rss_mb"]}
    )
    (OUT / "pack_results.json").write_text(
        json.dumps([{"machine": cpu}, *results, *groups, {"control": control_rows}], indent=2)
    )


if __name__ == "__main__":
    main()
