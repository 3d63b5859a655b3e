"""Inputs and outputs that are streams, not files (issue 11, class 3): standard input, pipes,
``<(...)``, FIFOs, ``-o -``, links; and SIGTERM leaving nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RECORDS = [
    {"instruction": f"Question {i}? " + "words " * 300, "output": f"Answer {i}."}
    for i in range(300)
]
RAW = json.dumps(RECORDS)


def sftdata(*args: str, cwd: Path, stdin: str | None = None, shell: bool = False):
    cmd = " ".join(args) if shell else [str(BIN / "sftdata"), *args]
    return subprocess.run(
        cmd, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120, shell=shell,
        executable="/bin/bash" if shell else None,
    )  # fmt: skip


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_convert_reads_standard_input_whole(tmp_path: Path) -> None:
    r = sftdata("convert", "-", "-o", "out.jsonl", cwd=tmp_path, stdin=RAW)
    assert r.returncode == 0, r.stderr
    out = _records(tmp_path / "out.jsonl")
    # every record, the first 8 KB included (sniffing must not eat the stream's head)
    assert [c["messages"][1]["content"] for c in out] == [r["output"] for r in RECORDS]
    assert out[0]["source"]["file"] == "<stdin>"


def test_convert_reads_process_substitution_and_fifo(tmp_path: Path) -> None:
    (tmp_path / "raw.json").write_text(RAW, encoding="utf-8")
    r = sftdata(
        str(BIN / "sftdata"),
        "convert",
        "<(cat raw.json)",
        "-o",
        "a.jsonl",
        cwd=tmp_path,
        shell=True,
    )
    assert r.returncode == 0, r.stderr
    assert len(_records(tmp_path / "a.jsonl")) == len(RECORDS)

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(RAW, encoding="utf-8"))
    writer.start()
    r = sftdata("convert", "in.fifo", "-o", "b.jsonl", cwd=tmp_path)
    writer.join(timeout=30)
    assert r.returncode == 0, r.stderr
    assert len(_records(tmp_path / "b.jsonl")) == len(RECORDS)


def test_pack_and_stats_read_standard_input_as_the_file(tmp_path: Path) -> None:
    (tmp_path / "raw.json").write_text(RAW, encoding="utf-8")
    assert sftdata("convert", "raw.json", "-o", "data.jsonl", cwd=tmp_path).returncode == 0
    data = (tmp_path / "data.jsonl").read_text(encoding="utf-8")
    pack = ["-o", "shards", "--tokenizer", "tiny", "--seq-len", "2048"]
    r = sftdata("pack", "-", *pack, cwd=tmp_path, stdin=data)
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "shards" / "index.json").read_text(encoding="utf-8"))
    assert [i["file"] for i in index["inputs"]] == ["<stdin>"]  # not the private copy's name
    # the same bytes from the file: same fingerprint, so the shards are already up to date
    r = sftdata("pack", "data.jsonl", *pack, cwd=tmp_path)
    assert r.returncode == 0 and "already up to date" in r.stderr, r.stdout + r.stderr

    stats = ["--tokenizer", "tiny", "--seq-len", "2048"]
    from_file = sftdata("stats", "data.jsonl", *stats, cwd=tmp_path)
    from_stdin = sftdata("stats", "-", *stats, cwd=tmp_path, stdin=data)
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_stdin.stderr
    assert "records 300;" in from_stdin.stdout
    assert from_stdin.stdout.splitlines()[1:] == from_file.stdout.splitlines()[1:]


def test_a_file_in_dev_shm_is_an_ordinary_output(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        # every Linux CI machine has a writable tmpfs here; other systems have no /dev/shm
        assert sys.platform != "linux", "/dev/shm is missing or read-only"
        return
    (tmp_path / "raw.json").write_text(RAW, encoding="utf-8")
    out = shm / f"sftpipe-test-{os.getpid()}.jsonl"
    out.write_text("stale line\n", encoding="utf-8")
    try:
        r = sftdata("convert", "raw.json", "-o", str(out), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        lines = out.read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(RECORDS) and "stale" not in lines[0]  # replaced, not appended to
    finally:
        out.unlink(missing_ok=True)


def test_an_error_in_standard_input_names_it(tmp_path: Path) -> None:
    r = sftdata("validate", "-", cwd=tmp_path, stdin='{"schema_version": 2, "id": "x"\n')
    assert r.returncode == 1
    assert r.stdout.startswith("<stdin>:1: invalid JSON"), r.stdout


def test_output_to_standard_output_and_into_a_fifo(tmp_path: Path) -> None:
    (tmp_path / "raw.json").write_text(RAW, encoding="utf-8")
    r = sftdata("convert", "raw.json", "-o", "-", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == len(RECORDS)
    assert "wrote 300 records" in r.stderr  # the report goes to stderr, the data to stdout

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text(encoding="utf-8")))
    reader.start()
    r = sftdata("convert", "raw.json", "-o", "out.fifo", cwd=tmp_path)
    reader.join(timeout=30)
    assert r.returncode == 0, r.stderr
    assert len(got[0].splitlines()) == len(RECORDS)
    assert fifo.is_fifo()  # written into, not replaced by a regular file


def test_a_linked_output_is_written_through_the_link(tmp_path: Path) -> None:
    (tmp_path / "raw.json").write_text(RAW, encoding="utf-8")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "data.jsonl").write_text("old\n", encoding="utf-8")
    (tmp_path / "data.jsonl").symlink_to(tmp_path / "store" / "data.jsonl")
    r = sftdata("convert", "raw.json", "-o", "data.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data.jsonl").is_symlink()
    assert len(_records(tmp_path / "store" / "data.jsonl")) == len(RECORDS)


def test_sigterm_during_convert_leaves_nothing(tmp_path: Path) -> None:
    big = [RECORDS[i % len(RECORDS)] for i in range(30_000)]
    (tmp_path / "raw.json").write_text(json.dumps(big), encoding="utf-8")
    p = subprocess.Popen(
        [str(BIN / "sftdata"), "convert", "raw.json", "-o", "out.jsonl"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(n.name.startswith(".out.jsonl.") for n in tmp_path.iterdir()):
        assert time.monotonic() < deadline and p.poll() is None, "convert never started writing"
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "Traceback" not in err
    assert sorted(n.name for n in tmp_path.iterdir()) == ["raw.json"]  # no temp, no output
