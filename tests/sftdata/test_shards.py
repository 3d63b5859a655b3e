"""Shard writer/reader: round trip, zero copy, datasets interop, and every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from sftdata import IGNORE_INDEX, __version__
from sftdata.errors import ShardError
from sftdata.pack import build_row, pack_rows
from sftdata.shards import (
    INDEX_NAME,
    ShardReader,
    ShardWriter,
    read_index,
    validate_index,
    write_index,
)

SEQ = 16


def _records(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(2, 12))
        ids = rng.integers(5, 100, size=k).astype(np.int32)
        mask = rng.random(k) < 0.6
        out.append((f"rec-{i}", ids, mask))
    return out


def make_folder(
    folder: Path, *, n: int = 40, shard_size: int = 4
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Pack ``n`` synthetic records into ``folder`` with a valid index; return the records."""
    folder.mkdir(parents=True, exist_ok=True)
    recs = _records(n)
    rows = pack_rows([len(r[1]) for r in recs], seq_len=SEQ)
    w = ShardWriter(folder, split="train", seq_len=SEQ, shard_size=shard_size)
    tokens = trained = 0
    for row in rows:
        w.add(
            build_row([(recs[i][1], recs[i][2]) for i in row], seq_len=SEQ, pad_id=0),
            [recs[i][0] for i in row],
        )
    w.flush()
    for _, ids, mask in recs:
        tokens += len(ids)
        trained += int(mask[1:].sum())
    h = "0" * 64
    index = {
        "format_version": 1,
        "kind": "sftpipe.shards",
        "tool": {"name": "sftpipe", "version": __version__},
        "seq_len": SEQ,
        "packed": True,
        "tokenizer": {"name": "t", "class": "X", "vocab_size": 100, "sha256": h, "pad_token_id": 0},
        "template": {"name": "chatml", "sha256": h},
        "options": {
            "train_on": "all-assistant",
            "overflow": "drop",
            "pack": True,
            "seed": 0,
            "val_fraction": None,
            "val_count": None,
            "shard_size": shard_size,
        },
        "inputs": [{"file": "x.jsonl", "bytes": 1, "sha256": h}],
        "fingerprint": h,
        "counts": {
            "records_in": n,
            "dropped": {"zero_trained": 0, "overflow": 0},
            "truncated": 0,
            "records": n,
            "rows": len(rows),
            "tokens": tokens,
            "trained_tokens": trained,
            "pad_tokens": len(rows) * SEQ - tokens,
            "packing_efficiency": tokens / (len(rows) * SEQ),
        },
        "splits": {
            "train": {
                "rows": len(rows),
                "records": n,
                "tokens": tokens,
                "trained_tokens": trained,
                "shards": w.shards,
            }
        },
    }
    write_index(folder, index)
    return recs


def _edit_index(folder: Path, fn) -> None:
    p = folder / INDEX_NAME
    index = json.loads(p.read_text())
    fn(index)
    p.write_text(json.dumps(index))


def test_round_trip_every_record_once_with_correct_labels(tmp_path: Path) -> None:
    recs = make_folder(tmp_path / "s")
    by_id = {r[0]: r for r in recs}
    reader = ShardReader(tmp_path / "s", verify="full")
    assert reader.seq_len == SEQ and len(reader) == reader.index["counts"]["rows"]
    seen = []
    for i in range(len(reader)):
        row = reader[i]
        assert row["input_ids"].shape == (SEQ,) and row["input_ids"].dtype == np.int32
        assert int(row["seq_lens"].sum()) == SEQ
        pos = 0
        for j, n in enumerate(row["seq_lens"].tolist()):
            assert row["position_ids"][pos : pos + n].tolist() == list(range(n))
            if j < len(row["record_ids"]):
                rid, ids, mask = by_id[row["record_ids"][j]]
                assert row["input_ids"][pos : pos + n].tolist() == ids.tolist()
                want = np.where(mask, ids, IGNORE_INDEX)
                want[0] = IGNORE_INDEX
                assert row["labels"][pos : pos + n].tolist() == want.tolist()
                seen.append(rid)
            else:  # the padding segment
                assert n == row["num_pad"]
                assert (row["labels"][pos:] == IGNORE_INDEX).all()
            pos += n
    assert sorted(seen) == sorted(by_id)


def test_rows_are_zero_copy_views_of_the_memory_map(tmp_path: Path) -> None:
    import pyarrow as pa

    make_folder(tmp_path / "s")
    before = pa.total_allocated_bytes()
    reader = ShardReader(tmp_path / "s")
    row = reader[0]
    _ = reader[len(reader) - 1]
    assert pa.total_allocated_bytes() == before  # Arrow copied nothing: views of the map
    assert not row["input_ids"].flags.owndata
    assert not row["input_ids"].flags.writeable
    batch = reader.get_batch([0, 2, 1])
    assert batch["input_ids"].shape == (3, SEQ)
    assert batch["labels"][1].tolist() == reader[2]["labels"].tolist()
    assert len(batch["seq_lens"]) == 3 and len(batch["record_ids"]) == 3
    assert batch["num_pad"].tolist() == [reader[i]["num_pad"] for i in (0, 2, 1)]
    assert reader[-1]["record_ids"] == reader[len(reader) - 1]["record_ids"]
    with pytest.raises(IndexError):
        reader[len(reader)]


def test_datasets_from_file_opens_a_shard(tmp_path: Path) -> None:
    import datasets

    make_folder(tmp_path / "s")
    reader = ShardReader(tmp_path / "s")
    first = reader.index["splits"]["train"]["shards"][0]
    ds = datasets.Dataset.from_file(str(tmp_path / "s" / first["file"]))
    assert len(ds) == first["rows"]
    assert set(ds.column_names) == {
        "input_ids",
        "labels",
        "position_ids",
        "seq_lens",
        "num_pad",
        "record_ids",
    }
    assert ds[0]["input_ids"] == reader[0]["input_ids"].tolist()
    assert ds[0]["record_ids"] == reader[0]["record_ids"]
    assert ds.with_format("numpy")[:2]["labels"].shape == (2, SEQ)


def test_index_validates_and_find_record(tmp_path: Path) -> None:
    make_folder(tmp_path / "s")
    index = read_index(tmp_path / "s")
    validate_index(index, where="x")
    with pytest.raises(ShardError, match="counts"):
        validate_index({**index, "counts": {}}, where="x")
    reader = ShardReader(tmp_path / "s")
    row, seg = reader.find_record("rec-7")
    assert reader[row]["record_ids"][seg] == "rec-7"
    with pytest.raises(ShardError, match="no record 'nope'"):
        reader.find_record("nope")
    assert ShardReader.splits(tmp_path / "s") == ["train"]


def test_writer_is_byte_deterministic(tmp_path: Path) -> None:
    make_folder(tmp_path / "a")
    make_folder(tmp_path / "b")
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ---------------------------------------------------------------- refusals


def test_refuses_folder_without_index(tmp_path: Path) -> None:
    make_folder(tmp_path / "s")
    (tmp_path / "s" / INDEX_NAME).unlink()
    with pytest.raises(ShardError, match=r"s: no index.json"):
        ShardReader(tmp_path / "s")
    with pytest.raises(ShardError, match="not a folder"):
        ShardReader(tmp_path / "missing")


def test_refuses_unknown_format_version(tmp_path: Path) -> None:
    make_folder(tmp_path / "s")
    _edit_index(tmp_path / "s", lambda ix: ix.update(format_version=99))
    with pytest.raises(ShardError, match="format_version 99 is not supported"):
        ShardReader(tmp_path / "s")


def test_refuses_size_mismatch(tmp_path: Path) -> None:
    make_folder(tmp_path / "s")
    with open(tmp_path / "s" / "train-00001.arrow", "ab") as f:
        f.write(b"x")
    with pytest.raises(ShardError, match=r"train-00001.arrow: size \d+ bytes, the index says \d+"):
        ShardReader(tmp_path / "s")


def test_refuses_sha256_mismatch_full_and_lazy(tmp_path: Path) -> None:
    make_folder(tmp_path / "s", shard_size=100)
    p = tmp_path / "s" / "train-00000.arrow"
    data = bytearray(p.read_bytes())
    data[-200] ^= 0xFF  # same size, different bytes
    p.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00000\.arrow: sha256 .* does not match the index"):
        ShardReader(tmp_path / "s", verify="full")
    lazy = ShardReader(tmp_path / "s")  # opens: sizes are fine
    with pytest.raises(ShardError, match="does not match the index"):
        lazy[0]
    assert ShardReader(tmp_path / "s", verify="size")[0]["input_ids"].shape == (SEQ,)


@pytest.mark.parametrize("name", ["../evil.arrow", "/etc/passwd", "sub/x.arrow", "..", ""])
def test_refuses_escaping_shard_names(tmp_path: Path, name: str) -> None:
    make_folder(tmp_path / "s")
    _edit_index(tmp_path / "s", lambda ix: ix["splits"]["train"]["shards"][0].update(file=name))
    with pytest.raises(ShardError, match="not a plain file name inside the folder"):
        ShardReader(tmp_path / "s")


def test_refuses_symlink_out_of_folder(tmp_path: Path) -> None:
    make_folder(tmp_path / "s")
    outside = tmp_path / "outside.arrow"
    (tmp_path / "s" / "train-00000.arrow").rename(outside)
    (tmp_path / "s" / "train-00000.arrow").symlink_to(outside)
    with pytest.raises(ShardError, match="points outside the folder"):
        ShardReader(tmp_path / "s")


def test_refuses_missing_shard_file_and_unknown_split(tmp_path: Path) -> None:
    make_folder(tmp_path / "s")
    (tmp_path / "s" / "train-00002.arrow").unlink()
    with pytest.raises(ShardError, match=r"train-00002\.arrow: shard file is missing"):
        ShardReader(tmp_path / "s")
    make_folder(tmp_path / "t")
    with pytest.raises(ShardError, match="no split 'validation'"):
        ShardReader(tmp_path / "t", split="validation")


def test_refuses_foreign_file_with_right_size_and_hash(tmp_path: Path) -> None:
    make_folder(tmp_path / "s")
    p = tmp_path / "s" / "train-00000.arrow"
    p.write_bytes(b"not arrow at all" * 64)  # as many bytes as the rows need, no Arrow

    def fix(ix: dict) -> None:
        e = ix["splits"]["train"]["shards"][0]
        e.update(bytes=p.stat().st_size, sha256=hashlib.sha256(p.read_bytes()).hexdigest())

    _edit_index(tmp_path / "s", fix)
    reader = ShardReader(tmp_path / "s")
    with pytest.raises(ShardError, match=r"train-00000\.arrow: not a readable Arrow shard"):
        reader[0]


def test_reader_pickles_for_dataloader_workers(tmp_path: Path) -> None:
    import pickle

    make_folder(tmp_path / "s")
    reader = ShardReader(tmp_path / "s")
    _ = reader[0]
    clone = pickle.loads(pickle.dumps(reader))
    assert clone[3]["input_ids"].tolist() == reader[3]["input_ids"].tolist()


def test_an_index_claiming_more_than_its_files_hold_is_refused_at_open(tmp_path: Path) -> None:
    make_folder(tmp_path / "s")

    def rows(ix: dict) -> None:
        ix["splits"]["train"]["rows"] = 10**12
        ix["splits"]["train"]["shards"][0]["rows"] = 10**12

    _edit_index(tmp_path / "s", rows)
    with pytest.raises(ShardError, match=r"bytes cannot hold the 1,000,000,000,000 rows"):
        ShardReader(tmp_path / "s")


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    """Shards whose hashes agree with their index but whose ids no tokenizer of the index has
    (a crafted file): refused when the shard is first read, naming the id."""
    make_folder(tmp_path / "s")
    _edit_index(tmp_path / "s", lambda ix: ix["tokenizer"].update(vocab_size=3))
    with pytest.raises(ShardError, match=r"train-00000\.arrow: token id \d+ is outside the tokenizer's vocabulary \(3 ids\)"):  # fmt: skip
        ShardReader(tmp_path / "s")[0]


def test_a_crafted_shard_deep_in_the_split_is_refused_at_open_when_verifying(
    tmp_path: Path,
) -> None:
    """The last shard replaced by a foreign Arrow file whose size and hash the index was made to
    agree with: ``verify="full"`` (what a training run opens its shards with) refuses it at open,
    before the first batch, not when training reaches it; ``lazy`` finds it when it is read."""
    make_folder(tmp_path / "s", n=40, shard_size=4)
    index = json.loads((tmp_path / "s" / INDEX_NAME).read_text())
    shards = index["splits"]["train"]["shards"]
    assert len(shards) >= 3
    first, last = tmp_path / "s" / shards[0]["file"], tmp_path / "s" / shards[-1]["file"]
    assert shards[0]["rows"] > shards[-1]["rows"]  # so the size check at open still passes
    last.write_bytes(first.read_bytes())

    def fix(ix: dict) -> None:
        e = ix["splits"]["train"]["shards"][-1]
        e.update(bytes=last.stat().st_size, sha256=hashlib.sha256(last.read_bytes()).hexdigest())

    _edit_index(tmp_path / "s", fix)
    want = rf"{last.name}: holds {shards[0]['rows']} rows, the index says {shards[-1]['rows']}"
    with pytest.raises(ShardError, match=want):
        ShardReader(tmp_path / "s", verify="full")
    lazy = ShardReader(tmp_path / "s", verify="lazy")
    assert lazy[0]["input_ids"].shape == (SEQ,)  # the first shard reads
    with pytest.raises(ShardError, match=want):
        lazy[len(lazy) - 1]


class _SlowFetch:
    """A remote folder's fetch, from a local one: every shard but the first waits for ``go``."""

    def __init__(self, source: Path, dest: Path, *, bad: str | None = None) -> None:
        import shutil
        import threading

        self.source, self.dest, self.bad = source, dest, bad
        self.go, self.fetched = threading.Event(), []
        dest.mkdir()
        shutil.copy(source / INDEX_NAME, dest / INDEX_NAME)

    def __call__(self, name: str) -> Path:
        import shutil

        if not name.endswith("00000.arrow"):
            assert self.go.wait(30)
        if name == self.bad:
            raise ShardError(f"remote/{name}: fetched twice, and neither copy matches the index")
        shutil.copy(self.source / name, self.dest / name)
        self.fetched.append(name)
        return self.dest / name


def test_a_fetched_folder_serves_rows_before_the_rest_arrives(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", shard_size=2)
    local = ShardReader(tmp_path / "src")
    fetch = _SlowFetch(tmp_path / "src", tmp_path / "cache")
    reader = ShardReader(tmp_path / "cache", verify="lazy", fetch=fetch)
    assert reader.shard_count == local.shard_count >= 4
    assert not list((tmp_path / "cache").glob("*.arrow"))  # opening fetches nothing
    reader.prefetch(range(reader.shard_count))
    # row 0 is read while every later shard's download is still held back
    assert reader[0]["input_ids"].tolist() == local[0]["input_ids"].tolist()
    assert fetch.fetched == ["train-00000.arrow"]
    fetch.go.set()
    for i in range(len(local)):
        assert reader[i]["input_ids"].tolist() == local[i]["input_ids"].tolist()
    assert sorted(fetch.fetched) == sorted(p.name for p in (tmp_path / "src").glob("*.arrow"))
    reader.close()


def test_a_shard_refused_in_the_background_stops_the_next_read(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", shard_size=2)
    fetch = _SlowFetch(tmp_path / "src", tmp_path / "cache", bad="train-00003.arrow")
    reader = ShardReader(tmp_path / "cache", fetch=fetch)
    reader.prefetch([0, 3, 1, 2])
    _ = reader[0]  # shard 0 is here
    fetch.go.set()
    deadline = time.monotonic() + 30
    while "train-00002.arrow" not in fetch.fetched and time.monotonic() < deadline:
        time.sleep(0.01)
    # a row of a shard that did arrive: the refusal of shard 3 is raised first
    with pytest.raises(ShardError, match=r"train-00003\.arrow: fetched twice"):
        _ = reader[0]
    reader.close()
