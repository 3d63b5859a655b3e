"""Two nodes on one machine: two torchrun launchers (``--nnodes 2 --nproc-per-node 1``) meeting
through a c10d rendezvous on 127.0.0.1, as two machines of a cluster would. Reading the same
shards from object storage through separate node caches, the same losses and weights as one
process (C3); a SIGTERM on one node stops both with one checkpoint, and that checkpoint resumes on
a single node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sfttrain.checkpoint import complete_checkpoints, read_state
from tests.sfttrain import test_distributed as single_node
from tests.sfttrain.test_distributed import (
    COMMON,
    _children,
    _free_port,
    _rank_of,
    _sets,
    assert_same_eval,
    assert_same_losses,
    assert_same_weights,
    in_process,
)
from tests.sfttrain_helpers import ROOT, metrics, subprocess_env, train_losses

pytestmark = pytest.mark.slow
# the single-node tests' fixtures: the same 17 training rows and 1-rank × accumulation 8 reference
shards = single_node.shards
lora_ref = single_node.lora_ref


def node_cmd(
    node: int, port: int, run_id: str, shards: Path | str, out: Path, values: dict
) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
        "--local-addr=127.0.0.1",
        "-m", "sfttrain", "run", str(shards), "-o", str(out), "--model", "tiny", "--no-progress",
        *_sets(values),
    ]  # fmt: skip


def start_nodes(
    shards: Path | str, out: Path, values: dict, caches: tuple[Path, Path] | None = None
) -> list[subprocess.Popen]:
    """Two torchrun launchers; with ``caches``, each node its own ``SFTPIPE_CACHE`` (machines of
    a cluster without a shared filesystem)."""
    port, run_id = _free_port(), uuid.uuid4().hex[:8]
    env = subprocess_env()
    return [
        subprocess.Popen(
            node_cmd(node, port, run_id, shards, out, values),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env if caches is None else {**env, "SFTPIPE_CACHE": str(caches[node])},
            cwd=ROOT,
        )
        for node in (0, 1)
    ]


def finish(nodes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[str, str]]:
    outputs = []
    try:
        for p in nodes:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(nodes, outputs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    return outputs


def test_two_nodes_train_like_one_process_from_object_storage(shards, lora_ref, s3, tmp_path):
    """The shards in S3 (a local S3 API server), each node with its own cache: the losses,
    weights and evaluation of one process on the local folder."""
    from sftdata.remote import upload

    url = "s3://bkt/nodes/shards"
    upload(shards, url)
    out, caches = tmp_path / "run", (tmp_path / "cache-0", tmp_path / "cache-1")
    values = {**COMMON, "gradient_accumulation_steps": 4}
    outputs = finish(start_nodes(url, out, values, caches))
    for cache in caches:  # each node fetched into its own cache, and verified what it read
        assert sorted(p.name for p in cache.glob("remote/*/*.arrow")) == sorted(
            p.name for p in shards.glob("*.arrow")
        )
    assert sum(o.count("trained 6 steps") for o, _ in outputs) == 1  # rank 0 reports, once
    assert read_state(complete_checkpoints(out)[-1])["world_size"] == 2
    assert_same_losses(train_losses(out), train_losses(lora_ref), range(1, 7))
    assert_same_weights(out / "final", lora_ref / "final")
    assert_same_eval(out, lora_ref)


def test_sigterm_on_one_node_stops_both_and_resumes_on_one(shards, tmp_path) -> None:
    out = tmp_path / "run"
    values = {**COMMON, "gradient_accumulation_steps": 4, "num_train_epochs": 8, "save_steps": 0}
    nodes = start_nodes(shards, out, values)
    try:
        deadline = time.monotonic() + 180
        while not [r for r in metrics(out) if r.get("step", 0) >= 2]:
            assert all(p.poll() is None for p in nodes), [p.communicate() for p in nodes]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        # the worker of whichever launcher holds rank 1 (the rendezvous assigns ranks)
        workers = [c for p in nodes for c in _children(p.pid)]
        rank1 = [w for w in workers if _rank_of(w) == 1]
        assert len(rank1) == 1, workers
        os.kill(rank1[0], signal.SIGTERM)  # one node's worker only; the other learns it
    except BaseException:
        for p in nodes:
            p.kill()
        raise
    outputs = finish(nodes, timeout=180)
    assert sum("stopped at step" in o for o, _ in outputs) == 1
    last = complete_checkpoints(out)[-1]
    state = read_state(last)
    assert state["world_size"] == 2
    assert state["step"] == max(r["step"] for r in metrics(out) if "loss" in r) < 24
    assert not (out / "final").exists()

    # resumed on one node (one process, accumulation 8: the same global batch), as a cluster job
    # restarted on fewer machines would be: the rest of the run is the uninterrupted one's
    one = {**values, "gradient_accumulation_steps": 8}
    in_process(shards, out, one, resume=str(last))
    ref = tmp_path / "ref"
    in_process(shards, ref, one)
    assert_same_losses(train_losses(out), train_losses(ref), range(state["step"] + 1, 25))
    assert_same_weights(out / "final", ref / "final")
