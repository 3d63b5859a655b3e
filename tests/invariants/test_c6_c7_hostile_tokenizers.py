"""Hostile tokenizer files (issue 26), by class, through the real CLIs under the hostile suite's
address-space limit and timeout: a split regex that panics in the Rust library (on the template's
own probe text, or on one record only), one that backtracks just under the regex engine's retry
limit, a normalizer whose chained replacements grow text without end (on every text, or on one
record only), and files that do not parse. Each ends as one ``Error:`` line naming the tokenizer
or the record and what went wrong: no abort, no Rust backtrace, no traceback, nothing left.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sftdata
from tests.invariants.test_c6_c7_hostile_input import Case, _jsonl, _record, run_case

TINY = Path(sftdata.__file__).parent / "tiny"
BYTE_LEVEL = json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]


def _split(pattern: str) -> dict:
    split = {
        "type": "Split",
        "pattern": {"Regex": pattern},
        "behavior": "Isolated",
        "invert": False,
    }
    return {"type": "Sequence", "pretokenizers": [split, BYTE_LEVEL]}


def _grows(needle: str, times: int = 12) -> dict:
    """Chained replacements that multiply every ``needle`` by 10 ** ``times``."""
    step = {"type": "Replace", "pattern": {"String": needle}, "content": needle * 10}
    return {"type": "Sequence", "normalizers": [step] * times}


def _tokenizer(folder: Path, **parts: Any) -> str:
    """The tiny tokenizer copied to ``folder/tok`` with ``parts`` of its tokenizer.json replaced
    (a string: the whole file's text)."""
    out = folder / "tok"
    shutil.copytree(TINY, out)
    doc = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    text = parts.pop("text", None)
    doc.update(parts)
    (out / "tokenizer.json").write_text(
        text if isinstance(text, str) else json.dumps(doc), encoding="utf-8"
    )
    return "tok"


# one record of many runs of "a" (backtracks), one with "zq" in it (grows), one ending "zzz…!"
BACKTRACKS = " ".join(["a" * 22] * 200)
RECORDS = [json.dumps(_record(0)), json.dumps(_record(1, "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz!")),
           json.dumps(_record(2, f"zq {BACKTRACKS}"))]  # fmt: skip

COMMANDS: dict[str, Callable[[str, str], list[str]]] = {
    "pack": lambda f, t: ["sftdata", "pack", f, "-o", "out", "--tokenizer", t, "--template", "chatml", "--seq-len", "2048"],
    "stats": lambda f, t: ["sftdata", "stats", f, "--tokenizer", t, "--template", "chatml"],
}  # fmt: skip

SMALL = {"SFTPIPE_WORKER_MEMORY_MB": "512", "SFTPIPE_WORKER_CPU_S": "3,0.5"}
"""Bounds low enough for a case to reach them in seconds."""
HOSTILE = r"tok: a broken or hostile tokenizer or template: "
Z_TEMPLATE = (
    "{{ 'zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz!' }}{% for m in messages %}<|im_start|>"
    "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOKENIZERS: dict[str, tuple[dict, str]] = {
    # what the template writes around every record already sets it off (checked before any
    # record, in the process that would report it)
    "regex-panics-on-the-templates-text": ({"pre_tokenizer": _split(r"(z|z?)+$"), "template": Z_TEMPLATE}, HOSTILE + r".*failed: the tokenizer panicked \(Onig: .*retry-limit-in-match over\)$"),
    "normalizer-grows-every-text": ({"normalizer": _grows("e")}, HOSTILE + r".*took more than 512 MB of memory"),
    # only one record holds what sets it off
    "regex-panics-on-one-record": ({"pre_tokenizer": _split(r"(z|z?)+$")}, r"data\.jsonl:2: record 'r1': tokenizing it failed: the tokenizer panicked \(Onig: .*retry-limit-in-match over\)"),
    "regex-backtracks-on-one-record": ({"pre_tokenizer": _split(r"(a+)+b")}, r"data\.jsonl:3: record 'r2': rendering and tokenizing it took more than 3\.5 CPU seconds"),
    "normalizer-grows-on-one-record": ({"normalizer": _grows("zq", 9)}, r"data\.jsonl:3: record 'r2': rendering and tokenizing it took more than 512 MB of memory"),
    # files that do not load
    "regex-that-does-not-compile": ({"pre_tokenizer": _split("(unclosed")}, r"tok: not a usable tokenizer"),
    "tokenizer-json-truncated": ({"text": json.dumps(BYTE_LEVEL)[:30]}, r"tok: not a usable tokenizer"),
}  # fmt: skip


def _case(name: str, command: str) -> Case:
    parts, expect = TOKENIZERS[name]

    parts = dict(parts)
    template = parts.pop("template", None)

    def make(folder: Path) -> list[str]:
        argv = COMMANDS[command](_jsonl(folder, RECORDS), _tokenizer(folder, **parts))
        if template is not None:
            (folder / "t.jinja").write_text(template, encoding="utf-8")
            argv[argv.index("chatml")] = "t.jinja"
        return argv

    return Case(f"{command}-{name}", make, expect, env=SMALL)


CASES = [_case(name, command) for name in TOKENIZERS for command in COMMANDS]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_hostile_tokenizer_is_one_line(case: Case, tmp_path: Path) -> None:
    r = run_case(case, tmp_path)
    assert "panicked at" not in r.stderr and "stack backtrace" not in r.stderr, r.stderr


def test_a_record_that_sets_nothing_off_packs_with_the_same_tokenizers(tmp_path: Path) -> None:
    """The hostile parts above are harmless on text that does not hold what sets them off: the
    bounds refuse what goes past them, not the tokenizer (each packs record 0 alone)."""
    import subprocess

    from tests.invariants.test_c6_c7_hostile_input import BIN

    for name in ("regex-panics-on-one-record", "regex-backtracks-on-one-record",
                 "normalizer-grows-on-one-record"):  # fmt: skip
        folder = tmp_path / name
        folder.mkdir()
        tok = _tokenizer(folder, **TOKENIZERS[name][0])
        data = _jsonl(folder, RECORDS[:1])
        r = subprocess.run(
            [str(BIN / "sftdata"), *COMMANDS["pack"](data, tok)[1:]],
            cwd=folder, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert (
            json.loads((folder / "out" / "index.json").read_text())["splits"]["train"]["rows"] == 1
        )
