"""Memory of the main pack process stays flat in the number of records (issue 15): what it keeps
per record is a few bytes of arrays (lengths, owners, the row plan); tokens, masks, spill offsets
and record ids live in the spill files the shard writers read. Measured as the peak RSS of a
fresh process packing the real Alpaca set repeated 20,000 and 100,000 times over (with its own
ids), two workers."""

from __future__ import annotations

import json
import subprocess
import sys

from sftdata.convert import convert
from tests.sfttrain_helpers import ROOT, subprocess_env

# A first small pack imports everything and loads the tokenizer (transformers and torch: most
# of the process's memory); then the peak is reset (Linux: clear_refs 5 resets VmHWM) so the
# figure is the real pack's own high-water mark.
MEASURE = """
import json, sys
from sftdata.pack import PackOptions, pack
warm, src, out = sys.argv[1:4]
# chunk_size below both sizes' automatic task size, so both run the same tasks
opts = PackOptions(seq_len=1024, tokenizer="tiny", num_proc=2, chunk_size=500)
pack([warm], out + ".warm", opts)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
report = pack([src], out, opts)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"peak_kb": int(status["VmHWM"].split()[0]), "records": report.records_in}))
"""


def _repeat(base, path, n: int) -> None:
    lines = base.read_text(encoding="utf-8").splitlines()
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            rec = json.loads(lines[i % len(lines)])
            rec["id"] = f"alpaca-{i}"
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _peak_mb(warm, src, out) -> tuple[float, int]:
    r = subprocess.run([sys.executable, "-c", MEASURE, str(warm), str(src), str(out)], capture_output=True,
                       text=True, env=subprocess_env(), cwd=ROOT, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return got["peak_kb"] / 1024, got["records"]


def test_the_main_process_stays_flat_from_20k_to_100k_records(shared_data, tmp_path) -> None:
    base = tmp_path / "alpaca.jsonl"
    convert([shared_data / "alpaca_en_demo.json"], base)
    _repeat(base, tmp_path / "warm.jsonl", 200)
    # once, so the tokenizer cache exists: then no measured process imports transformers
    _peak_mb(tmp_path / "warm.jsonl", tmp_path / "warm.jsonl", tmp_path / "first")
    peaks = {}
    for n in (20_000, 100_000):
        _repeat(base, tmp_path / f"in{n}.jsonl", n)
        peaks[n], records = _peak_mb(
            tmp_path / "warm.jsonl", tmp_path / f"in{n}.jsonl", tmp_path / f"out{n}"
        )
        assert records == n
    # Held per record before the spill of ids and offsets: ~330 bytes (26 MB more at 100k);
    # now ~16. The allowance covers the allocator's run-to-run noise (a few MB).
    assert peaks[100_000] - peaks[20_000] < 10, peaks
