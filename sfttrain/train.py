"""The training loop: one function, ``train``, readable top to bottom.

    1. open the shards, load the model, check they belong together
    2. LoRA or full fine-tuning, AdamW, warm-up + decay schedule, the step sampler
    3. resume (weights, optimizer, scheduler, cursor; RNG last)
    4. the loop: per optimizer step
         a. this rank's micro-batches of the step (host arrays from the memory-mapped reader)
         b. trained tokens of the WHOLE step, summed over micro-batches and ranks (C3)
         c. forward/backward per micro-batch: loss_sum × world_size / step_trained_tokens
         d. clip, optimizer and scheduler step
         e. log / evaluate / checkpoint / stop on SIGTERM
    5. final checkpoint, final/ weights, loss.png

Steps 1 and 2 are ``sfttrain.run_setup``. Distributed training plugs in through ``Dist``: ranks, the all-reduce of the trained-token count
and of logged sums, the model wrapper (DDP/FSDP), ``no_sync`` for accumulation micro-batches, a
stop request agreed on. ``sfttrain.distributed`` holds the single-process ``Dist`` and builds the
torch.distributed one from torchrun's environment. Every rank runs as many micro-batches per step
(zero-weight padding, ``StepSampler.padded_micro_batches``): DDP/FSDP collectives run in each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftdata.atomic import exclusive
from sftdata.errors import CheckpointError
from sfttrain.checkpoint import (
    Resume,
    RunState,
    checkpoint_due,
    find_resume,
    latest_checkpoint,
    remove_stale_temps,
)
from sfttrain.config import TrainConfig
from sfttrain.data import (
    Cursor,
    to_tensors,
    trained_tokens,
)
from sfttrain.distributed import Dist, StopRequest
from sfttrain.evaluate import eval_due, eval_row
from sfttrain.events import CheckpointSaved, OnEvent, StopRequested, start_event
from sfttrain.metrics import (
    LogWindow,
    Metrics,
    plot_loss,
    progress_bar,
    show_progress,
)
from sfttrain.perf import (
    check_platform,
    deterministic_kernels,
)
from sfttrain.predict import check_eval_generate, generation_metrics
from sfttrain.run_setup import RunData, Training, setup_data, setup_model, setup_training
from sfttrain.rundir import (
    base_model_dir,
    check_run_dir,
    clear_run_dir,
    save_final,
    save_run_checkpoint,
)
from sfttrain.trackers import resolve_report_to
from sfttrain.weights import restore_training


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves behind."""

    step: int
    total_steps: int
    stopped: bool
    checkpoint: Path | None
    final_dir: Path | None
    last_loss: float | None
    trained_tokens: int
    resume_notes: list[str] = field(default_factory=list)
    """Damaged checkpoints ``--resume auto`` passed over, and which one it used instead."""


def train(
    config: TrainConfig,
    *,
    shards: str | Path,
    output_dir: str | Path,
    model_spec: str,
    resume: str | None = None,
    allow_unverified: bool = False,
    dist: Dist | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    on_log: Callable[[dict[str, Any], int], None] | None = None,
    on_event: OnEvent | None = None,
) -> TrainResult:
    """Fine-tune ``model_spec`` ("tiny" or a local HF folder) on a shard folder; see the module doc.

    Rank 0 holds an exclusive lock on ``output_dir`` for the whole run: a second run into the same
    folder fails at once (torchrun then stops its other ranks) instead of interleaving checkpoints.
    ``on_step(step)`` is called after every optimizer step; ``on_log(row, total_steps)`` on rank 0
    with every ``metrics.jsonl`` row (training and evaluation), for a command to print;
    ``on_event`` on rank 0 with the run's start, each checkpoint saved and a stop request
    (``sfttrain.events``).
    """
    dist = dist or Dist()
    lock = exclusive(output_dir, writer="sfttrain run")  # entered on rank 0 only
    with lock if dist.is_main else contextlib.nullcontext():
        return _train(
            config, shards=shards, output_dir=output_dir, model_spec=model_spec, resume=resume,
            allow_unverified=allow_unverified, dist=dist, progress=progress, on_step=on_step, on_log=on_log,
            on_event=on_event if dist.is_main else None,
        )  # fmt: skip


def _train(
    config: TrainConfig,
    *,
    shards: str | Path,
    output_dir: str | Path,
    model_spec: str,
    resume: str | None,
    allow_unverified: bool,
    dist: Dist,
    progress: bool,
    on_step: Callable[[int], None] | None,
    on_log: Callable[[dict[str, Any], int], None] | None,
    on_event: OnEvent | None,
) -> TrainResult:
    run = _set_up(
        config, shards=shards, run_dir=Path(output_dir), model_spec=model_spec, resume=resume,
        allow_unverified=allow_unverified, dist=dist, on_log=on_log, on_event=on_event,
    )  # fmt: skip
    try:
        stopped, checkpoint, saved_step = _loop(run, progress=progress, on_step=on_step)
    finally:
        run.data.close()  # no more fetching ahead (a URL's shards)
    return _finish(run, stopped=stopped, checkpoint=checkpoint, saved_step=saved_step)


@dataclass
class _Run:
    """A run set up (steps 1-3): what the loop steps, where it stands, where it writes."""

    config: TrainConfig
    dist: Dist
    data: RunData
    t: Training
    state: RunState
    resumed: Resume
    run_dir: Path
    tokenizer: Any
    metrics: Metrics
    event: Callable[[Any], None]
    on_log: Callable[[dict[str, Any], int], None] | None

    def log(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row, also to ``on_log`` (rank 0: what the command prints)."""
        self.metrics.write(row)
        if self.on_log is not None and self.dist.is_main:
            self.on_log(row, self.t.total_steps)

    def save(self) -> Path | None:
        """A checkpoint of where the run stands (the folder on rank 0, else None)."""
        t0 = time.perf_counter()
        path = save_run_checkpoint(
            self.run_dir, self.state, model=self.t.model, optimizer=self.t.optimizer,
            scheduler=self.t.scheduler, tokenizer=self.tokenizer, config=self.config,
            dist=self.dist,
        )  # fmt: skip
        if path is not None:
            self.event(CheckpointSaved(self.state.step, str(path), time.perf_counter() - t0))
        return path

    def evaluate(self, step: int) -> dict[str, Any]:
        """The evaluation row of ``step`` (loss; with ``eval_generate``, BLEU/ROUGE too)."""
        config, t, reader = self.config, self.t, self.data.eval_reader
        row = eval_row(
            t.loss_model, reader, step=step, epoch=round(step / t.sampler.steps_per_epoch, 4),
            batch_size=config.per_device_eval_batch_size, dist=self.dist, autocast=t.autocast,
        )  # fmt: skip
        if config.eval_generate:
            row |= generation_metrics(
                t.model, self.tokenizer, reader,
                folder=self.run_dir / "predictions" / f"step-{step:07d}",
                max_new_tokens=config.max_new_tokens, batch_size=config.per_device_eval_batch_size,
            )  # fmt: skip
        return row


def _set_up(
    config: TrainConfig, *, shards: str | Path, run_dir: Path, model_spec: str, resume: str | None,
    allow_unverified: bool, dist: Dist, on_log: Callable[[dict[str, Any], int], None] | None,
    on_event: OnEvent | None,
) -> _Run:  # fmt: skip
    event = on_event or (lambda _e: None)
    check_platform(config, dist.device)  # QLoRA/Liger/flash attention/bf16 this machine cannot run
    deterministic_kernels(config.deterministic)
    trackers = resolve_report_to(config.report_to)  # a missing package: before any write
    check_eval_generate(config, dist.world_size)

    # ---- 1. data, model, the checkpoint to resume: all checked before anything is written ------
    data = setup_data(config, shards)
    base, tokenizer = setup_model(config, data, model_spec, dist.device)
    check_run_dir(run_dir, shards=data.folder, resume=resume, overwrite=config.overwrite_output_dir)
    resumed = find_resume(
        resume, run_dir, config=config, shards=data.identity, model_spec=model_spec,
        world_size=dist.world_size, allow_unverified=allow_unverified,
    )  # fmt: skip
    cleared = False
    if dist.is_main:
        if config.overwrite_output_dir and resume is None:
            cleared = clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir)
    base_dir = base_model_dir(
        base, tokenizer, model_spec=model_spec, run_dir=run_dir, config=config, dist=dist
    )

    # ---- 2. fine-tuning, wrap, optimizer, schedule, sampler; 3. resume their state -------------
    t = setup_training(config, base, data, dist, resumed=resumed)
    state = RunState(
        step=0, cursor=Cursor(), trained_tokens=0, total_steps=t.total_steps,
        world_size=dist.world_size, model=model_spec, base_model=base_dir, shards=data.identity,
        last_loss=None,
    )  # fmt: skip
    if resumed.state is not None:  # step 3: where the run stood, restored whole; RNG last
        if resumed.state.cursor != t.sampler.cursor_at(resumed.state.step):
            raise CheckpointError(
                f"{resumed.folder}: data cursor {resumed.state.cursor.to_dict()} does not match "
                f"step {resumed.state.step}"
            )
        # what this run is made of now: its ranks, shards (a URL's cache), base model folder
        state = dataclasses.replace(
            resumed.state, world_size=state.world_size, shards=state.shards,
            base_model=state.base_model, total_steps=state.total_steps,
        )  # fmt: skip
        restore_training(
            resumed.folder, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler
        )
    state.cursor = t.sampler.cursor_at(state.step)
    data.fetch_ahead(t.sampler, state.cursor, t.total_steps - state.step)
    event(start_event(
        config, model=t.model, model_spec=model_spec, index=data.reader.index, split="train",
        dist=dist, sampler=t.sampler, total_steps=t.total_steps, output=run_dir, cleared=cleared,
        resumed=resumed,
    ))  # fmt: skip
    metrics = Metrics(
        run_dir, resume_step=state.step if resumed.folder else None, trackers=trackers,
        enabled=dist.is_main, config=config.to_dict(),
    )  # fmt: skip
    return _Run(
        config=config, dist=dist, data=data, t=t, state=state, resumed=resumed, run_dir=run_dir,
        tokenizer=tokenizer, metrics=metrics, event=event, on_log=on_log,
    )  # fmt: skip


def _loop(
    run: _Run, *, progress: bool, on_step: Callable[[int], None] | None
) -> tuple[bool, Path | None, int]:
    """Step 4, the optimizer steps: (stopped by a signal, the last checkpoint, its step)."""
    config, dist, t, state = run.config, run.dist, run.t, run.state
    loss_model, sampler, reader, device = t.loss_model, t.sampler, run.data.reader, dist.device
    loss_model.train()
    window = LogWindow(
        device, flops_per_token=t.flops_per_token, peak_tflops=t.peak_tflops,
        world_size=dist.world_size,
    )  # fmt: skip
    grad_norm: torch.Tensor | None = None
    checkpoint: Path | None = None
    saved_step = state.step if run.resumed.folder else -1
    stopped = False
    with (
        StopRequest(lambda sig: run.event(StopRequested(sig, state.step + 1))) as stop,
        progress_bar(progress and dist.is_main, t.total_steps, state.step) as bar,
    ):
        while state.step < t.total_steps:
            # a. this rank's micro-batches of the step, as host arrays (memory-mapped rows, one stack),
            #    padded with zero-weight ones so every rank runs the same number (DDP/FSDP collectives)
            batches, n_real = sampler.padded_micro_batches(state.cursor)
            host = [reader.get_batch(rows) for rows in batches]
            # b. the normaliser: trained tokens of the whole step, every micro-batch and rank (C3)
            step_trained_tokens = int(
                dist.all_reduce_sum(sum(trained_tokens(b["labels"]) for b in host[:n_real]))
            )
            scale = dist.world_size / max(step_trained_tokens, 1)  # DDP/FSDP average over ranks
            # c. forward/backward per micro-batch
            for i, b in enumerate(host):
                weight = 1.0 if i < n_real else 0.0  # a padding micro-batch adds exactly 0
                # no_sync spans forward AND backward (DDP decides at forward time, reduces in backward)
                with dist.no_sync(loss_model, last=i == len(host) - 1):
                    with t.autocast():
                        loss_sum = loss_model(**to_tensors(b, device)) * weight
                    (loss_sum * scale).backward()
                window.loss_sum += loss_sum.detach()
            window.positions += len(sampler.step_rows(state.cursor)) * run.data.seq_len  # for MFU
            # d. clip and step
            if config.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(t.params, config.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                    grad_norm = grad_norm.full_tensor()
            t.optimizer.step()
            t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.cursor = sampler.advance(state.cursor)
            state.trained_tokens += step_trained_tokens
            window.trained_tokens += step_trained_tokens
            # e. log / evaluate / checkpoint / stop
            step = state.step
            if step % config.logging_steps == 0 or step == t.total_steps:
                state.last_loss = dist.all_reduce_sum(window.loss_sum.item()) / max(
                    window.trained_tokens, 1
                )
                row = window.row(
                    step=step, epoch=round(step / sampler.steps_per_epoch, 4),
                    loss=state.last_loss, lr=t.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                    trained_tokens=state.trained_tokens,
                )  # fmt: skip
                run.log(row)
                show_progress(bar, row)
                window.reset()
            if run.data.eval_reader is not None and eval_due(
                config, step, t.total_steps, sampler.steps_per_epoch
            ):
                run.log(run.evaluate(step))
                window.restart_clock()
            if bar is not None:
                bar.update(0, advance=1)
            if on_step is not None:
                on_step(step)
            stopped = dist.any_true(stop.requested)
            if stopped or step == t.total_steps or checkpoint_due(config.save_steps, step):
                checkpoint, saved_step = run.save(), step
                window.restart_clock()
            if stopped:
                break
    return stopped, checkpoint, saved_step


def _finish(run: _Run, *, stopped: bool, checkpoint: Path | None, saved_step: int) -> TrainResult:
    """Step 5, the end: the last checkpoint, final weights and evaluation, loss.png."""
    config, dist, state = run.config, run.dist, run.state
    if saved_step != state.step:
        checkpoint = run.save()
    final_dir = None
    if not stopped:
        if run.data.eval_reader is not None and config.eval_strategy != "no":
            run.log(run.evaluate(state.step))
        final_dir = save_final(run.run_dir, run.t.model, run.tokenizer, config=config, dist=dist)
    dist.barrier()  # final/ exists before any rank returns
    if dist.is_main:
        rows = run.metrics.rows()
        run.metrics.close()
        if rows:
            plot_loss(rows, run.run_dir / "loss.png")
    return TrainResult(
        step=state.step, total_steps=run.t.total_steps, stopped=stopped,
        checkpoint=checkpoint or latest_checkpoint(run.run_dir), final_dir=final_dir,
        last_loss=state.last_loss, trained_tokens=state.trained_tokens,
        resume_notes=run.resumed.notes,
    )  # fmt: skip


__all__ = ["TrainResult", "train"]
