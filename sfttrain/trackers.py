"""Experiment trackers (``report_to``): TensorBoard, Weights & Biases, MLflow, through the
libraries themselves (optional extras), with the tag names Hugging Face's Trainer writes
(``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ``eval/loss``...), so dashboards
built for HF runs read ours.

Each tracker is configured the way its library is: wandb by ``WANDB_MODE`` (``offline`` writes
``RUN_DIR/wandb/`` only), ``WANDB_PROJECT``, ``WANDB_ENTITY``; MLflow by ``MLFLOW_TRACKING_URI``
and ``MLFLOW_EXPERIMENT_NAME`` (without a tracking URI, a local store in ``RUN_DIR/mlruns``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from sftdata.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
REPORT_TO = ("auto", "all", "none", *TRACKERS)
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}

# metrics.jsonl key -> the tag HF's Trainer logs it under
HF_TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "trained_tokens": "train/num_trained_tokens",
    "tokens_per_s": "train/trained_tokens_per_second",
    "peak_mem_mb": "train/peak_memory_mb",
    "mfu": "train/mfu",
    "eval_loss": "eval/loss",
    "eval_perplexity": "eval/perplexity",
    "eval_tokens": "eval/num_trained_tokens",
}


def report_to_names(report_to: str | list[str], *, where: str = "") -> list[str]:
    """The names ``report_to`` gives (a list, or comma-separated), each one of :data:`REPORT_TO`.

    Raises:
        ConfigError: ``{where}report_to: 'x' is not one of ...``.
    """
    names = report_to if isinstance(report_to, list) else report_to.split(",")
    names = [n.strip() for n in names if n.strip()]
    for n in names:
        if n not in REPORT_TO:
            raise ConfigError(f"{where}report_to: {n!r} is not one of {', '.join(REPORT_TO)}")
    return names


def resolve_report_to(report_to: str | list[str]) -> list[str]:
    """``report_to`` -> the trackers to open: ``auto`` is TensorBoard when installed, ``all``
    every installed one, ``none`` none; named ones must be installed.

    Raises:
        ConfigError: an unknown name, or a named tracker whose package is missing (which extra
            to install).
    """
    names = report_to_names(report_to)
    if "none" in names:
        return []
    installed = [t for t in TRACKERS if importlib.util.find_spec(_PACKAGES[t]) is not None]
    if "all" in names:
        return installed
    out = ["tensorboard"] if "auto" in names and "tensorboard" in installed else []
    for n in names:
        if n in TRACKERS and n not in out:
            if n not in installed:
                raise ConfigError(
                    f"report_to: {n} needs the {_PACKAGES[n]} package: pip install 'sftpipe[{n}]'"
                )
            out.append(n)
    return out


def hf_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as HF-named scalars (``step`` and missing values left out)."""
    return {
        HF_TAGS.get(k) or (f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): float(v)
        for k, v in row.items()
        if k not in ("step", "format_version") and isinstance(v, (int, float))
        and not isinstance(v, bool)
    }  # fmt: skip


class Trackers:
    """The open trackers of a run (rank 0 only): config once, every row, the final summary."""

    def __init__(self, names: list[str], run_dir: Path, *, config: dict[str, Any],
                 resume: bool) -> None:  # fmt: skip
        self._tb = self._wandb = self._mlflow = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "sftpipe"), dir=str(run_dir),
                name=run_dir.name, config=config, resume="allow" if resume else None,
                reinit="finish_previous",
            )  # fmt: skip
        if "mlflow" in names:
            self._mlflow = _start_mlflow(run_dir, config)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        scalars = hf_metrics(row)
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, step)
        if self._wandb is not None:
            self._wandb.log({**scalars, "train/global_step": step}, step=step)
        if self._mlflow is not None:
            import mlflow

            mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            import mlflow

            mlflow.end_run()


def _start_mlflow(run_dir: Path, config: dict[str, Any]) -> Any:
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri or uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps its file store behind this switch: allowed where the store is one (the
        # run's own folder when nobody named a server, or a file: store the user named)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # set every time: MLflow keeps the last URI set in the process, which would beat the
    # environment for a second run in the same process
    mlflow.set_tracking_uri(uri or (run_dir / "mlruns").resolve().as_uri())
    try:
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "sftpipe"))
        run = mlflow.start_run(run_name=run_dir.name)
        # MLflow params are strings of at most 6,000 characters; the config's values are short
        mlflow.log_params({k: str(v) for k, v in config.items()})
    except Exception as e:  # MLflow's errors for a store it cannot use: one line, the fix
        raise ConfigError(
            f"report_to mlflow: MLFLOW_TRACKING_URI={uri}: {_mlflow_problem(e, uri)}"
        ) from None
    return run


def _mlflow_problem(e: Exception, uri: str) -> str:
    text = " ".join(str(e).split())
    scheme = uri.split(":", 1)[0]
    if "Unsupported" in type(e).__name__ or "unsupported URI" in text:
        return (
            f"this MLflow install cannot open {scheme}: stores (mlflow-skinny has no database "
            "store): pip install mlflow, or point it at a tracking server (http://...)"
        )
    if "MLFLOW_ALLOW_FILE_STORE" in text:
        return "MLflow refuses its file store: set MLFLOW_ALLOW_FILE_STORE=true, or use a server"
    return f"{type(e).__name__}: {text[:300]} (check the URI and that the server is running)"


__all__ = [
    "HF_TAGS",
    "REPORT_TO",
    "TRACKERS",
    "Trackers",
    "hf_metrics",
    "report_to_names",
    "resolve_report_to",
]
