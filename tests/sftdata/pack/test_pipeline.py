"""End-to-end `sftdata pack`: C2 masks through shards, C5 determinism, splits, overflow, C6."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sftdata import IGNORE_INDEX
from sftdata.cli import main
from sftdata.conversation import read_jsonl
from sftdata.errors import ConfigError
from sftdata.pack import PackOptions, pack
from sftdata.shards import INDEX_NAME, ShardReader, read_index
from tests.sftdata_helpers import LONG, _rec, fixture_records, write_jsonl


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", fixture_records())


def run(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def pack_ok(*args: object) -> str:
    r = run("pack", *args)
    assert r.exit_code == 0, r.output
    return r.output


def shard_hashes(folder: Path) -> dict[str, str]:
    index = read_index(folder)
    return {s["file"]: s["sha256"] for sp in index["splits"].values() for s in sp["shards"]}


def check_c2(
    folder: Path, records_path: Path, tokenizer: str, template: str, *, split: str = "train"
) -> int:
    """Decode each record's trained tokens from the shards: exactly its assistant turns + eot."""
    from sftdata.render import Renderer
    from sftdata.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    renderer = Renderer(tok, template=template)
    convs = {c.id: c for c in read_jsonl(records_path)}
    reader = ShardReader(folder, split=split, verify="full")
    checked = 0
    for i in range(len(reader)):
        row = reader[i]
        assert row["input_ids"].shape == (reader.seq_len,)
        assert int(row["seq_lens"].sum()) == reader.seq_len
        pos = 0
        for k, n in enumerate(row["seq_lens"].tolist()):
            seg = slice(pos, pos + n)
            assert row["position_ids"][seg].tolist() == list(range(n))
            assert row["labels"][pos] == IGNORE_INDEX
            if k == len(row["record_ids"]):  # padding
                assert n == row["num_pad"] and (row["labels"][seg] == IGNORE_INDEX).all()
                break
            conv = convs[row["record_ids"][k]]
            ids, labels = row["input_ids"][seg], row["labels"][seg]
            trained = labels != IGNORE_INDEX
            assert (labels[trained] == ids[trained]).all()
            # runs of trained tokens, one per trained assistant turn, each content + end of turn
            edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(np.int8), [0]])))
            runs = [
                tok.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)
            ]
            text, spans = renderer.render(conv)
            want = [text[a:b] for a, b in spans]
            assistants = [m.content for m in conv.messages if m.trained]
            assert len(runs) == len(want) == len(assistants), (conv.id, runs, want)
            for got, span, content in zip(runs, want, assistants, strict=True):
                assert "".join(got.split()) == "".join(span.split()), (conv.id, got, span)
                assert "".join(span.split()).startswith("".join(content.split())), (conv.id, span)
                assert len("".join(span.split())) > len("".join(content.split()))  # + end of turn
            checked += 1
            pos += n
    return checked


def test_pack_tiny_end_to_end_masks_and_counts(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "shards"
    text = pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256, "--shard-size", 3)
    assert (
        "packed 30 records" in text
        and "1 with zero trained tokens, 1 longer than --seq-len" in text
    )
    index = read_index(out)  # validates against the schema
    c = index["counts"]
    assert c["records_in"] == 32 and c["records"] == 30
    assert c["dropped"] == {"zero_trained": 1, "overflow": 1}
    assert (
        c["rows"] == index["splits"]["train"]["rows"]
        and len(index["splits"]["train"]["shards"]) > 1
    )
    assert c["tokens"] + c["pad_tokens"] == c["rows"] * 256
    assert c["packing_efficiency"] == pytest.approx(c["tokens"] / (c["rows"] * 256), abs=1e-6)
    assert index["tokenizer"]["spec"] == "tiny" and index["template"]["name"]
    assert sorted(os.listdir(out)) == sorted(
        [INDEX_NAME] + [s["file"] for s in index["splits"]["train"]["shards"]]
    )
    assert not list(tmp_path.glob(".shards*"))  # no work folder left
    assert check_c2(out, data, "tiny", "auto") == 30
    reader = ShardReader(out)
    assert (
        sum(int(reader[i]["labels"].__ne__(IGNORE_INDEX).sum()) for i in range(len(reader)))
        == c["trained_tokens"]
    )


def test_overflow_truncate_keeps_first_tokens_and_error_names_source(
    tmp_path: Path, data: Path
) -> None:
    from sftdata.render import Renderer
    from sftdata.tokenizer import load_tokenizer

    out = tmp_path / "t"
    pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256, "--overflow", "truncate")
    index = read_index(out)
    assert index["counts"]["truncated"] == 1 and index["counts"]["dropped"]["overflow"] == 0
    reader = ShardReader(out)
    row_i, seg = reader.find_record("r31")
    row = reader[row_i]
    start = int(row["seq_lens"][:seg].sum())
    long_conv = next(c for c in read_jsonl(data) if c.id == "r31")
    full = Renderer(load_tokenizer("tiny")).encode(long_conv).samples[0].input_ids
    assert row["seq_lens"][seg] == 256
    assert row["input_ids"][start : start + 256].tolist() == full[:256].tolist()

    r = run(
        "pack",
        data,
        "-o",
        tmp_path / "e",
        "--tokenizer",
        "tiny",
        "--seq-len",
        256,
        "--overflow",
        "error",
    )
    assert r.exit_code == 1
    assert "data.jsonl:32: record 'r31' has" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.*"))


def test_no_pack_one_record_per_row(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "np"
    pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256, "--no-pack")
    reader = ShardReader(out)
    assert len(reader) == 30 and reader.index["packed"] is False
    for i in range(len(reader)):
        row = reader[i]
        assert len(row["record_ids"]) == 1
        assert int(row["seq_lens"][0]) + row["num_pad"] == 256
    assert check_c2(out, data, "tiny", "auto") == 30


def test_validation_split_is_deterministic_and_disjoint(tmp_path: Path, data: Path) -> None:
    def ids(folder: Path, split: str) -> set[str]:
        r = ShardReader(folder, split=split)
        return {x for i in range(len(r)) for x in r[i]["record_ids"]}

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        pack_ok(
            data,
            "-o",
            tmp_path / name,
            "--tokenizer",
            "tiny",
            "--seq-len",
            256,
            "--val-count",
            5,
            "--seed",
            seed,
        )
    assert ShardReader.splits(tmp_path / "a") == ["train", "validation"]
    va, ta = ids(tmp_path / "a", "validation"), ids(tmp_path / "a", "train")
    assert len(va) == 5 and not va & ta and len(va | ta) == 30
    assert va == ids(tmp_path / "b", "validation")
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert va != ids(tmp_path / "c", "validation")
    assert check_c2(tmp_path / "a", data, "tiny", "auto", split="validation") == 5
    pack_ok(
        data, "-o", tmp_path / "f", "--tokenizer", "tiny", "--seq-len", 256, "--val-fraction", 0.2
    )
    assert len(ids(tmp_path / "f", "validation")) == 6


HISTORY_DIFFERS = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}(earlier) {% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_samples_of_one_record_stay_on_one_side_of_the_split(tmp_path: Path) -> None:
    """A template that renders earlier replies differently gives a sample per such turn
    (``ID#turnK``); the validation draw is over records, so they never straddle it."""
    template = tmp_path / "history.jinja"
    template.write_text(HISTORY_DIFFERS, encoding="utf-8")
    recs = [
        _rec(
            i,
            [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
                {"role": "user", "content": f"again {i}"},
                {"role": "assistant", "content": f"b{i}"},
            ],
        )
        for i in range(40)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    out = tmp_path / "s"
    args = ("--tokenizer", "tiny", "--seq-len", 256, "--template", template)
    pack_ok(data, "-o", out, *args, "--val-count", 10, "--train-on", "all-assistant")
    side: dict[str, set[str]] = {}
    for split in ("train", "validation"):
        r = ShardReader(out, split=split)
        for i in range(len(r)):
            for rid in r[i]["record_ids"]:
                side.setdefault(rid.split("#")[0], set()).add(split)
    assert len(side) == 40 and all(len(v) == 1 for v in side.values())
    assert sum(v == {"validation"} for v in side.values()) == 10
    index = read_index(out)
    assert index["counts"]["split_turns"] == 40


def test_c5_num_proc_gives_identical_shards_and_rerun_is_a_noop(tmp_path: Path, data: Path) -> None:
    big = write_jsonl(
        tmp_path / "big.jsonl",
        [_rec(i, r["messages"]) for i, r in enumerate(fixture_records() * 5)],
    )
    common = ["--tokenizer", "tiny", "--seq-len", 256, "--shard-size", 7, "--val-count", 4]
    pack_ok(big, "-o", tmp_path / "p1", "--num-proc", 1, *common)
    # chunk size is internal; small inputs still cross several chunks via the API below
    pack_ok(big, "-o", tmp_path / "p2", "--num-proc", 2, *common)
    assert shard_hashes(tmp_path / "p1") == shard_hashes(tmp_path / "p2")
    for name in shard_hashes(tmp_path / "p1"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()

    mtime = (tmp_path / "p1" / INDEX_NAME).stat().st_mtime_ns
    again = pack_ok(big, "-o", tmp_path / "p1", "--num-proc", 2, *common)
    assert "already up to date" in again
    assert (tmp_path / "p1" / INDEX_NAME).stat().st_mtime_ns == mtime
    changed = pack_ok(big, "-o", tmp_path / "p1", *common[:-1], 5)  # val-count 5: rebuild
    assert "packed" in changed and read_index(tmp_path / "p1")["options"]["val_count"] == 5


def test_chunking_and_workers_do_not_change_bytes(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sftdata.pack import PackOptions, pack, workers

    base = {"seq_len": 256, "tokenizer": "tiny", "shard_size": 5}
    pack([data], tmp_path / "x", PackOptions(**base, chunk_size=2000, num_proc=1))
    rep = pack([data], tmp_path / "y", PackOptions(**base, chunk_size=4, num_proc=2))
    assert not rep.noop and rep.records == 30
    assert shard_hashes(tmp_path / "x") == shard_hashes(tmp_path / "y")
    # shard writers that lay out two rows at a time (the workers fork with the lowered block)
    monkeypatch.setattr(workers, "BLOCK_TOKENS", 2 * 256)
    pack([data], tmp_path / "z", PackOptions(**base, num_proc=2))
    assert shard_hashes(tmp_path / "x") == shard_hashes(tmp_path / "z")


def test_cold_and_warm_tokenizer_cache_give_identical_shards(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sftdata.pack import encode
    from sftdata.pack import pipeline as packer

    cache = tmp_path / "cache"
    monkeypatch.setenv("SFTPIPE_CACHE", str(cache))
    opts = packer.PackOptions(seq_len=256, tokenizer="tiny", shard_size=5)
    encode._STATE.clear()  # the renderer is kept per process: make both packs load the tokenizer
    packer.pack([data], tmp_path / "cold", opts)
    assert len(list((cache / "tokenizers").glob("*.json"))) == 1
    encode._STATE.clear()
    packer.pack([data], tmp_path / "warm", opts)
    cold, warm = read_index(tmp_path / "cold"), read_index(tmp_path / "warm")
    assert cold["tokenizer"] == warm["tokenizer"] and cold["fingerprint"] == warm["fingerprint"]
    assert shard_hashes(tmp_path / "cold") == shard_hashes(tmp_path / "warm")


def test_input_change_rebuilds(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "o"
    pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256)
    before = read_index(out)["fingerprint"]
    write_jsonl(data, fixture_records()[:20])
    text = pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256)
    assert "packed 20 records" in text and read_index(out)["fingerprint"] != before


def test_a_folder_an_older_layout_wrote_is_rebuilt(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same inputs and options, written the older way (the layout the fingerprint records):
    rebuilt, not served as up to date."""
    from sftdata.pack import output

    out = tmp_path / "o"
    monkeypatch.setattr(output, "LAYOUT", output.LAYOUT - 1)
    pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256)
    before = read_index(out)["fingerprint"]
    monkeypatch.undo()
    again = pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256)
    assert "packed" in again and "up to date" not in again
    assert read_index(out)["fingerprint"] != before


# ------------------------------------------------------------------ bad input (C6)


def assert_clean_failure(r, needle: str, *leftovers: Path) -> None:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert needle in r.output, r.output
    for p in leftovers:
        assert not p.exists(), p
        assert not list(p.parent.glob(f".{p.name}.*")), p


def test_bad_tokenizer_path_and_not_a_tokenizer(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "o"
    r = run("pack", data, "-o", out, "--tokenizer", tmp_path / "nope", "--seq-len", 64)
    assert_clean_failure(r, "nope: tokenizer path does not exist", out)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("hi")
    r = run("pack", data, "-o", out, "--tokenizer", junk, "--seq-len", 64)
    assert_clean_failure(r, "junk: not a tokenizer", out)


def test_template_errors_and_seq_len_below_overhead(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "o"
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    r = run("pack", data, "-o", out, "--tokenizer", "tiny", "--seq-len", 64, "--template", bad)
    assert_clean_failure(r, "bad.jinja", out)

    # no system role: folded into the first user turn, or under --strict refused naming the record
    picky = tmp_path / "picky.jinja"
    picky.write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>"
        "{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    )
    folded = tmp_path / "folded"
    r = run(
        "pack", data, "-o", folded, "--tokenizer", "tiny", "--seq-len", 256, "--template", picky
    )
    assert r.exit_code == 0 and "fold-ins (records): system_into_user" in r.output, r.output
    assert read_index(folded)["counts"]["fold_ins"]["system_into_user"] > 0
    strict = tmp_path / "strict"
    r = run("pack", data, "-o", strict, "--tokenizer", "tiny", "--seq-len", 256, "--template",
            picky, "--strict")  # fmt: skip
    assert_clean_failure(r, "needs fold-in system_into_user (--strict)", strict)
    r = run("pack", data, "-o", strict, "--tokenizer", "tiny", "--seq-len", 256, "--template",
            picky, "--strict", "--skip-invalid")  # fmt: skip
    assert r.exit_code == 0 and "refused 10 records (strict 10)" in r.output, r.output
    assert read_index(strict)["counts"]["refused"] == {"strict": 10}

    r = run("pack", data, "-o", out, "--tokenizer", "tiny", "--seq-len", 8)
    assert_clean_failure(r, "--seq-len 8", out)


def test_refuses_foreign_output_folder_unless_overwrite(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = run("pack", data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256)
    assert_clean_failure(r, "holds other files", tmp_path / "nothing")
    assert (out / "precious.txt").read_text() == "keep me" and not (out / INDEX_NAME).exists()
    pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256, "--overwrite")
    assert not (out / "precious.txt").exists() and ShardReader(out)
    # an existing shard folder is ours: rebuilt without --overwrite
    pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 200)
    assert read_index(out)["seq_len"] == 200


def test_failure_inside_the_writer_leaves_nothing_and_keeps_old_output(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sftdata import shards

    out = tmp_path / "o"
    pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256)
    good = shard_hashes(out)
    calls = {"n": 0}
    real_flush = shards.ShardWriter.flush

    def flaky(self) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_flush(self)

    monkeypatch.setattr(shards.ShardWriter, "flush", flaky)
    r = run("pack", data, "-o", out, "--tokenizer", "tiny", "--seq-len", 128, "--shard-size", 2)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert shard_hashes(out) == good and not list(tmp_path.glob(".o.*"))  # old output intact
    monkeypatch.setattr(shards.ShardWriter, "flush", real_flush)
    pack_ok(data, "-o", out, "--tokenizer", "tiny", "--seq-len", 128, "--shard-size", 2)
    assert read_index(out)["seq_len"] == 128


@pytest.mark.slow
def test_killed_pack_leaves_no_index_and_rerun_completes(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "o"
    script = (
        "import os, signal, sys\n"
        "from sftdata import shards\n"
        "real = shards.ShardWriter.flush\n"
        "files = [0]\n"
        "def flush(self):\n"
        "    before = len(self.shards)\n"
        "    real(self)\n"
        "    files[0] += len(self.shards) - before\n"
        # shards are written in a worker process: the pack (its parent) is what is killed
        "    if files[0] == 2:\n"
        "        os.kill(os.getppid(), signal.SIGKILL)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "shards.ShardWriter.flush = flush\n"
        "from sftdata.cli import main\n"
        "sys.exit(main())\n"
    )
    args = [
        "pack",
        str(data),
        "-o",
        str(out),
        "--tokenizer",
        "tiny",
        "--seq-len",
        "128",
        "--shard-size",
        "2",
    ]
    p = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == -9
    assert not (out / INDEX_NAME).exists()
    assert not list(tmp_path.rglob(INDEX_NAME))
    work = tmp_path / ".o.partial"
    assert work.is_dir() and list(work.glob("train-*.arrow"))  # killed mid-write
    r = run("inspect", work)
    assert r.exit_code == 1 and "no index.json" in r.output
    pack_ok(*args[1:])
    assert (
        not work.exists()
        and len(ShardReader(out, verify="full")) == read_index(out)["counts"]["rows"]
    )


# ------------------------------------------------------------------ real tokenizer, real data


def _real_tokenizer(template: str, llama2: Path, shared_tokenizers: Path) -> Path:
    """The real vocabulary whose control tokens the template writes (ChatML: Qwen2's)."""
    return shared_tokenizers / "qwen2" if template == "chatml" else llama2


@pytest.mark.slow
@pytest.mark.parametrize("template", ["llama2", "chatml", "fastchat:vicuna_v1.1"])
def test_c2_real_tokenizer_on_alpaca_slice(
    tmp_path: Path,
    shared_data: Path,
    llama2_tokenizer_dir: Path,
    shared_tokenizers: Path,
    template: str,
) -> None:
    tokenizer = _real_tokenizer(template, llama2_tokenizer_dir, shared_tokenizers)
    raw = json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:120]
    recs = []
    for i, r in enumerate(raw):
        user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        recs.append(_rec(i, msgs, file="alpaca_en_demo.json"))
    src = write_jsonl(tmp_path / "alpaca.jsonl", recs)
    out = tmp_path / "s"
    pack_ok(
        src,
        "-o",
        out,
        "--tokenizer",
        tokenizer,
        "--seq-len",
        1024,
        "--template",
        template,
        "--num-proc",
        2,
    )
    index = read_index(out)
    kept = index["counts"]["records"]
    assert kept + index["counts"]["dropped"]["overflow"] == 120 and kept > 100
    assert check_c2(out, src, str(tokenizer), template) == kept
    assert index["counts"]["packing_efficiency"] > 0.95


@pytest.mark.slow
@pytest.mark.parametrize("template", ["chatml", "llama2", "fastchat:vicuna_v1.1"])
@pytest.mark.parametrize(
    "name",
    ["sharegpt_dummy_conversation.json", "glaive_toolcall_en_demo.json", "v1_sft_demo.jsonl"],
)
def test_c2_real_tokenizer_on_conversational_files(
    tmp_path: Path,
    shared_data: Path,
    llama2_tokenizer_dir: Path,
    shared_tokenizers: Path,
    name: str,
    template: str,
) -> None:
    from sftdata.convert import convert

    tokenizer = _real_tokenizer(template, llama2_tokenizer_dir, shared_tokenizers)
    full = tmp_path / "full.jsonl"
    convert([shared_data / name], full)
    src = tmp_path / "slice.jsonl"
    src.write_text(
        "".join(full.read_text(encoding="utf-8").splitlines(keepends=True)[:150]), encoding="utf-8"
    )
    out = tmp_path / "s"
    pack_ok(
        src,
        "-o",
        out,
        "--tokenizer",
        tokenizer,
        "--seq-len",
        2048,
        "--template",
        template,
    )
    kept = read_index(out)["counts"]["records"]
    assert kept >= 140
    assert check_c2(out, src, str(tokenizer), template) == kept


@pytest.mark.parametrize("num_proc", [1, 2])
def test_bad_record_names_its_line_in_workers_too(tmp_path: Path, num_proc: int) -> None:
    recs = fixture_records()[:10]
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in recs]
    lines[6] = '{"schema_version": 1, "id": "x", "messages": [{"role": "robot", "content": "hi"}]}'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    r = run(
        "pack", path, "-o", out, "--tokenizer", "tiny", "--seq-len", 256, "--num-proc", num_proc
    )
    assert_clean_failure(r, "d.jsonl:7: messages[0].role 'robot'", out)
    lines[6] = "{not json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = run(
        "pack",
        path,
        "-o",
        out,
        "--tokenizer",
        "tiny",
        "--seq-len",
        256,
        "--num-proc",
        num_proc,
        "--overflow",
        "error",
    )
    assert_clean_failure(r, "d.jsonl:7: invalid JSON", out)
    r = run("pack", tmp_path / "absent.jsonl", "-o", out, "--tokenizer", "tiny", "--seq-len", 256)
    assert_clean_failure(r, "absent.jsonl: no such file", out)


def test_leading_bom_is_read_as_validate_reads_it(tmp_path: Path) -> None:
    """A UTF-8 BOM before line 1 (Windows editors): validate accepts it, so pack must too."""
    recs = fixture_records()[:3]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in recs).encode())
    assert run("validate", path).exit_code == 0
    assert [c.id for c in read_jsonl(path)] == [r["id"] for r in recs]
    out = tmp_path / "o"
    r = run("pack", path, "-o", out, "--tokenizer", "tiny", "--seq-len", 256, "--num-proc", 2)
    assert r.exit_code == 0, r.output
    assert ShardReader(out).index["counts"]["records"] == 3


@pytest.mark.parametrize("num_proc", [1, 2])  # 2: raised in a forked worker that writes shards
def test_disk_full_while_writing_is_one_line_and_leaves_nothing(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, num_proc: int
) -> None:
    import errno

    from sftdata import shards

    def full(self) -> None:
        raise OSError(
            errno.ENOSPC, "No space left on device", str(self.folder / "train-00000.arrow")
        )

    monkeypatch.setattr(shards.ShardWriter, "flush", full)
    out = tmp_path / "o"
    r = run(
        "pack", data, "-o", out, "--tokenizer", "tiny", "--seq-len", 256, "--num-proc", num_proc
    )
    assert_clean_failure(r, "No space left on device", out)
    assert not (tmp_path / ".o.partial").exists()


def test_truncation_that_cuts_every_trained_token_counts_as_zero_trained(tmp_path: Path) -> None:
    from sftdata.pack import PackOptions, pack

    recs = [
        *fixture_records()[:5],
        _rec(5, [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}]),
    ]
    src = write_jsonl(tmp_path / "d.jsonl", recs)
    rep = pack(
        [src], tmp_path / "o", PackOptions(seq_len=256, tokenizer="tiny", overflow="truncate")
    )
    assert rep.records == 5 and rep.truncated == 0
    assert rep.dropped == {"zero_trained": 1, "overflow": 0}
    rep = pack([src], tmp_path / "p", PackOptions(seq_len=256, tokenizer="tiny"))
    assert rep.dropped == {"zero_trained": 0, "overflow": 1}


def test_seq_len_past_the_models_maximum_needs_allow_long(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text(
        json.dumps({"schema_version": 2, "id": "a", "messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    # the tiny model's config.json says max_position_embeddings 2048
    with pytest.raises(
        ConfigError, match=r"--seq-len 4,096 is more than tiny's maximum length 2,048"
    ):
        pack([src], tmp_path / "o", PackOptions(seq_len=4096, tokenizer="tiny"))
    assert not (tmp_path / "o").exists()
    report = pack(
        [src], tmp_path / "o", PackOptions(seq_len=4096, tokenizer="tiny", allow_long=True)
    )
    assert report.rows == 1


def test_default_shards_split_a_split_evenly(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default a split's rows go into as few files as hold them, of sizes one apart at most
    (a small last file left a worker idle); an explicit --shard-size is kept as given."""
    from sftdata.pack import options

    opts = PackOptions(seq_len=4096, tokenizer="tiny")
    most = opts.resolved_shard_size()
    assert opts.shard_bounds(most) == [0, most]
    assert opts.shard_bounds(most + 1) == [0, (most + 1) // 2, most + 1]
    assert opts.shard_bounds(2049) == [0, 1024, 2049] and opts.shard_bounds(0) == [0, 0]
    explicit = PackOptions(seq_len=4096, tokenizer="tiny", shard_size=1365)
    assert explicit.shard_bounds(2049) == [0, 1365, 2049]
    monkeypatch.setattr(options, "SHARD_BYTES", 4 * 12 * 256)  # at most 4 rows a file
    pack([data], tmp_path / "even", PackOptions(seq_len=256, tokenizer="tiny"))
    rows = [s["rows"] for s in read_index(tmp_path / "even")["splits"]["train"]["shards"]]
    assert sum(rows) > 4 and max(rows) <= 4 and max(rows) - min(rows) <= 1, rows
