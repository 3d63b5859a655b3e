"""What a run reports: ``metrics.jsonl`` (one versioned JSON line per log/eval), TensorBoard,
``loss.png``, peak memory and the progress bar."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sftdata.atomic import atomic_file
from sfttrain.perf import mfu
from sfttrain.trackers import Trackers

METRICS_VERSION = 1


class Metrics:
    """``metrics.jsonl`` (one JSON line per log/eval, flushed at once) and the ``report_to``
    trackers (``sfttrain.trackers``: TensorBoard, wandb, MLflow with HF's tag names)."""

    def __init__(
        self, run_dir: Path, *, resume_step: int | None, trackers: list[str],
        enabled: bool, config: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.trackers: Trackers | None = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Lines after the checkpoint belong to steps that will run again: drop them.
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with atomic_file(self.path) as f:
                f.write("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if trackers:
            self.trackers = Trackers(
                trackers, run_dir, config=config or {}, resume=resume_step is not None
            )

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps({"format_version": METRICS_VERSION, **row}) + "\n")
        self._f.flush()
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self.trackers is not None:
                self.trackers.close()

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Lines of a metrics file; a torn last line (the run was SIGKILLed mid-write) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """``loss.png``: train loss per logging step and eval loss per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, mode="wb", encoding=None) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class LogWindow:
    """The steps since the last logged one: their loss sum (kept on the device and read only when
    logging, so a step never waits for the host), trained tokens, positions processed (for MFU) and
    the wall time they took (``restart_clock`` after evaluating or saving: that is not training)."""

    def __init__(
        self, device: torch.device, *, flops_per_token: float, peak_tflops: float | None,
        world_size: int,
    ) -> None:  # fmt: skip
        self.device = device
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.world_size = world_size
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        """Start the next window."""
        self.loss_sum.zero_()
        self.trained_tokens = 0
        self.positions = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Count the window's time from now."""
        self.start = time.perf_counter()

    def row(
        self, *, step: int, epoch: float, loss: float, lr: float, grad_norm: Any,
        trained_tokens: int,
    ) -> dict[str, Any]:  # fmt: skip
        """The ``metrics.jsonl`` row that closes the window (``loss``: its loss, over all ranks)."""
        elapsed = time.perf_counter() - self.start
        step_mfu = mfu(
            self.flops_per_token,
            self.positions / elapsed if elapsed > 0 else 0.0,
            peak_tflops=self.peak_tflops,
            world_size=self.world_size,
        )
        return {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "trained_tokens": trained_tokens,
            "tokens_per_s": round(self.trained_tokens / elapsed, 1) if elapsed > 0 else 0.0,
            "peak_mem_mb": round(peak_memory_mb(self.device), 1),
            "mfu": None if step_mfu is None else round(step_mfu, 4),
        }


def show_progress(bar: Any, row: dict[str, Any]) -> None:
    """A logged training row on the progress bar (no-op without one)."""
    if bar is None:
        return
    mfu = row["mfu"]
    bar.update(
        0,
        loss=f"{row['loss']:.4f}",
        lr=f"{row['lr']:.2e}",
        tps=f"{row['tokens_per_s']:,.0f}",
        mfu="-" if mfu is None else f"{100 * mfu:.1f}%",
    )


def progress_bar(enabled: bool, total: int, start: int) -> Any:
    """A rich progress bar on stderr (step, loss, lr, trained tokens/s, ETA), or a no-op."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"
            "  MFU {task.fields[mfu]}"
        ),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", mfu="-")
    return progress


__all__ = [
    "METRICS_VERSION",
    "LogWindow",
    "Metrics",
    "peak_memory_mb",
    "plot_loss",
    "progress_bar",
    "read_metrics",
    "show_progress",
]
