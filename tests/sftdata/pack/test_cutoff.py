"""``--overflow cutoff``: over-long records cut pair by pair as LLaMA-Factory's ``cutoff_len``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sftdata import IGNORE_INDEX
from sftdata.pack import PackOptions, pack
from sftdata.pack.cutoff import cutoff_keep, history_keep, pairs, split_room
from sftdata.shards import ShardReader, read_index


@pytest.mark.parametrize(
    ("prompt", "answer", "room", "want"),
    [
        (100, 30, 100, (70, 30)),  # the answer takes under half the room: it stays whole
        (30, 100, 100, (30, 70)),  # the prompt takes under half: it stays whole
        (80, 120, 100, (40, 60)),  # both long: the room is split in proportion, 120/200 of 100
        (10, 10, 100, (10, 10)),  # fits
        (50, 0, 20, (20, 0)),  # a trailing prompt without an answer
    ],
)
def test_split_room_follows_llamafactory_rule(
    prompt: int, answer: int, room: int, want: tuple[int, int]
) -> None:
    assert split_room(prompt, answer, room) == want


def test_pairs_and_keep_on_a_two_turn_mask() -> None:
    mask = np.array([0] * 10 + [1] * 5 + [0] * 8 + [1] * 20, dtype=bool)
    assert pairs(mask) == [(0, 10, 15), (15, 23, 43)]
    keep = cutoff_keep(mask, 30)
    # turn 1 whole (15 of 30); turn 2 gets 15: 2*20 >= 15 and 2*8 >= 15, so int(15*20/28) = 10
    # answer tokens and the 5 first prompt tokens
    want = np.zeros(43, bool)
    want[:15] = True
    want[15:20] = True
    want[23:33] = True
    assert keep.tolist() == want.tolist() and keep.sum() == 30
    assert cutoff_keep(np.ones(50, bool), 30).tolist() == [True] * 30 + [False] * 20


def lf_cut(
    ids: list[int], trained: list[bool], cutoff_len: int, *, mask_history: bool = False
) -> tuple[list[int], list[bool]]:
    """LLaMA-Factory's supervised loop restated on the (prompt, answer) token lists of a record
    (``trained``: every answer's tokens). With ``mask_history`` the pairs are walked from the
    last, prepended, and only the last answer is trained."""
    turns, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and not trained[j]:
            j += 1
        k = j
        while k < len(ids) and trained[k]:
            k += 1
        turns.append((ids[i:j], ids[j:k]))
        i = k
    out_ids: list[int] = []
    out_trained: list[bool] = []
    total = 0
    last_answer = max((k for k, (_, target) in enumerate(turns) if target), default=-1)
    order = list(enumerate(turns))
    if mask_history:
        order = order[::-1]
    for turn, (source, target) in order:
        if total >= cutoff_len:
            break
        room = cutoff_len - total
        if len(target) * 2 < room:
            max_target = room
        elif len(source) * 2 < room:
            max_target = room - len(source)
        else:
            max_target = int(room * (len(target) / (len(source) + len(target))))
        t = min(max_target, len(target))
        s = min(max(room - t, 0), len(source))
        labels = [False] * s + [not mask_history or turn == last_answer] * t
        if mask_history:
            out_ids, out_trained = source[:s] + target[:t] + out_ids, labels + out_trained
        else:
            out_ids, out_trained = out_ids + source[:s] + target[:t], out_trained + labels
        total += s + t
    return out_ids, out_trained


def test_history_keep_gives_the_last_pair_its_room_first() -> None:
    replies = np.array([0] * 10 + [1] * 5 + [0] * 8 + [1] * 20, dtype=bool)
    keep = history_keep(replies, 30)
    # the last pair first: 2*20 >= 30 and 2*8 < 30, so the answer gets 30 - 8 = 22 (all 20) and
    # the prompt its 8; the first pair gets the 2 left: int(2*5/15) = 0 answer, 2 prompt tokens
    want = np.zeros(43, bool)
    want[:2] = True
    want[15:43] = True
    assert keep.tolist() == want.tolist() and keep.sum() == 30


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "seq_len", "mask_history"),
    [
        ("sharegpt_dummy_conversation.json", 48, False),
        ("glaive_toolcall_en_demo.json", 384, False),
        ("sharegpt_dummy_conversation.json", 48, True),
        ("glaive_toolcall_en_demo.json", 384, True),
    ],
)
def test_cutoff_pack_of_real_multi_turn_data_equals_llamafactory_cut(
    tmp_path: Path,
    shared_data: Path,
    shared_tokenizers: Path,
    name: str,
    seq_len: int,
    mask_history: bool,
) -> None:
    from sftdata.conversation import read_jsonl
    from sftdata.convert import convert
    from sftdata.render import Renderer
    from sftdata.tokenizer import load_tokenizer

    src = tmp_path / "c.jsonl"
    convert([shared_data / name], src)
    # LLaMA-Factory's mask_history is train_on last-assistant (sfttrain.lf_config)
    train_on = "last-assistant" if mask_history else "all-assistant"
    qwen2 = str(shared_tokenizers / "qwen2")  # ChatML's markers are its control tokens
    opts = PackOptions(
        seq_len=seq_len,
        tokenizer=qwen2,
        template="chatml",
        overflow="cutoff",
        train_on=train_on,
    )
    report = pack([src], tmp_path / "s", opts)
    # every reply's tokens: the (prompt, answer) pairs LLaMA-Factory's template would give
    renderer = Renderer(load_tokenizer(qwen2), template="chatml")
    last = Renderer(load_tokenizer(qwen2), template="chatml", train_on="last-assistant")
    reader = ShardReader(tmp_path / "s")
    cut = kept = 0
    for conv in read_jsonl(src):
        sample = renderer.encode(conv).samples[0]
        ids, trained = sample.input_ids.tolist(), sample.train_mask.tolist()
        # the trained tokens of the uncut record
        whole = last.encode(conv).samples[0].train_mask.tolist() if mask_history else trained
        want_ids, want_trained = (
            (ids, whole)
            if len(ids) <= seq_len
            else lf_cut(ids, trained, seq_len, mask_history=mask_history)
        )
        if not any(want_trained[1:]):
            continue  # nothing left to train: counted as zero-trained, not written
        row_i, seg = reader.find_record(conv.id)
        row = reader[row_i]
        start = int(row["seq_lens"][:seg].sum())
        n = int(row["seq_lens"][seg])
        assert row["input_ids"][start : start + n].tolist() == want_ids, conv.id
        got_trained = (row["labels"][start : start + n] != IGNORE_INDEX).tolist()
        assert got_trained[1:] == want_trained[1:], conv.id
        kept += 1
        cut += len(ids) > seq_len
    counts = read_index(tmp_path / "s")["counts"]
    assert cut > 50 and counts["truncated"] == cut == report.truncated
    assert counts["records"] == kept and counts["dropped"]["overflow"] == 0
