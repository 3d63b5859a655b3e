"""Hostile and broken inputs, second round (issue 26), by class, through the real CLIs under the
same address-space limit and timeout as the first round (``test_c6_c7_hostile_input.run_case``):
exit ≠ 0, one ``Error:`` line naming the input and the problem, no traceback, nothing left
behind, every input unchanged.

Classes: numbers and keys JSON can spell but data cannot hold (non-finite numbers however
written, integers past 64 bits, duplicate keys) in every reader of canonical JSONL and in raw
inputs; outputs compared with what a command reads by identity, not name (links,
``/proc/self/cwd``), including what ``sfttrain export`` and ``eval`` read (the checkpoint, an
adapter's base model); checkpoint markers that verify nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import pytest

from tests.invariants.test_c6_c7_hostile_input import (
    BIN,
    GOOD,
    JSONL_COMMANDS,
    Case,
    _jsonl,
    _shards,
    _write,
    run_case,
)

# -- numbers and keys ---------------------------------------------------------------------------

BIG = "1" + "0" * 4999  # past CPython's own int-string limit (4300 digits)
NUMBER_FAULTS: dict[str, tuple[str, str]] = {
    "inf-exponent": ("1e999", r"1e999 is not a finite number"),
    "neg-inf-exponent": ("-1e999", r"-1e999 is not a finite number"),
    "int-5000-digits": (BIG, r"the integer 1000000000\d*\.\.\. \(5000 digits\) does not fit in 64 bits"),
    "int-past-64-bits": (str(1 << 64), r"the integer 18446744073709551616 does not fit in 64 bits"),
}  # fmt: skip


def _with_argument(value: str) -> str:
    rec = json.loads(GOOD[1])
    rec["messages"][1] = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 0}}}],
    }
    rec["messages"].append({"role": "tool", "content": "ok"})
    rec["messages"].append({"role": "assistant", "content": "Done."})
    return json.dumps(rec).replace('{"x": 0}', '{"x": ' + value + "}")


DUPLICATE = GOOD[1].replace('"id": "r1"', '"id": "r1", "id": "r9"')


def _number_case(fault: str, command: str) -> Case:
    value, expect = NUMBER_FAULTS[fault]
    return Case(
        f"{command}-{fault}",
        lambda d: JSONL_COMMANDS[command](_jsonl(d, [GOOD[0], _with_argument(value)])),
        r"data\.jsonl:2: .*" + expect,
        report=command == "validate",
    )


def _duplicate_case(command: str) -> Case:
    return Case(
        f"{command}-duplicate-key",
        lambda d: JSONL_COMMANDS[command](_jsonl(d, [GOOD[0], DUPLICATE])),
        r"data\.jsonl:2: .*duplicate key 'id'",
        report=command == "validate",
    )


RAW_ARRAY = (
    '[{"instruction": "q", "output": "a"},\n {"instruction": "q", "output": "a", "n": VALUE}]'
)
RAW_LINES = '{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "a", "n": VALUE}\n'


def _raw_case(kind: str, fault: str) -> Case:
    text = RAW_ARRAY if kind == "array" else RAW_LINES
    name = "raw.json" if kind == "array" else "raw.jsonl"
    if fault == "duplicate-key":
        body, expect = text.replace('"n": VALUE', '"output": "b"'), r"duplicate key 'output'"
    else:
        value, expect = NUMBER_FAULTS[fault]
        body = text.replace("VALUE", value)
    return Case(
        f"convert-{kind}-{fault}",
        lambda d: ["sftdata", "convert", _write(d, name, body), "-o", "out.jsonl"],
        name.replace(".", r"\.") + r":2: .*" + expect,
        ("out.jsonl",),
    )


NUMBER_CASES = [
    *(_number_case(f, c) for f in NUMBER_FAULTS for c in JSONL_COMMANDS),
    *(_duplicate_case(c) for c in JSONL_COMMANDS),
    *(_raw_case(k, f) for k in ("array", "lines") for f in [*NUMBER_FAULTS, "duplicate-key"]),
]

# -- outputs over what a command reads, by identity -----------------------------------------------


@cache
def _trained_run() -> Path:
    """A LoRA run of the tiny model (one step, a checkpoint), made once per test process and
    copied into each case's folder."""
    folder = Path(tempfile.mkdtemp(prefix="sftpipe-hostile-run-"))
    _shards(folder)
    steps = ["--set", "max_steps=1", "--set", "save_steps=1", "--set", "report_to=none"]
    run = ["sfttrain", "run", "shards", "--model", "tiny", "-o", "run", "--no-progress", *steps]
    subprocess.run([str(BIN / run[0]), *run[1:]], cwd=folder, check=True, capture_output=True)
    return folder


def _copy_run(folder: Path) -> None:
    src = _trained_run()
    for name in ("data.jsonl", "shards", "run"):
        if (src / name).is_dir():
            shutil.copytree(src / name, folder / name, symlinks=True)
        else:
            shutil.copy2(src / name, folder / name)


def _base_model(folder: Path) -> Path:
    """A base model folder (a small Llama saved as a user's download is) and a LoRA checkpoint
    trained on it."""
    from tests.sfttrain_helpers import small_model_dir

    _shards(folder)
    small_model_dir(folder / "base")
    steps = ["--set", "max_steps=1", "--set", "save_steps=1", "--set", "report_to=none"]
    run = ["sfttrain", "run", "shards", "--model", "base", "-o", "run", "--no-progress", *steps]
    subprocess.run([str(BIN / run[0]), *run[1:]], cwd=folder, check=True, capture_output=True)
    return folder / "base"


def _ckpt(folder: Path) -> str:
    return next((folder / "run" / "checkpoints").glob("step-*")).relative_to(folder).as_posix()


def _gguf_onto_checkpoint_weights(folder: Path) -> list[str]:
    _copy_run(folder)
    out = f"{_ckpt(folder)}/adapter_model.safetensors"
    return ["sfttrain", "export", _ckpt(folder), "--format", "gguf", "-o", out, "--overwrite"]


def _merge_onto_base(folder: Path) -> list[str]:
    _base_model(folder)
    return ["sfttrain", "export", _ckpt(folder), "--merge", "-o", "base", "--overwrite"]


def _merge_into_base(folder: Path) -> list[str]:
    _base_model(folder)
    return ["sfttrain", "export", _ckpt(folder), "--merge", "-o", "base/merged"]


def _export_over_folder_holding_checkpoint(folder: Path) -> list[str]:
    _copy_run(folder)
    return ["sfttrain", "export", _ckpt(folder), "-o", "run", "--overwrite"]


def _eval_predictions_into_shards(folder: Path) -> list[str]:
    _copy_run(folder)
    return ["sfttrain", "eval", "shards", "--model", "run/final", "--generate", "-o", "shards/p"]


def _through_link(folder: Path) -> list[str]:
    data = _jsonl(folder, GOOD)
    (folder / "alias").symlink_to(folder)  # the same folder under another name
    return ["sftdata", "convert", data, "-o", "alias/data.jsonl"]


def _pack_into_linked_input_folder(folder: Path) -> list[str]:
    _jsonl(folder, GOOD, "in/data.jsonl")
    (folder / "link").symlink_to(folder / "in")
    return ["sftdata", "pack", "in/data.jsonl", "-o", "link", "--tokenizer", "tiny", "--seq-len", "64", "--overwrite"]  # fmt: skip


OVERWRITE = r"the output would overwrite the input"
IDENTITY_CASES = [
    Case("convert-onto-input-through-proc", lambda d: ["sftdata", "convert", _jsonl(d, GOOD), "-o", "/proc/self/cwd/data.jsonl"], r"/proc/self/cwd/data\.jsonl: " + OVERWRITE + r" data\.jsonl", ()),
    Case("export-onto-input-through-proc", lambda d: ["sftdata", "export", _jsonl(d, GOOD), "--format", "openai", "-o", "/proc/self/cwd/data.jsonl"], OVERWRITE, ()),
    Case("stats-plot-onto-input-through-proc", lambda d: ["sftdata", "stats", _jsonl(d, GOOD), "--tokenizer", "tiny", "--plot", "/proc/self/cwd/data.jsonl"], OVERWRITE, ()),
    Case("convert-onto-input-through-link", _through_link, r"alias/data\.jsonl: " + OVERWRITE, ()),
    Case("pack-into-linked-input-folder", _pack_into_linked_input_folder, r"link: " + OVERWRITE + r" in/data\.jsonl", ()),
    Case("gguf-onto-the-checkpoint-it-reads", _gguf_onto_checkpoint_weights, r"adapter_model\.safetensors: " + OVERWRITE, ()),
    Case("merge-onto-the-adapters-base", _merge_onto_base, r"base: " + OVERWRITE + r" \S*base;", ()),
    Case("merge-into-the-adapters-base", _merge_into_base, r"base/merged: " + OVERWRITE + r" \S*base;", ("base/merged",)),
    Case("export-over-the-run-holding-it", _export_over_folder_holding_checkpoint, r"run: " + OVERWRITE, ()),
    Case("eval-predictions-into-the-shards", _eval_predictions_into_shards, r"shards/p: " + OVERWRITE + r" shards", ("shards/p",)),
]  # fmt: skip

# -- checkpoints that verify nothing --------------------------------------------------------------


def _marker(text: str, command: str):
    def make(folder: Path) -> list[str]:
        _copy_run(folder)
        (folder / _ckpt(folder) / "COMPLETE").write_text(text, encoding="utf-8")
        return {
            "resume": ["sfttrain", "run", "shards", "--model", "tiny", "-o", "run", "--resume", _ckpt(folder), "--no-progress", "--set", "max_steps=2", "--set", "save_steps=1", "--set", "report_to=none"],
            "eval": ["sfttrain", "eval", "shards", "--model", _ckpt(folder)],
            "export": ["sfttrain", "export", _ckpt(folder), "-o", "out"],
        }[command]  # fmt: skip

    return make


MARKERS = {
    "not-json": ("{step: 1", r"COMPLETE: not a checkpoint marker \(invalid JSON"),
    "empty-map": ('{"format_version": 1, "step": 1, "sha256": {}}', r"COMPLETE: does not record the checksum of"),
    "old-format": ("step 1\n", r"COMPLETE: an old-format marker that records no checksums"),
}  # fmt: skip
MARKER_CASES = [
    Case(f"{command}-marker-{name}", _marker(text, command), expect)
    for name, (text, expect) in MARKERS.items()
    for command in ("resume", "eval", "export")
]

# -- unbounded reads, tracebacks and unclear messages ---------------------------------------------


def _book(name: str, patch=lambda d: d, sheets: int = 1):
    """A real workbook (openpyxl) with ``sheets`` sheets, its first sheet's XML rewritten."""

    def make(folder: Path) -> list[str]:
        import io
        import zipfile

        import openpyxl

        wb = openpyxl.Workbook()
        for row in (("question", "answer"), ("q1", "a1")):
            wb.active.append(list(row))
        for k in range(1, sheets):
            wb.create_sheet(f"S{k}")
        buf = io.BytesIO()
        wb.save(buf)
        src = zipfile.ZipFile(buf)
        with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_DEFLATED) as z:
            for info in src.infolist():
                data = src.read(info)
                z.writestr(info.filename, patch(data) if "sheet1.xml" in info.filename else data)
        sheet = ["--sheet", "Nope"] if sheets > 1 else []
        return ["sftdata", "convert", name, "-o", "out.jsonl", *sheet]

    return make


def _far_row(d: bytes) -> bytes:
    import re

    d = re.sub(rb'<dimension ref="[^"]*"/>', b"", d)
    return d.replace(b'<row r="2"', b'<row r="999999999"').replace(b'2"', b'999999999"')


def _unknown_string(d: bytes) -> bytes:
    return d.replace(b'<c r="A2" t="inlineStr"><is><t>q1</t></is></c>', b'<c r="A2" t="s"><v>999</v></c>')  # fmt: skip


UNCLOSED = 'question,answer\nq1,a1\n"q2,a2\n' + "".join(f"q{i},a{i}\n" for i in range(1000))
GEN_ONLY = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ raise_exception('no prompts here') }}{% endif %}"
)


def _sparse(folder: Path, name: str, size: int) -> str:
    with open(folder / name, "wb") as f:
        f.truncate(size)  # a sparse file: no disk used, every byte reads as zero
    return name


def _link(folder: Path, name: str, target: str) -> str:
    (folder / name).symlink_to(target)
    return name


TRAIN = ["--no-progress", "--set", "max_steps=1", "--set", "report_to=none"]


def _train_with(*settings: str):
    def make(folder: Path) -> list[str]:
        _shards(folder)
        return ["sfttrain", "run", "shards", "--model", "tiny", "-o", "out", *TRAIN, *settings]

    return make


def _model_with(layers: int, hidden: int | None = None):
    """A small model folder whose config.json claims ``layers`` (and ``hidden`` size)."""

    def make(folder: Path) -> list[str]:
        from tests.sfttrain_helpers import small_model_dir

        _shards(folder)
        cfg_path = small_model_dir(folder / "model") / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["num_hidden_layers"] = layers
        if hidden is not None:
            cfg["hidden_size"] = hidden
        cfg_path.write_text(json.dumps(cfg))
        return ["sfttrain", "run", "shards", "--model", "model", "-o", "out", *TRAIN]

    return make


def _index_edit(edit, command: str = "run"):
    """Shards whose index.json is rewritten by ``edit`` (the shard files and hashes intact),
    trained on (``run``) or evaluated (``eval``)."""

    def make(folder: Path) -> list[str]:
        _shards(folder)
        index = folder / "shards" / "index.json"
        doc = json.loads(index.read_text())
        edit(doc)
        index.write_text(json.dumps(doc))
        if command == "eval":
            return ["sfttrain", "eval", "shards", "--model", "tiny"]
        return ["sfttrain", "run", "shards", "--model", "tiny", "-o", "out", *TRAIN]

    return make


def _more_rows(doc: dict) -> None:
    doc["splits"]["train"]["rows"] = 10**12
    doc["splits"]["train"]["shards"][0]["rows"] = 10**12


READ_CASES = [
    Case("model-config-with-more-layers-than-weights", _model_with(4), r"model: the folder has no weights for model\.layers\.2\."),
    Case("model-config-past-the-machines-memory", _model_with(100_000, 8192), r"model/config\.json: a model of at least [\d,.]+B parameters .* cannot be loaded"),
    Case("shard-index-claims-more-rows", _index_edit(_more_rows), r"train-00000\.arrow: [\d,]+ bytes cannot hold the 1,000,000,000,000 rows"),
    # found when the shard is first read (shards are hashed and checked lazily, so the first
    # batch does not wait for the whole split)
    Case("shard-ids-outside-the-vocabulary", _index_edit(lambda d: d["tokenizer"].update(vocab_size=3), "eval"), r"train-00000\.arrow: token id \d+ is outside the tokenizer's vocabulary \(3 ids\)", ()),
    Case("xlsx-row-past-excels-last", _book("book.xlsx", _far_row), r"book\.xlsx:Sheet: a row numbered past 1,048,576", ("out.jsonl",)),
    Case("xlsx-shared-string-past-the-table", _book("book.xlsx", _unknown_string), r"book\.xlsx:Sheet: cannot read the sheet \(IndexError", ("out.jsonl",)),
    Case("xlsx-missing-sheet-of-many", _book("book.xlsx", sheets=40), r"no sheet named 'Nope' \(sheets: 'Sheet', 'S1', .*'S9', \.\.\. \(40 in all\)\)$", ("out.jsonl",)),
    Case("csv-unclosed-quote-names-its-line", lambda d: ["sftdata", "convert", _write(d, "qa.csv", UNCLOSED), "-o", "out.jsonl"], r"qa\.csv:3: malformed CSV .*runs on to line 1003", ("out.jsonl",)),
    Case("config-from-dev-zero", lambda d: (_shards(d), ["sfttrain", "run", "shards", "--model", "tiny", "-o", "out", "-c", "/dev/zero"])[1], r"/dev/zero: larger than 64 MB \(config\)"),
    Case("dataset-info-from-dev-zero", lambda d: ["sftdata", "convert", "--dataset-info", "/dev/zero", "--dataset", "x", "-o", "out.jsonl"], r"/dev/zero: larger than 64 MB", ("out.jsonl",)),
    Case("template-past-the-size-bound", lambda d: ["sftdata", "pack", _jsonl(d, GOOD), "-o", "out", "--tokenizer", "tiny", "--seq-len", "64", "--template", _sparse(d, "big.jinja", 65 << 20)], r"big\.jinja: larger than 64 MB \(template file\)"),
    Case("template-that-is-a-device", lambda d: ["sftdata", "pack", _jsonl(d, GOOD), "-o", "out", "--tokenizer", "tiny", "--seq-len", "64", "--template", _link(d, "t.jinja", "/dev/zero")], r"t\.jinja: template file is not a regular file"),
    Case("template-fails-only-with-the-prompt", lambda d: ["sftdata", "pack", _jsonl(d, GOOD), "-o", "out", "--tokenizer", "tiny", "--seq-len", "64", "--template", _write(d, "t.jinja", GEN_ONLY)], r"data\.jsonl:1: template t\.jinja: record 'r0': TemplateError: no prompts here"),
    Case("train-seed-negative", _train_with("--set", "seed=-1"), r"seed: -1 must be in \[0, 2\*\*32\)"),
    Case("train-lora-rank-past-the-width", _train_with("--set", "lora_rank=100000000"), r"lora_rank: 100000000 is larger than the model's hidden size"),
]  # fmt: skip

CASES = [*NUMBER_CASES, *IDENTITY_CASES, *MARKER_CASES, *READ_CASES]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_round_two(case: Case, tmp_path: Path) -> None:
    run_case(case, tmp_path)


def test_a_first_write_never_touches_a_users_folder_beside_the_output(tmp_path: Path) -> None:
    """``pack`` moves an old output aside into a folder of its own: ``.NAME.old`` that a user
    keeps beside the output survives a first write and a rewrite."""
    data = _jsonl(tmp_path, GOOD)
    _write(tmp_path, ".out.old/mine.txt", "a user's own file")
    for seq_len in ("64", "128"):  # a first write, then a rebuild that replaces the output
        args = ["pack", data, "-o", "out", "--tokenizer", "tiny", "--seq-len", seq_len]
        subprocess.run([str(BIN / "sftdata"), *args], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / ".out.old" / "mine.txt").read_text() == "a user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", "data.jsonl", "out"]


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["sftdata", "convert", "-", "-o", "out.jsonl", "<&-"], "-: standard input is closed"),
        (["sftdata", "convert", "data.jsonl", "-o", "-", ">&-"], "-: standard output is closed"),
    ],
)
def test_closed_standard_streams_are_one_line(argv: list[str], expect: str, tmp_path: Path) -> None:
    _jsonl(tmp_path, GOOD)
    cmd = " ".join([str(BIN / argv[0]), *argv[1:]])
    r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True)
    errors = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert errors == [f"Error: {expect}; " + errors[0].split("; ", 1)[1]], r.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_inspect_never_sends_the_datas_control_characters_to_the_terminal(tmp_path: Path) -> None:
    rec = json.loads(GOOD[0])
    rec["id"] = "r\x1b]0;owned\x07"
    rec["messages"][1]["content"] = "\x1b[2J\x1b]8;;http://x\x07click\x1b]8;;\x07 \x9b31m"
    data = _jsonl(tmp_path, [json.dumps(rec)])
    pack = ["pack", data, "-o", "s", "--tokenizer", "tiny", "--seq-len", "128"]
    subprocess.run([str(BIN / "sftdata"), *pack], cwd=tmp_path, check=True, capture_output=True)
    r = subprocess.run(
        [str(BIN / "sftdata"), "inspect", "s", "--plain"], cwd=tmp_path, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert not any(c in r.stdout for c in "\x1b\x07\x9b"), repr(r.stdout)
    assert "\\x1b[2J" in r.stdout and "--- record r\\x1b]0;owned\\x07 (" in r.stdout
