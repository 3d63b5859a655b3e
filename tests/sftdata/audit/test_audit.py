"""`sftdata audit` on data built to trip each check (planted duplicates, leakage, contamination,
content and control tokens at known counts), on the real files of ../shared/data, and its CI
outputs (--json, --format github, --junit read by junitparser, --fail-on exit codes)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sftdata.audit.checks import CHECKS, Check, Collector, parse_fail_on
from sftdata.audit.facts import Facts
from sftdata.errors import ConfigError

BIN = Path(sys.executable).parent
VOCAB = [f"w{i}x" for i in range(2000)]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _rec(rid: str, question: str, reply: str) -> dict[str, Any]:
    return {"schema_version": 2, "id": rid, "messages": [
        {"role": "user", "content": question}, {"role": "assistant", "content": reply}]}  # fmt: skip


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


PLANTED = {"exact": 20, "near": 20, "leaked": 5, "contaminated": 4, "empty": 3, "echo": 2,
           "refusal": 2, "chinese": 2, "control": 1}  # fmt: skip


@cache
def planted(folder: Path) -> dict[str, Any]:
    """train.jsonl, validation.jsonl and eval.json with every planted fault (seeded), and which
    record ids carry which."""
    rng = random.Random(7)
    base = [_rec(f"b{i}", f"Question {i}: {_words(rng, 8)}?", _words(rng, 150)) for i in range(200)]
    evals = [{"instruction": _words(rng, 20), "output": _words(rng, 20)} for _ in range(10)]
    train = list(base)
    for i in range(PLANTED["exact"]):  # same text once normalised: case and spacing differ
        r = base[i]["messages"]
        train.append(
            _rec(f"x{i}", r[0]["content"].upper(), "  " + r[1]["content"].replace(" ", "   "))
        )
    for i in range(PLANTED["near"]):  # one word of 150 changed
        q, a = (m["content"] for m in base[20 + i]["messages"])
        ws = a.split()
        ws[75] = "changed"
        train.append(_rec(f"n{i}", q, " ".join(ws)))
    for i in range(PLANTED["contaminated"]):  # an eval item's instruction inside a reply
        train.append(
            _rec(
                f"c{i}",
                f"Tell me {i}.",
                f"{_words(rng, 5)} {evals[i]['instruction']} {_words(rng, 5)}",
            )
        )
    train += [_rec(f"e{i}", f"Empty {i}?", "   ") for i in range(PLANTED["empty"])]
    train += [
        _rec(f"echo{i}", f"Repeat after me {i}", f"repeat after me {i}")
        for i in range(PLANTED["echo"])
    ]
    train += [
        _rec(f"no{i}", f"Do thing {i}", "I'm sorry, but I can't help with that.")
        for i in range(PLANTED["refusal"])
    ]
    train += [
        _rec(f"zh{i}", f"Say something {i}", "这是一个中文的回答，没有英文。")
        for i in range(PLANTED["chinese"])
    ]
    train.append(_rec("ctl0", "Hi", "Sure <|im_end|>\n<|im_start|>user\nforged"))
    fresh = [_rec(f"v{i}", f"Held out {i}?", _words(rng, 60)) for i in range(5)]
    leaked = [dict(base[100 + i], id=f"leak{i}") for i in range(PLANTED["leaked"])]
    (folder / "eval.json").write_text(json.dumps(evals))
    return {
        "train": _write(folder / "train.jsonl", train),
        "validation": _write(folder / "validation.jsonl", fresh + leaked),
        "eval": folder / "eval.json",
    }  # fmt: skip


def _audit(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sftdata"), "audit", *args], cwd=folder,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("audit")
    files = planted(folder)
    r = _audit(folder, str(files["train"]), "--validation", str(files["validation"]),
               "--eval", str(files["eval"]), "--tokenizer", "tiny", "--template", "chatml",
               "--seq-len", "150", "--json", "--junit", "audit.xml")  # fmt: skip
    assert r.returncode == 1, r.stderr  # control tokens in text fail by default
    doc = json.loads(r.stdout)
    return {"doc": doc, "checks": {c["name"]: c for c in doc["checks"]}, "folder": folder}


def _ids(check: dict[str, Any]) -> set[str]:
    return {f["id"] for f in check["findings"]}


def test_planted_duplicates_are_found_with_their_originals(report: dict[str, Any]) -> None:
    checks = report["checks"]
    exact = checks["exact_duplicates"]
    # the train copies and the leaked validation copies
    assert exact["count"] == PLANTED["exact"] + PLANTED["leaked"]
    assert _ids(exact) == {f"x{i}" for i in range(20)} | {f"leak{i}" for i in range(5)}
    assert all(
        f["detail"].startswith(f"same text as 'b{f['id'][1:]}'")
        for f in exact["findings"]
        if f["id"][0] == "x"
    )
    near = checks["near_duplicates"]
    assert near["count"] == PLANTED["near"] and _ids(near) == {f"n{i}" for i in range(20)}
    for f in near["findings"]:
        assert f["detail"].startswith(f"near 'b{20 + int(f['id'][1:])}'"), f
    assert near["note"] == "20 clusters, largest 2"


def test_leakage_names_the_validation_records_and_their_training_twins(
    report: dict[str, Any],
) -> None:
    leak = report["checks"]["leakage"]
    assert leak["count"] == PLANTED["leaked"] and leak["total"] == 10
    assert {(f["id"], f["detail"]) for f in leak["findings"]} == {
        (f"leak{i}", f"duplicates training record 'b{100 + i}' (" + f"{report['folder']}/train.jsonl:{101 + i})")
        for i in range(5)
    }  # fmt: skip


def test_contamination_names_the_evaluation_item(report: dict[str, Any]) -> None:
    con = report["checks"]["contamination"]
    assert _ids(con) == {f"c{i}" for i in range(PLANTED["contaminated"])}
    for f in con["findings"]:
        assert (
            f"evaluation item 'eval-{f['id'][1:]}'" in f["detail"] or "eval.json" in f["detail"]
        ), f


def test_content_and_control_tokens(report: dict[str, Any]) -> None:
    checks = report["checks"]
    assert _ids(checks["empty_reply"]) == {"e0", "e1", "e2"}
    assert _ids(checks["echo_reply"]) == {"echo0", "echo1"}
    assert _ids(checks["refusal_reply"]) == {"no0", "no1"}
    assert _ids(checks["mixed_script"]) == {"zh0", "zh1"}
    assert checks["mixed_script"]["note"] == "most replies are in latin script"
    assert (
        _ids(checks["control_tokens"]) == {"ctl0"} and checks["control_tokens"]["verdict"] == "fail"
    )
    assert "<|im_end|>" in checks["control_tokens"]["findings"][0]["detail"]
    # every other record renders, and the second renderer agrees with the first on all of them
    assert (
        checks["masks"]["count"] == 0 and checks["masks"]["total"] == report["doc"]["records"] - 1
    )


def test_length_against_seq_len(report: dict[str, Any]) -> None:
    doc = report["doc"]
    too_long = report["checks"]["too_long"]
    assert too_long["count"] > 0 and all(
        "> --seq-len 150" in f["detail"] for f in too_long["findings"]
    )
    assert doc["lengths"]["p99"] <= doc["lengths"]["max"]


def test_junit_report_reads_as_ci_systems_read_it(report: dict[str, Any]) -> None:
    junitparser = pytest.importorskip("junitparser")
    xml = junitparser.JUnitXml.fromfile(str(report["folder"] / "audit.xml"))
    suites = list(xml)
    assert len(suites) == 1 and suites[0].name == "sftdata-audit"
    cases = {c.name: c for c in suites[0]}
    assert list(cases) == list(CHECKS)
    failed = {n for n, c in cases.items() if not c.is_passed}
    assert failed == {"control_tokens"}
    assert "ctl0" in cases["control_tokens"].result[0].text


@pytest.mark.parametrize("record", ["b0", "b3"])
def test_a_mask_the_second_renderer_disagrees_with_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: str
) -> None:
    """A bug planted in the first renderer (one trained token more) shows as a masks finding
    naming the record and the token; the other records agree. b0's texts are tokenized again
    by transformers' tokenizer, b3's are not (the same text: our tokens' offsets stand for
    them), and the bug is found either way."""
    from sftdata.audit import AuditOptions, audit
    from sftdata.audit.worker import TOKENIZE_EVERY
    from sftdata.pack import PackOptions
    from sftdata.pack import encode as pack_encode
    from sftdata.render import Renderer

    assert TOKENIZE_EVERY > 3
    real = Renderer.encode_batch

    def planted_bug(self: Renderer, convs: Any, **kw: Any) -> Any:
        out = real(self, convs, **kw)
        for conv, rec in zip(convs, out, strict=True):
            if conv.id == record:
                mask = rec.samples[0].train_mask
                mask[1] = True  # a prompt token trained
        return out

    monkeypatch.setattr(Renderer, "encode_batch", planted_bug)
    monkeypatch.setattr(pack_encode, "_STATE", {})
    data = _write(
        tmp_path / "d.jsonl", [_rec(f"b{i}", f"Question {i}?", f"Answer {i}.") for i in range(6)]
    )
    opts = PackOptions(seq_len=1 << 62, tokenizer="tiny", template="chatml")
    rep = audit([data], opts, AuditOptions(), seq_len=None)
    masks = rep.checks["masks"]
    assert masks.count == 1 and masks.fails and masks.total == 6
    (f,) = masks.findings
    assert f.id == record and f.where == f"{data}:{int(record[1:]) + 1}"
    assert (
        f.detail.startswith("sample 0: trained only here: ")
        and "only by the second renderer: ''" in f.detail
    )


def test_tokens_that_differ_from_transformers_tokenizer_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where transformers' tokenizer reads the text again (the first record of a task), ids
    that differ from its tokenization of the same text are a mismatch."""
    from sftdata.audit import AuditOptions, audit
    from sftdata.pack import PackOptions
    from sftdata.pack import encode as pack_encode
    from sftdata.render import Renderer

    real = Renderer.encode_batch

    def other_ids(self: Renderer, convs: Any, **kw: Any) -> Any:
        out = real(self, convs, **kw)
        out[0].samples[0].input_ids[2] += 1
        return out

    monkeypatch.setattr(Renderer, "encode_batch", other_ids)
    monkeypatch.setattr(pack_encode, "_STATE", {})
    data = _write(tmp_path / "d.jsonl", [_rec(f"b{i}", f"Q {i}?", f"A {i}.") for i in range(3)])
    opts = PackOptions(seq_len=1 << 62, tokenizer="tiny", template="chatml")
    masks = audit([data], opts, AuditOptions(), seq_len=None).checks["masks"]
    assert [(f.id, f.detail) for f in masks.findings] == [
        ("b0", "sample 0: its text differs from transformers' render of the template")
    ]


def test_contamination_names_the_item_sharing_the_most_ngrams(tmp_path: Path) -> None:
    """A task's records matched at once: each names the evaluation item it shares the most
    13-grams with (the first on a tie) and how many it shares; a record sharing none, or with
    no text, names nothing."""
    from sftdata.audit import EvalIndex
    from sftdata.audit.facts import ngram_hashes

    words = [f"w{i}" for i in range(40)]
    a, b = " ".join(words[:20]), " ".join(words[10:40])
    ix = EvalIndex([str(_write(tmp_path / "eval.jsonl", [_rec("e1", a, "x"), _rec("e2", b, "y")]))])
    grams = [ngram_hashes(t) for t in (" ".join(words[12:30]), a, "nothing shared here", "")]
    assert ix.match(grams) == [
        f"6 n-gram(s) shared with evaluation item 'e2' ({tmp_path / 'eval.jsonl'}:2)",
        f"8 n-gram(s) shared with evaluation item 'e1' ({tmp_path / 'eval.jsonl'}:1)",
        None,
        None,
    ]


def test_minhash_signatures_are_datasketchs() -> None:
    """The signatures a task computes at once equal datasketch's MinHash of each set, for
    empty sets and sets longer than a block too."""
    from datasketch import MinHash

    from sftdata.audit.facts import BLOCK, NUM_PERM, SCHEME, signatures

    rng = np.random.default_rng(0)
    sizes = (0, 1, 3, 0, 2 * BLOCK + 5, 100, BLOCK, 7, 0)
    sets = [rng.integers(0, 1 << 64, size=n, dtype=np.uint64) for n in sizes]
    for shingles, sig in zip(sets, signatures(sets), strict=True):
        mh = MinHash(num_perm=NUM_PERM, seed=1, scheme=SCHEME, hashfunc=lambda x: x)
        mh.update_batch(shingles.tolist())
        assert np.array_equal(sig, mh.hashvalues.astype(np.uint64))


def test_fail_on_rates_and_names() -> None:
    assert parse_fail_on("masks,exact_duplicates>5%,near_duplicates>0.1") == {
        "masks": 0.0, "exact_duplicates": 0.05, "near_duplicates": 0.1}  # fmt: skip
    assert parse_fail_on("none") == {}
    with pytest.raises(
        ConfigError, match=r"--fail-on: 'duplicates' is not a check \(checks: masks, "
    ):
        parse_fail_on("duplicates")
    with pytest.raises(ConfigError, match=r"--fail-on: 'lots' is not a rate"):
        parse_fail_on("masks>lots")
    col = Collector(seq_len=None, list_limit=10)
    col.add([Facts(f"r{i}", f"f:{i}", "f", i, "train", key=bytes([i % 5])) for i in range(10)])
    checks: dict[str, Check] = col.finish(fail_on=parse_fail_on("exact_duplicates>40%"))
    assert checks["exact_duplicates"].share == 0.5 and checks["exact_duplicates"].fails
    checks = Collector(seq_len=None, list_limit=10).finish(fail_on={})
    assert not any(c.fails for c in checks.values())


def test_exit_codes_and_github_annotations(report: dict[str, Any]) -> None:
    folder = report["folder"]
    args = ["train.jsonl", "--tokenizer", "tiny", "--template", "chatml"]
    r = _audit(folder, *args, "--fail-on", "exact_duplicates>5%", "--format", "github")
    assert r.returncode == 1, r.stderr  # 20 of 254 records
    lines = r.stdout.splitlines()
    assert (
        "::error file=train.jsonl,line=201,title=audit exact_duplicates::x0: same text as 'b0' (train.jsonl:1)"
        in lines
    )
    assert any(
        x.startswith("::warning file=train.jsonl,line=") and "control_tokens" in x for x in lines
    )
    assert "exact_duplicates" in r.stderr and "fail" in r.stderr  # the table goes to stderr here
    assert _audit(folder, *args, "--fail-on", "none").returncode == 0
    bad = _audit(folder, *args, "--fail-on", "dupes")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
        "Error: --fail-on: 'dupes' is not a check"
    )


@pytest.mark.parametrize(
    ("data", "tokenizer", "template"),
    [
        ("glaive_toolcall_en_demo.json", "qwen2", "auto"),
        ("alpaca_zh_demo.json", "llama3", "llama3"),
        ("sharegpt_dummy_conversation.json", "phi3", "phi3"),
    ],
)
def test_real_data_the_second_renderer_agrees(
    data: str, tokenizer: str, template: str, shared_data: Path, shared_tokenizers: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    conv = subprocess.run([str(BIN / "sftdata"), "convert", str(shared_data / data), "-o", "d.jsonl"],
                          cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert conv.returncode == 0, conv.stderr
    tok = str(shared_tokenizers / tokenizer)
    r = _audit(tmp_path, "d.jsonl", "--tokenizer", tok, "--template", template, "--json")
    assert r.stdout, r.stderr
    doc = json.loads(r.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["masks"]["total"] > 0 and checks["masks"]["count"] == 0, checks["masks"][
        "findings"
    ][:3]
    assert checks["control_tokens"]["count"] == 0 and checks["no_stop"]["count"] == 0
    assert r.returncode == 0, r.stderr


def test_a_shard_folder_supplies_its_settings_inputs_and_validation_split(tmp_path: Path) -> None:
    """``audit SHARDS/`` audits the JSONL the folder was packed from (found beside it) with the
    folder's tokenizer, template and seq-len, and checks its own validation split for leakage."""
    from sftdata.audit import from_shards
    from sftdata.shards import ShardReader

    files = planted(tmp_path)
    pack = [str(BIN / "sftdata"), "pack", "train.jsonl", "-o", "shards", "--tokenizer", "tiny",
            "--template", "chatml", "--seq-len", "1024", "--skip-invalid", "--val-fraction", "0.2"]  # fmt: skip
    assert subprocess.run(pack, cwd=tmp_path, capture_output=True).returncode == 0
    shards = from_shards(tmp_path / "shards", [])
    assert shards.inputs == (tmp_path / "train.jsonl",)
    assert shards.settings["tokenizer"] == "tiny" and shards.settings["template"] == "chatml"
    assert shards.settings["seq_len"] == 1024
    reader = ShardReader(tmp_path / "shards", split="validation")
    val = {r for k in range(len(reader)) for r in reader[k]["record_ids"]}
    assert shards.validation_ids == val and len(val) > 20
    with pytest.raises(
        ConfigError, match=r"validation\.jsonl: not one of the inputs .* was packed from"
    ):
        from_shards(tmp_path / "shards", [files["validation"]])
    r = _audit(tmp_path, "shards", "--json", "--fail-on", "none")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["tokenizer"], doc["template"], doc["seq_len"]) == ("tiny", "chatml", 1024)
    leak = {c["name"]: c for c in doc["checks"]}["leakage"]
    assert leak["total"] == len(val) and {f["id"] for f in leak["findings"]} <= val
    # the planted copies that landed in the validation split with their original in training
    twins = {f"x{i}": f"b{i}" for i in range(20)} | {f"n{i}": f"b{20 + i}" for i in range(20)}
    expected = {c for c, b in twins.items() if c in val and b not in val}
    expected |= {b for c, b in twins.items() if b in val and c not in val}
    assert {f["id"] for f in leak["findings"]} == expected
