"""Packing properties of sftdata.pack.rows (pure functions, synthetic lengths)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sftdata import IGNORE_INDEX
from sftdata.pack.rows import build_row, build_rows, efficiency, next_fit, pack_rows


def _alpaca_like(n: int, seed: int = 0) -> np.ndarray:
    # Long-tailed lengths like chat SFT data: mostly short, some long (log-normal, median ~180).
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=5.2, sigma=0.7, size=n).astype(np.int64), 8, 4096)


@pytest.mark.parametrize("seq_len", [64, 1024, 4096])
def test_pack_rows_every_record_once_and_rows_fit(seq_len: int) -> None:
    lens = np.minimum(_alpaca_like(3000, seed=seq_len), seq_len)
    rows = pack_rows(lens, seq_len=seq_len)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lens)))
    assert all(sum(int(lens[i]) for i in row) <= seq_len for row in rows)
    assert all(row == sorted(row) for row in rows)
    # Never worse than the naive baseline, and close to the floor.
    assert len(rows) <= len(next_fit(lens, seq_len=seq_len))
    if seq_len >= 1024:  # at 64 most records fill a row alone; the floor bound is loose there
        floor = math.ceil(int(lens.sum()) / seq_len)
        assert len(rows) <= floor * 1.01 + 1


def test_pack_rows_efficiency_on_alpaca_like_data_at_4096() -> None:
    lens = _alpaca_like(50_000)
    rows = pack_rows(lens, seq_len=4096)
    total = int(lens.sum())
    eff = efficiency(total, len(rows), 4096)
    nf = next_fit(lens, seq_len=4096)
    assert eff >= 0.998, (eff, len(rows), math.ceil(total / 4096))
    assert eff > efficiency(total, len(nf), 4096)


def test_pack_rows_is_deterministic_and_handles_edges() -> None:
    lens = [5, 5, 5, 10, 1, 9]
    assert pack_rows(lens, seq_len=10) == pack_rows(list(lens), seq_len=10)
    # longest first: 10 alone, 9 then 1 fills its gap, 5+5, 5
    assert pack_rows(lens, seq_len=10) == [[3], [4, 5], [0, 1], [2]]
    assert pack_rows([], seq_len=10) == []
    with pytest.raises(ValueError, match=r"not in 1\.\.10"):
        pack_rows([3, 11], seq_len=10)
    with pytest.raises(ValueError):
        pack_rows([0], seq_len=10)


def test_pack_rows_best_fit_beats_next_fit_on_adversarial_order() -> None:
    # Next-fit on alternating 6,5 at capacity 10 needs one row each; best fit pairs 5s.
    lens = [6, 5] * 10
    assert len(next_fit(lens, seq_len=10)) == 20
    assert len(pack_rows(lens, seq_len=10)) == 15


def test_build_row_layout() -> None:
    a_ids = np.array([10, 11, 12, 13], dtype=np.int32)
    a_mask = np.array([True, False, True, True])
    b_ids = np.array([20, 21, 22], dtype=np.int32)
    b_mask = np.array([False, True, True])
    row = build_row([(a_ids, a_mask), (b_ids, b_mask)], seq_len=10, pad_id=0)
    assert row.input_ids.tolist() == [10, 11, 12, 13, 20, 21, 22, 0, 0, 0]
    x = IGNORE_INDEX
    # first token of each record is ignored even when its mask says trained
    assert row.labels.tolist() == [x, x, 12, 13, x, 21, 22, x, x, x]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert row.seq_lens.tolist() == [4, 3, 3]
    assert row.num_pad == 3
    for arr in (row.input_ids, row.labels, row.position_ids, row.seq_lens):
        assert arr.dtype == np.int32
    # seq_lens are consistent with position_ids: every segment starts at position 0
    starts = np.concatenate([[0], np.cumsum(row.seq_lens)[:-1]])
    assert (row.position_ids[starts] == 0).all()
    assert int(row.seq_lens.sum()) == 10


def test_build_row_full_row_has_no_pad_segment() -> None:
    ids = np.arange(1, 9, dtype=np.int32)
    row = build_row([(ids, np.ones(8, bool))], seq_len=8, pad_id=0)
    assert row.num_pad == 0 and row.seq_lens.tolist() == [8]
    assert row.labels[0] == IGNORE_INDEX and row.labels[1:].tolist() == ids[1:].tolist()


def test_build_row_refuses_overfull() -> None:
    with pytest.raises(ValueError, match="more than seq_len"):
        build_row([(np.ones(6, np.int32), np.ones(6, bool))] * 2, seq_len=10, pad_id=0)


def _random_rows(
    rng: np.random.Generator, seq_len: int
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    rows = []
    for _ in range(int(rng.integers(0, 6))):
        segs, room = [], seq_len
        while room > 0 and (not segs or rng.random() < 0.8):
            n = int(rng.integers(1, room + 1))
            room -= n
            segs.append((rng.integers(0, 1000, n).astype(np.int32), rng.random(n) < 0.5))
        rows.append(segs)
    return rows


def test_build_rows_lays_out_rows_as_build_row_does() -> None:
    """The shard writers' array layout of many rows at once, against the one-row reference on
    random rows: full rows, rows of one record, one-token records, no rows at all."""
    rng = np.random.default_rng(0)
    for seq_len in [1, 2, 7, 64] * 50:
        rows = _random_rows(rng, seq_len)
        segs = [s for row in rows for s in row]
        ids = np.concatenate([i for i, _ in segs] or [np.empty(0, np.int32)])
        mask = np.concatenate([m for _, m in segs] or [np.empty(0, bool)])
        starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        lens = np.array([len(i) for i, _ in segs], dtype=np.int64)
        got = build_rows(ids, mask, lens, starts, seq_len=seq_len, pad_id=3)
        want = [build_row(row, seq_len=seq_len, pad_id=3) for row in rows]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            for name in ("input_ids", "labels", "position_ids", "seq_lens"):
                a, b = getattr(g, name), getattr(w, name)
                assert a.dtype == b.dtype == np.int32 and a.tolist() == b.tolist(), name
            assert g.num_pad == w.num_pad


def test_build_rows_refuses_what_build_row_refuses() -> None:
    ids, mask = np.ones(12, np.int32), np.ones(12, bool)
    with pytest.raises(ValueError, match="more than seq_len"):
        build_rows(ids, mask, np.array([6, 6]), np.array([0, 2]), seq_len=10, pad_id=0)
    with pytest.raises(ValueError, match="empty record"):
        build_rows(ids, mask, np.array([0, 6, 6]), np.array([0, 1, 3]), seq_len=10, pad_id=0)
