"""The trainer's data: which shards of a remote folder a rank fetches ahead, and in what order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sftdata.shards import ShardReader
from sfttrain.data import Cursor, StepSampler, shards_in_order
from tests.sftdata.test_shards import make_folder


def test_fetch_order_follows_the_sampler_and_skips_unread_shards(tmp_path: Path) -> None:
    make_folder(tmp_path / "s", n=80, shard_size=2)
    reader = ShardReader(tmp_path / "s")
    for rank in (0, 1):
        sampler = StepSampler(len(reader), micro_batch=1, accumulation=2, seed=3, rank=rank,
                              world_size=2)  # fmt: skip
        for cursor, steps in ((Cursor(), 2), (Cursor(0, 1), 3), (Cursor(1, 0), 10**6)):
            # the oracle: the shards of the rows the loop itself will read, in that order
            want: list[int] = []
            c = cursor
            for _ in range(min(steps, 4 * sampler.steps_per_epoch)):
                for rows in sampler.micro_batches(c):
                    for row in rows:
                        k = int(np.searchsorted(reader._starts, row, side="right")) - 1
                        want += [] if k in want else [k]
                c = sampler.advance(c)
            assert shards_in_order(reader, sampler, cursor, steps) == want
    assert len(shards_in_order(reader, sampler, Cursor(), 1)) <= 2 < reader.shard_count
