"""Helpers shared by the benchmark scripts: run a step in a child process and measure it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BIN = Path(sys.executable).parent


def _tree_memory_kb(root: int) -> tuple[int, int]:
    """(summed VmRSS, largest VmHWM) of ``root`` and its descendants, from Linux /proc.

    VmHWM is the process's own high-water mark. (wait4's ru_maxrss is not used: Linux keeps it
    across fork + exec, so a child reports at least the benchmark script's own peak.)
    """
    total = largest = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            total += int(fields["VmRSS"].split()[0])
            largest = max(largest, int(fields["VmHWM"].split()[0]))
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, KeyError):
            continue
    return total, largest


def run_child(cmd: list[str], *, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; return wall ``seconds``, peak memory, stdout and stderr.

    Memory is sampled from /proc 10 times a second: ``peak_rss_mb`` is the largest high-water
    mark of any one process (the step or one of its workers); ``peak_tree_rss_mb`` the largest
    summed RSS of the step and its workers together, an upper bound (pages a fork shares with
    its parent count twice). Each step runs in its own process so its memory is its own.
    Output goes to temp files, not pipes, so a chatty child can never block on a full pipe.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        peaks = [0, 0]
        done = threading.Event()

        def sample() -> None:
            while True:
                total, largest = _tree_memory_kb(proc.pid)
                peaks[0], peaks[1] = max(peaks[0], total), max(peaks[1], largest)
                if done.wait(0.1):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {' '.join(cmd)}")
    return {
        "seconds": seconds,
        "peak_rss_mb": peaks[1] / 1024,
        "peak_tree_rss_mb": max(peaks) / 1024,
        "stdout": stdout,
        "stderr": stderr,
    }


def last_json_line(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output")


def byte_compile() -> None:
    """Write the project's bytecode (``__pycache__``) before any step is timed.

    ``pip install`` of a wheel compiles every module, and an editable install writes the
    bytecode on first import; but where ``PYTHONDONTWRITEBYTECODE`` is set (it is on these
    machines) an editable copy compiles its ~50 modules from source in every process, a tenth
    of a second that no user's installed copy spends. Python still reads bytecode that exists.
    """
    import compileall

    for package in ("sftdata", "sfttrain"):
        compileall.compile_dir(str(ROOT / package), quiet=1)


def machine() -> str:
    """The CPU a run was timed on, for its heading: ratios against the raw tokenizer move with it
    (benchmarks/README: the same pack code gave 75–85% on one machine, 59–68% on a slower one)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    import platform

    name = fields.get("model name") or platform.processor() or platform.machine()
    detail = [f"family {fields['cpu family']} model {fields['model']}"] if "model" in fields else []
    if "cpu MHz" in fields:
        detail.append(f"{float(fields['cpu MHz']):.0f} MHz")
    detail.append(f"{os.cpu_count()} cores")
    return f"{name} ({', '.join(detail)})"
