"""C8 on every shard folder a test writes (an autouse fixture of conftest runs it after each test
on the folders under the test's ``tmp_path``): the last trained token of every trained reply is
in the stop set that ``index.json`` records.

A trained reply is a run of trained tokens inside one record. Runs are not replies where the
pack's options say so: ``train_on: everything`` (one run per record), ``missing_stop: allow``
(replies without a stop, on purpose), a record cut short by ``--overflow truncate`` (its last
run may end anywhere) or by ``cutoff`` (any reply may be cut), and a message trained by its own
``train`` flag that is not an assistant reply (the index counts none of these: a test that packs
such records says so with ``pytest.mark.trained_prompts``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sftdata import IGNORE_INDEX


def shard_folders(root: Path) -> list[Path]:
    """Every finished shard folder under ``root``."""
    found = []
    for index in root.rglob("index.json"):
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # hostile-input tests write such files
            continue
        if isinstance(doc, dict) and doc.get("kind") == "sftpipe.shards":
            found.append(index.parent)
    return found


def check_stops(folder: Path) -> int:
    """Assert C8's stop rule on one shard folder; return the replies checked."""
    from sftdata.shards import ShardReader

    index: dict[str, Any] = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    opts = index.get("options", {})
    stops = index.get("template", {}).get("stops")
    if stops is None or opts.get("train_on") == "everything":
        return 0
    if opts.get("missing_stop") == "allow":
        return 0
    counts = index["counts"]
    if opts.get("overflow") == "cutoff" and counts.get("truncated"):
        return 0
    cut_ok = opts.get("overflow") == "truncate" and counts.get("truncated")
    ids = {s["id"] for s in stops}
    seq_len = int(index["seq_len"])
    checked = 0
    from sftdata.errors import ShardError

    for split in index["splits"]:
        try:
            reader = ShardReader(folder, split=split)
            reader[0] if len(reader) else None
        except ShardError:
            return 0  # a folder a test damaged on purpose (the hostile-input suites)
        for r in range(len(reader)):
            row = reader[r]
            trained = row["labels"] != IGNORE_INDEX
            pos = 0
            for k, n in enumerate(row["seq_lens"].tolist()):
                if k < len(row["record_ids"]):
                    seg = trained[pos : pos + n].astype(np.int8)
                    ends = np.flatnonzero(np.diff(np.concatenate([seg, [0]])) == -1)
                    for e in ends.tolist():
                        if cut_ok and n == seq_len and e == n - 1:
                            continue  # this record may have been truncated here
                        token = int(row["input_ids"][pos + e])
                        assert token in ids, (
                            f"{folder}: split {split} row {r} record {row['record_ids'][k]!r}: "
                            f"a trained reply ends in token {token}, not in the stop set {ids}"
                        )
                        checked += 1
                pos += n
    return checked
