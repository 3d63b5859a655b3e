"""Experiment trackers (``sfttrain.trackers``), for real: TensorBoard events, a wandb offline run
and an MLflow local store are read back and hold what metrics.jsonl holds, under HF's tag names."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from sftdata.errors import ConfigError
from sfttrain.config import build_config
from sfttrain.trackers import hf_metrics, resolve_report_to
from sfttrain.train import train
from tests.sfttrain_helpers import demo_shards, metrics


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_shards(tmp_path_factory.mktemp("trk"), val_count=4)


def _train(shards: Path, out: Path, report_to: object) -> list[dict]:
    cfg = build_config({"max_steps": 3, "logging_steps": 1, "eval_steps": 2,
                        "report_to": report_to, "learning_rate": 1e-3})  # fmt: skip
    train(cfg, shards=shards, output_dir=out, model_spec="tiny", progress=False)
    return metrics(out)


def _losses(rows: list[dict], key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def test_report_to_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_report_to("none") == [] and resolve_report_to(["none"]) == []
    assert resolve_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert resolve_report_to(["mlflow"]) == ["mlflow"]
    with pytest.raises(ConfigError, match="report_to: 'neptune' is not one of"):
        resolve_report_to("neptune")
    with pytest.raises(ConfigError, match="report_to: 'swanlab' is not one of"):
        build_config({"report_to": ["tensorboard", "swanlab"]})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(
        ConfigError,
        match=r"report_to: wandb needs the wandb package: pip install 'sftpipe\[wandb\]'",
    ):
        resolve_report_to("wandb")
    assert "wandb" not in resolve_report_to("all")


def test_hf_tag_names() -> None:
    row = {"step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": None, "epoch": 0.5}
    assert hf_metrics(row) == {"train/loss": 1.5, "train/learning_rate": 1e-4, "train/epoch": 0.5}
    assert hf_metrics({"step": 3, "eval_loss": 2.0}) == {"eval/loss": 2.0}


def test_tensorboard_events_carry_hf_tags(shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _train(shards, tmp_path / "run", "tensorboard")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert got == pytest.approx(_losses(rows))
    assert {"train/learning_rate", "eval/loss"} <= set(acc.Tags()["scalars"])


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file (LevelDB log blocks after a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def test_wandb_offline_run_is_read_back(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "sftpipe-test")
    rows = _train(shards, tmp_path / "run", ["wandb"])
    (path,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[int, dict[str, float]] = {}
    config: dict[str, object] = {}
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item
            }
            history.setdefault(int(items["_step"]), {}).update(items)
        elif kind == "run":
            config |= {i.key: json.loads(i.value_json) for i in rec.run.config.update}
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == pytest.approx(
        _losses(rows)
    )
    assert history[2]["eval/loss"] == pytest.approx(_losses(rows, "eval_loss")[2])
    assert config["learning_rate"] == 1e-3 and config["max_steps"] == 3


def test_mlflow_local_store_is_read_back(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = _train(shards, tmp_path / "run", "mlflow")
    client = MlflowClient((tmp_path / "run" / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "sftpipe"]
    (run,) = client.search_runs([exp.experiment_id])
    got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert got == pytest.approx(_losses(rows))
    evals = client.get_metric_history(run.info.run_id, "eval/loss")
    assert {m.step for m in evals} == {2, 3}
    assert run.data.params["learning_rate"] == "0.001" and run.info.status == "FINISHED"


def test_a_users_own_mlflow_store_is_used_or_refused_in_one_line(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLFLOW_TRACKING_URI as users set it: a file: store they named is written (MLflow 3 refuses
    its file store unless told, and the user told us by naming one); a store this MLflow cannot
    open is one line naming the setting and the fix, not a traceback."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from sftdata.errors import ConfigError

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = (tmp_path / "store").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    rows = _train(shards, tmp_path / "run", "mlflow")
    (exp,) = [e for e in MlflowClient(store).search_experiments() if e.name == "sftpipe"]
    (run,) = MlflowClient(store).search_runs([exp.experiment_id])
    assert {m.step for m in MlflowClient(store).get_metric_history(run.info.run_id, "train/loss")} \
        == set(_losses(rows))  # fmt: skip
    assert not (tmp_path / "run" / "mlruns").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknownscheme://nowhere")
    with pytest.raises(ConfigError) as e:
        _train(shards, tmp_path / "run2", "mlflow")
    line = str(e.value)
    assert line.startswith("report_to mlflow: MLFLOW_TRACKING_URI=unknownscheme://nowhere: ")
    assert "\n" not in line
