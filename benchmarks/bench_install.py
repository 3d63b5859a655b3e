"""Benchmark the installs (issue 25): size on disk and install time of the slim install
(`pip install sftpipe`: the data half) and of `sftpipe[train]` (CPU torch pinned first), each in a
fresh virtual environment from the wheel of this checkout; then `sftdata --help` and
`sftdata validate` on 49,950 records in each (median of three, process start included).

    .venv/bin/python benchmarks/bench_install.py     # a few minutes; needs the package registry
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import BIN, ROOT, SHARED, run_child

OUT = ROOT / "bench_out"


def _timed(cmd: list[str], **kw: object) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t0


def _size_mb(folder: Path) -> int:
    out = subprocess.run(["du", "-sm", str(folder)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _median(cmd: list[str], n: int = 3) -> float:
    return sorted(_timed(cmd) for _ in range(n))[n // 2]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sftpipe-install-"))
    subprocess.run(
        [str(BIN / "pip"), "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(ROOT)],
        check=True,
    )
    wheel = next((work / "dist").glob("sftpipe-*.whl"))
    data = OUT / "alpaca_x50.jsonl"
    if not data.exists():
        src = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
        raw = OUT / "alpaca_x50.json"
        raw.write_text(json.dumps(src * 50, ensure_ascii=False), encoding="utf-8")
        run_child([str(BIN / "sftdata"), "convert", str(raw), "-o", str(data)])
    rows = []
    for name, steps in (
        ("slim: pip install sftpipe", [[str(wheel)]]),
        ("train: pip install torch==2.13.0, then sftpipe[train]",
         [["torch==2.13.0"], [f"{wheel}[train]"]]),
    ):  # fmt: skip
        venv = work / name.split(":")[0]
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", "--upgrade", "pip"], check=True)
        seconds = sum(_timed([str(venv / "bin/pip"), "install", "-q", *s]) for s in steps)
        packages = subprocess.run(
            [str(venv / "bin/pip"), "list", "--format", "json"], capture_output=True, text=True,
            check=True,
        ).stdout  # fmt: skip
        help_s = _median([str(venv / "bin/sftdata"), "--help"])
        validate_s = _median([str(venv / "bin/sftdata"), "validate", str(data)])
        rows.append(
            f"| {name} | {len(json.loads(packages))} | {_size_mb(venv):,} | {seconds:.0f} | "
            f"{help_s:.2f} | {validate_s:.2f} |"
        )
    print(
        "| install | packages | size on disk (MB) | install time (s) | `sftdata --help` (s) | "
        "`sftdata validate`, 49,950 records (s) |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
