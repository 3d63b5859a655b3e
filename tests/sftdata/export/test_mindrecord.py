"""`sftdata export --format mindrecord`: MindDataset round trip and MindFormers equivalence.

The equivalence test re-implements, here in the test and nowhere in the product, what
MindFormers' Llama fine-tuning preprocessing does to Alpaca data:
``mindformers/tools/dataset_preprocess/llama/alpaca_converter.py`` (Alpaca prompt -> one
human/gpt ShareGPT pair) and ``llama_preprocess.py --dataset_type qa`` (FastChat vicuna_v1.1
prompt, LlamaTokenizer with add_bos_token and add_eos_token, per-round tokenization, masking
with IGNORE_TOKEN_ID, padding with the pad token <unk> = 0 to seq_length + 1).
"""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from sftdata import IGNORE_INDEX
from sftdata.cli import main
from sftdata.conversation import Conversation, Message, Source
from sftdata.shards import ShardReader
from tests.conftest import ROOT, extra_or_skip

ms_dataset = extra_or_skip("mindspore.dataset", "mindrecord")


def _run(*args: str) -> str:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def _read_mindrecord(path: Path) -> list[dict[str, np.ndarray]]:
    ds = ms_dataset.MindDataset(str(path), shuffle=False)
    return list(ds.create_dict_iterator(output_numpy=True, num_epochs=1))


def _header(path: Path) -> dict:
    """The MindRecord file header: 8 bytes little-endian length, then that much JSON."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.fixture(scope="module")
def packed_shards(tmp_path_factory) -> Path:
    """Tiny-tokenizer shards of 80 synthetic records packed into 192-token rows."""
    tmp = tmp_path_factory.mktemp("mr")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    lines = []
    for i in range(80):
        q = " ".join(rng.choices(words, k=rng.randint(3, 30)))
        a = " ".join(rng.choices(words, k=rng.randint(2, 40)))
        conv = Conversation(
            id=f"r{i}",
            source=Source("synthetic.json", line=i + 1),
            messages=[Message("user", q), Message("assistant", a)],
        )
        lines.append(conv.to_json())
    src = tmp / "c.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _run("pack", str(src), "-o", str(tmp / "shards"), "--tokenizer", "tiny", "--seq-len", "192")
    return tmp / "shards"


@pytest.mark.parametrize("layout", ["legacy", "mcore"])
def test_round_trip_with_minddataset(packed_shards: Path, tmp_path: Path, layout: str) -> None:
    out = tmp_path / "sub" / "train.mindrecord"
    text = _run(
        "export", str(packed_shards), "--format", "mindrecord", "-o", str(out), "--layout", layout
    )
    assert "actual_seq_len" in text
    reader = ShardReader(packed_shards)
    rows = _read_mindrecord(out)
    assert len(rows) == len(reader)
    pad = reader.index["tokenizer"]["pad_token_id"]
    seq_len = reader.seq_len
    assert sum(len(r["actual_seq_len"]) > 1 for r in rows) > 0  # really packed
    for i, got in enumerate(rows):
        want = reader[i]
        assert set(got) == {"input_ids", "labels", "actual_seq_len"}
        assert all(v.dtype == np.int32 for v in got.values())
        n_real = seq_len - want["num_pad"]
        if layout == "legacy":
            assert got["input_ids"].shape == got["labels"].shape == (seq_len + 1,)
            assert np.array_equal(got["input_ids"][:seq_len], want["input_ids"])
            assert got["input_ids"][seq_len] == pad
            assert np.array_equal(got["labels"][:seq_len], want["labels"])
            assert got["labels"][seq_len] == IGNORE_INDEX
        else:
            assert got["input_ids"].shape == got["labels"].shape == (seq_len,)
            assert np.array_equal(got["input_ids"], want["input_ids"])
            # labels[t] is the target of position t: the next token where it is trained.
            assert np.array_equal(got["labels"][:-1], want["labels"][1:])
            assert got["labels"][-1] == IGNORE_INDEX
        segs = want["seq_lens"][:-1] if want["num_pad"] else want["seq_lens"]
        assert np.array_equal(got["actual_seq_len"], np.cumsum(segs))
        assert got["actual_seq_len"][-1] == n_real
    (meta,) = _header(out)["schema"]
    desc = json.loads(meta["desc"])
    schema = json.loads((ROOT / "schemas" / "mindrecord.v1.json").read_text(encoding="utf-8"))
    jsonschema.validate({"desc": desc, "columns": meta["schema"]}, schema)
    assert list(meta["schema"]) == ["actual_seq_len", "input_ids", "labels"]
    assert desc["layout"] == layout and desc["seq_len"] == seq_len
    assert desc["tokenizer_sha256"] == reader.index["tokenizer"]["sha256"]
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "train.mindrecord",
        "train.mindrecord.db",
    ]


def test_pad_id_override_and_no_boundaries(packed_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.mindrecord"
    _run(
        "export", str(packed_shards), "--format", "mindrecord", "-o", str(out),
        "--pad-token-id", "0", "--no-boundaries",
    )  # fmt: skip
    reader = ShardReader(packed_shards)
    rows = _read_mindrecord(out)
    assert set(rows[0]) == {"input_ids", "labels"}
    padded = [i for i in range(len(reader)) if reader[i]["num_pad"]]
    assert padded
    for i in padded:
        n = reader[i]["num_pad"]
        assert (rows[i]["input_ids"][-(n + 1) :] == 0).all()
        assert np.array_equal(rows[i]["input_ids"][: -(n + 1)], reader[i]["input_ids"][:-n])


def test_overwrites_atomically_and_refuses_bad_input(packed_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.mindrecord"
    _run("export", str(packed_shards), "--format", "mindrecord", "-o", str(out))
    before = out.read_bytes()
    res = CliRunner().invoke(
        main,
        ["export", str(packed_shards), "--format", "mindrecord", "-o", str(out), "--split", "nope"],
    )
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert "no split 'nope'" in res.output
    assert out.read_bytes() == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mindrecord", "o.mindrecord.db"]
    res = CliRunner().invoke(
        main, ["export", str(tmp_path / "missing"), "--format", "mindrecord", "-o", str(out)]
    )
    assert res.exit_code == 1 and res.output.startswith("Error: ") and res.output.count("\n") == 1
    # Exporting again over an existing file gives a readable file with the same rows.
    _run("export", str(packed_shards), "--format", "mindrecord", "-o", str(out))
    assert len(_read_mindrecord(out)) == len(ShardReader(packed_shards))


def test_without_mindspore_one_line(packed_shards: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mindspore.mindrecord", None)  # import now raises ImportError
    out = tmp_path / "o.mindrecord"
    res = CliRunner().invoke(
        main, ["export", str(packed_shards), "--format", "mindrecord", "-o", str(out)]
    )
    assert res.exit_code == 1
    assert res.output == (
        "Error: mindrecord export needs the optional extra: pip install 'sftpipe[mindrecord]'\n"
    )
    assert list(tmp_path.iterdir()) == []


# --- MindFormers equivalence ----------------------------------------------------------------

# Stanford Alpaca's prompt, as alpaca_converter.py puts it into the human turn.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
SPACE_PIECE = 29871  # Llama-2's lone "▁"


def _alpaca_converter(records: list[dict]) -> list[dict]:
    """What MindFormers' alpaca_converter.py writes: one human/gpt pair per Alpaca record."""
    out = []
    for i, r in enumerate(records, start=1):
        prompt = ALPACA_PROMPT_INPUT if r.get("input", "") != "" else ALPACA_PROMPT_NO_INPUT
        out.append(
            {
                "id": str(i),
                "conversations": [
                    {"from": "human", "value": prompt.format_map(r)},
                    {"from": "gpt", "value": r["output"]},
                ],
            }
        )
    return out


def _mindformers_preprocess(
    turns: list[dict], sp, seq_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """llama_preprocess.py's preprocess() for one record, as we read it.

    Its LlamaTokenizer (legacy SentencePiece) runs with add_bos_token and add_eos_token, so
    ``tokenizer(text)`` is ``[bos] + sp.encode(text) + [eos]``; the prompt is split on ``</s>``
    into rounds, each tokenized alone; inside a round everything up to ``ASSISTANT:`` is
    masked (``len(tokenizer(prefix + " ASSISTANT: ")) - 3``); padding is ``<unk>`` = 0.
    """
    from fastchat.conversation import get_conv_template

    def tok(text: str) -> list[int]:
        return [sp.bos_id(), *sp.encode(text), sp.eos_id()]

    conv = get_conv_template("vicuna_v1.1")
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    for t in turns:
        conv.append_message(roles[t["from"]], t["value"])
    rounds = conv.get_prompt().split(conv.sep2)
    ids = [sp.bos_id()]
    for rou in rounds:
        if rou == "":
            break
        ids += tok(rou)[1:]
    ids = (ids + [0] * seq_length)[:seq_length]
    target = np.array(ids, dtype=np.int64)
    total_len = int((target != 0).sum())
    sep = conv.sep + conv.roles[1] + ": "
    cur = 1
    target[:cur] = IGNORE_INDEX
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tok(rou)) - 1
        instruction_len = len(tok(parts[0])) - 3
        target[cur : cur + instruction_len] = IGNORE_INDEX
        cur += round_len
    target[cur:] = IGNORE_INDEX
    if cur < seq_length and cur != total_len:
        target[:] = IGNORE_INDEX
    return np.array(ids, dtype=np.int32), target.astype(np.int32)


def test_matches_mindformers_alpaca_pipeline(
    shared_data: Path, llama2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """pack --template fastchat:vicuna_v1.1 --no-pack + export == MindFormers' Alpaca MindRecord.

    Same token ids and masked positions, row by row, with two documented differences:
    - MindFormers' ``instruction_len - 3`` assumes the space after ``ASSISTANT:`` merges into
      the answer's first token. When the answer starts with a digit or an emoji SentencePiece
      emits a lone ``▁`` there, and MindFormers trains it; we train exactly the answer and
      ``</s>``. Asserted: that ``▁`` is the ONLY label difference, at most one per record.
    - Runs of several spaces: Hugging Face's fast Llama tokenizer splits them differently from
      SentencePiece (transformers#25069). Such records are compared as decoded text.
    """
    import sentencepiece as spm

    seq_len, n_records = 1024, 200
    raw = json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:n_records]
    sharegpt = tmp_path / "alpaca-conversation.json"
    sharegpt.write_text(json.dumps(_alpaca_converter(raw), ensure_ascii=False), encoding="utf-8")
    canon, shards, out = tmp_path / "c.jsonl", tmp_path / "shards", tmp_path / "mf.mindrecord"
    _run("convert", str(sharegpt), "-o", str(canon))
    _run(
        "pack", str(canon), "-o", str(shards), "--tokenizer", str(llama2_tokenizer_dir),
        "--seq-len", str(seq_len), "--template", "fastchat:vicuna_v1.1", "--no-pack",
    )  # fmt: skip
    _run("export", str(shards), "--format", "mindrecord", "-o", str(out), "--pad-token-id", "0")

    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir / "tokenizer.model"))
    turns = {r["id"]: r["conversations"] for r in json.loads(sharegpt.read_text("utf-8"))}
    reader = ShardReader(shards)
    rows = _read_mindrecord(out)
    assert set(rows[0]) == {"input_ids", "labels"}  # no boundaries column for unpacked rows
    assert len(rows) == len(reader) == n_records
    exact = quirk = runs = 0
    for i, got in enumerate(rows):
        (rid,) = reader[i]["record_ids"]
        ids, labels = _mindformers_preprocess(turns[rid], sp, seq_len + 1)
        assert got["input_ids"].shape == got["labels"].shape == ids.shape == (seq_len + 1,)
        if "  " in json.dumps(turns[rid]):
            runs += 1
            real = [t for t in got["input_ids"].tolist() if t != 0]  # 0 = <unk> = padding
            assert sp.decode(real) == sp.decode([t for t in ids.tolist() if t != 0]), rid
            assert sp.decode([t for t in got["labels"].tolist() if t >= 0]).strip() == (
                sp.decode([t for t in labels.tolist() if t >= 0]).strip()
            )
            continue
        assert got["input_ids"].tolist() == ids.tolist(), f"record {rid}: token ids differ"
        diff = np.flatnonzero(got["labels"] != labels)
        if len(diff) == 0:
            exact += 1
            continue
        (k,) = diff  # at most one position differs ...
        assert ids[k] == SPACE_PIECE and labels[k] == SPACE_PIECE  # ... MindFormers' lone "▁"
        assert got["labels"][k] == IGNORE_INDEX and got["labels"][k + 1] == ids[k + 1]
        assert got["labels"][k - 1] == IGNORE_INDEX  # it sits right after "ASSISTANT:"
        quirk += 1
    assert exact + quirk + runs == n_records
    assert exact >= 0.8 * n_records, (exact, quirk, runs)


def test_token_after_special_tokens_matches_sentencepiece(
    shared_data: Path, llama2_tokenizer_dir: Path
) -> None:
    """Multi-turn ShareGPT records: our ids == MindFormers' per-round SentencePiece ids.

    MindFormers encodes each round alone, so every round starts with SentencePiece's "▁" prefix
    (``▁US ER`` after ``</s>``); the whole-text encoding must give the same ids.
    """
    import sentencepiece as spm

    from sftdata.render import Renderer
    from sftdata.sources import read_conversations
    from sftdata.tokenizer import load_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir / "tokenizer.model"))
    renderer = Renderer(load_tokenizer(llama2_tokenizer_dir), template="fastchat:vicuna_v1.1")
    path = shared_data / "sharegpt_dummy_conversation.json"
    turns = {r["id"]: r["conversations"] for r in json.loads(path.read_text("utf-8"))}
    checked = 0
    for conv in read_conversations(path):
        if "  " in json.dumps(turns[conv.id]) or len(turns[conv.id]) < 4:
            continue
        ours = renderer.encode(conv).samples[0].input_ids.tolist()
        ids, _ = _mindformers_preprocess(turns[conv.id], sp, len(ours) + 8)
        assert ours == [t for t in ids.tolist() if t != 0], conv.id
        checked += 1
        if checked == 20:
            break
    assert checked == 20
