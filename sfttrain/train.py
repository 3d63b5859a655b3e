"""The training loop: one function, ``train``, readable top to bottom.

    1. open the shards, load the model, check they belong together
    2. LoRA or full fine-tuning, AdamW, warm-up + decay schedule, the step sampler
    3. resume (weights, optimizer, scheduler, cursor; RNG last)
    4. the loop: per optimizer step
         a. this rank's micro-batches of the step (host arrays from the memory-mapped reader)
         b. trained tokens of the WHOLE step, summed over micro-batches and ranks (C3)
         c. forward/backward per micro-batch: loss_sum × world_size / step_tokens
         d. clip, optimizer and scheduler step
         e. log / evaluate / checkpoint / stop on SIGTERM
    5. final checkpoint, final/ weights, loss.png

Distributed training plugs in through ``Dist``: ranks, the all-reduce of the trained-token count
and of logged sums, the model wrapper (DDP/FSDP), ``no_sync`` for accumulation micro-batches, and
agreeing on a stop request. The single-process ``Dist`` is defined here; ``sfttrain.distributed``
builds the torch.distributed one from torchrun's environment. Every rank runs the same number of
micro-batches per step (zero-weight padding, ``StepSampler.padded_micro_batches``) because DDP and
FSDP run collectives in every forward/backward.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftdata.atomic import atomic_file, exclusive
from sftdata.errors import ConfigError
from sftdata.inputs import refuse_overwriting
from sfttrain.checkpoint import (
    check_resumable,
    latest_checkpoint,
    load_optimizer,
    load_rng,
    load_weights,
    optimizer_state,
    remove_stale_temps,
    resolve_resume,
    save_checkpoint,
    save_weights,
    shards_identity,
    written,
)
from sfttrain.config import TrainConfig
from sfttrain.data import (
    Cursor,
    StepSampler,
    eval_batches,
    has_split,
    open_split,
    to_tensors,
    trained_tokens,
)
from sfttrain.model import (
    TINY,
    LossModel,
    apply_finetuning,
    compile_layers,
    is_quantized,
    isolation_for,
    liger_loss,
    load_base_model,
)
from sfttrain.perf import check_platform, device_peak_tflops, mfu, model_flops_per_token

METRICS_VERSION = 1


# ----------------------------------------------------------------------------- distributed hooks


def default_device() -> torch.device:
    """``cuda`` (this process's LOCAL_RANK) when CUDA is available, else the CPU."""
    import os

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


@dataclass
class Dist:
    """Process-group hooks of the loop. This single-process version is the identity; issue 5's
    torch.distributed version overrides the methods (all-reduce over the group, DDP/FSDP wrap)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=default_device)

    @property
    def is_main(self) -> bool:
        """True on the rank that writes logs, metrics and checkpoints."""
        return self.rank == 0

    def all_reduce_sum(self, value: float) -> float:
        """Sum of ``value`` over ranks (the step's trained tokens, logged loss sums)."""
        return value

    def any_true(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (a SIGTERM on one rank stops all)."""
        return flag

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module the loop calls (DDP/FSDP wrapper in issue 5)."""
        return module

    def no_sync(self, module: torch.nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on accumulation micro-batches but the last one."""
        return contextlib.nullcontext()

    def barrier(self) -> None:
        """Wait for every rank (around checkpoints)."""

    def close(self) -> None:
        """Leave the process group (nothing to leave here)."""


# ----------------------------------------------------------------------------- small helpers


class StopRequest:
    """SIGTERM/SIGINT -> finish the current step, save a checkpoint, exit 0. A second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Metrics:
    """``metrics.jsonl`` (one JSON line per log/eval, flushed at once) and optional TensorBoard."""

    def __init__(
        self, run_dir: Path, *, resume_step: int | None, report_to: str, enabled: bool
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Lines after the checkpoint belong to steps that will run again: drop them.
            keep = [r for r in _read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            with atomic_file(self.path) as f:
                f.write("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if report_to != "none":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                if report_to == "tensorboard":
                    raise ConfigError(
                        "report_to: tensorboard is not installed (pip install tensorboard)"
                    ) from None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps({"format_version": METRICS_VERSION, **row}) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(
                        f"{'eval' if k.startswith('eval') else 'train'}/{k}", v, row["step"]
                    )

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self.tb is not None:
                self.tb.close()

    def rows(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; weight decay only on matrices (not biases or norm weights)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def check_compatible(
    index: dict[str, Any], tokenizer: Any, model: Any, *, shards_dir: Path, model_spec: str
) -> None:
    """Refuse shards that were packed for another tokenizer or are longer than the model's context."""
    from sftdata.tokenizer import tokenizer_identity

    want = index["tokenizer"]["sha256"]
    have = tokenizer_identity(tokenizer)["sha256"]
    if want != have:
        raise ConfigError(
            f"{shards_dir / 'index.json'}: shards were packed with tokenizer {index['tokenizer'].get('name')!r} "
            f"(sha256 {want[:12]}…) but model {model_spec} uses {tokenizer_identity(tokenizer)['name']!r} "
            f"(sha256 {have[:12]}…); pack again with --tokenizer {model_spec}"
        )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and index["seq_len"] > max_pos:
        raise ConfigError(
            f"{shards_dir / 'index.json'}: seq_len {index['seq_len']} is longer than the model's "
            f"max_position_embeddings {max_pos}; pack with --seq-len {max_pos} or less"
        )
    vocab = model.get_input_embeddings().num_embeddings
    if index["tokenizer"]["vocab_size"] > vocab:
        raise ConfigError(
            f"{shards_dir / 'index.json'}: tokenizer vocab_size {index['tokenizer']['vocab_size']} "
            f"exceeds the model's {vocab} embeddings"
        )


@torch.no_grad()
def evaluate(
    loss_model: torch.nn.Module, reader: Any, *, batch_size: int, dist: Dist, autocast: Any
) -> tuple[float, int]:
    """(token-weighted mean loss, trained tokens) over a split; no RNG is consumed (dropout off)."""
    was_training = loss_model.training
    loss_model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dist.device)
    tokens = 0
    batches = eval_batches(
        reader, batch_size, rank=dist.rank, world_size=dist.world_size, pad=dist.world_size > 1
    )
    for rows in batches:
        # A rank out of rows runs row 0 with weight 0: FSDP needs the same forwards on every rank.
        weight = 1.0 if len(rows) else 0.0
        host = reader.get_batch(rows if len(rows) else np.zeros(1, dtype=np.int64))
        if weight:
            tokens += trained_tokens(host["labels"])
        with autocast():
            total += loss_model(**to_tensors(host, dist.device)).double() * weight
    loss_model.train(was_training)
    tokens = int(dist.all_reduce_sum(tokens))
    loss_sum = dist.all_reduce_sum(total.item())
    return (loss_sum / tokens if tokens else float("nan")), tokens


def _progress(enabled: bool, total: int, start: int) -> Any:
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


# ----------------------------------------------------------------------------- the loop


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
    dist: Dist | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model_spec`` ("tiny" or a local HF folder) on a shard folder; see the module doc.

    Rank 0 holds an exclusive lock on ``output_dir`` for the whole run: a second run into the same
    folder fails at once (torchrun then stops its other ranks) instead of interleaving checkpoints.
    """
    dist = dist or Dist()
    lock = (
        exclusive(output_dir, writer="sfttrain run") if dist.is_main else contextlib.nullcontext()
    )
    with lock:
        return _train(
            config, shards=shards, output_dir=output_dir, model_spec=model_spec, resume=resume,
            dist=dist, progress=progress, on_step=on_step,
        )  # fmt: skip


def _train(
    config: TrainConfig,
    *,
    shards: str | Path,
    output_dir: str | Path,
    model_spec: str,
    resume: str | None,
    dist: Dist,
    progress: bool,
    on_step: Callable[[int], None] | None,
) -> TrainResult:
    device = dist.device
    run_dir = Path(output_dir)
    shards = Path(shards)
    check_platform(config, device)  # QLoRA/Liger/flash attention/bf16 this machine cannot run

    # ---- 1. data, model, compatibility -------------------------------------------------------
    # verify="full": every shard's sha256 is checked now, so a corrupt folder is refused before
    # anything is written (hashing runs at ~1 GB/s; the lazy mode would fail mid-run instead).
    reader = open_split(shards, "train", verify="full")
    has_eval = has_split(shards, config.eval_split)
    eval_reader = open_split(shards, config.eval_split, verify="full") if has_eval else None
    base, tokenizer = load_base_model(
        model_spec,
        attn_implementation=config.attn_implementation,
        seed=config.seed,
        quantization_bit=config.quantization_bit,
        device=device,
    )
    check_compatible(reader.index, tokenizer, base, shards_dir=shards, model_spec=model_spec)
    _check_run_dir(run_dir, shards=shards, resume=resume)
    # The checkpoint to resume is read and checked before anything is written into the run.
    shard_id = shards_identity(shards, reader.index)
    resumed_from, state = None, None
    resume_notes: list[str] = []
    if resume is not None:
        resumed_from, resume_notes = resolve_resume(resume, run_dir)
        if resumed_from is not None:
            state = check_resumable(
                resumed_from,
                config=config,
                shards=shard_id,
                model_spec=model_spec,
                world_size=dist.world_size,
            )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir)
    base_dir = _base_model_dir(
        base, tokenizer, model_spec=model_spec, run_dir=run_dir, config=config, dist=dist
    )

    # ---- 2. fine-tuning setup, resume weights, wrap, optimizer, schedule, sampler -----------------
    model = apply_finetuning(base, config)
    if not is_quantized(model):  # bitsandbytes already placed the quantised base on the device
        model = model.to(device)
    sampler = StepSampler(
        len(reader),
        micro_batch=config.per_device_train_batch_size,
        accumulation=config.gradient_accumulation_steps,
        seed=config.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        drop_last=config.dataloader_drop_last,
    )
    total_steps = sampler.total_steps(
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps
    )
    step, trained_total = 0, 0
    if resumed_from is not None and state is not None:
        # Weights go into the UNWRAPPED model: every rank loads the full tensors, then
        # DDP/FSDP wraps (FSDP shards what was loaded), whatever rank count saved them.
        load_weights(model, resumed_from, finetuning_type=state["finetuning_type"])
    seq_len = int(reader.index["seq_len"])
    flops_per_token = model_flops_per_token(model, seq_len=seq_len)  # before sharding
    peak_tflops = device_peak_tflops(device, config.peak_tflops)
    fused_loss = liger_loss(model) if config.use_liger_kernel else None
    if config.torch_compile:
        compile_layers(model)
    loss_model = dist.wrap(LossModel(model, isolation=isolation_for(config), fused_loss=fused_loss))
    # After wrapping: FSDP2 replaces parameters by sharded DTensors, the optimizer must see those.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )
    scheduler = _scheduler(optimizer, config, total_steps)
    autocast = _autocast(config, device)

    # ---- 3. resume: optimizer, scheduler, cursor; RNG last --------------------------------------
    if resumed_from is not None and state is not None:
        load_optimizer(resumed_from, model=model, optimizer=optimizer, scheduler=scheduler)
        step, trained_total = int(state["step"]), int(state["trained_tokens"])
        if Cursor(**state["cursor"]) != sampler.cursor_at(step):
            raise ConfigError(
                f"{resumed_from}: data cursor {state['cursor']} does not match step {step}"
            )
        load_rng(resumed_from)  # last: model building above drew from the RNG
    cursor = sampler.cursor_at(step)
    metrics = Metrics(
        run_dir,
        resume_step=step if resumed_from else None,
        report_to=config.report_to,
        enabled=dist.is_main,
    )

    def save_now() -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank waits)."""
        state = {
            "cursor": cursor.to_dict(),
            "trained_tokens": trained_total,
            "total_steps": total_steps,
            "world_size": dist.world_size,
            "model": model_spec,
            "base_model": base_dir,
            "shards": shard_id,
            "last_loss": last_loss,
        }
        dist.barrier()
        # Every rank takes part in gathering (FSDP all-gathers the shards); rank 0 writes.
        model_state = gather_model_state(model)
        optim_state = optimizer_state(model, optimizer)
        path = None
        if dist.is_main:
            path = save_checkpoint(
                run_dir,
                step=step,
                model=model,
                tokenizer=tokenizer,
                optimizer=optimizer,
                scheduler=scheduler,
                state=state,
                config=config,
                model_state=model_state,
                optim_state=optim_state,
            )
        dist.barrier()
        return path

    # ---- 4. the loop ------------------------------------------------------------------------
    loss_model.train()
    # The window's loss is summed on the device; .item() only at logging steps (no per-step sync).
    win_loss = torch.zeros((), dtype=torch.float64, device=device)
    win_tokens, win_seen, win_start = 0, 0, time.perf_counter()
    grad_norm: torch.Tensor | None = None
    last_loss: float | None = None
    checkpoint: Path | None = None
    saved_step = step if resumed_from else -1
    stopped = False
    with StopRequest() as stop, _progress(progress and dist.is_main, total_steps, step) as bar:
        while step < total_steps:
            # a. this rank's micro-batches of the step, as host arrays (memory-mapped rows, one stack),
            #    padded with zero-weight ones so every rank runs the same number (DDP/FSDP collectives)
            batches, n_real = sampler.padded_micro_batches(cursor)
            host = [reader.get_batch(rows) for rows in batches]
            # b. the normaliser: trained tokens of the whole step, every micro-batch and rank (C3)
            step_tokens = int(
                dist.all_reduce_sum(sum(trained_tokens(b["labels"]) for b in host[:n_real]))
            )
            scale = dist.world_size / max(step_tokens, 1)  # DDP/FSDP average gradients over ranks
            # c. forward/backward per micro-batch
            for i, b in enumerate(host):
                weight = 1.0 if i < n_real else 0.0  # a padding micro-batch adds exactly 0
                # no_sync spans forward AND backward (DDP decides at forward time, reduces in backward)
                with dist.no_sync(loss_model, last=i == len(host) - 1):
                    with autocast():
                        loss_sum = loss_model(**to_tensors(b, device)) * weight
                    (loss_sum * scale).backward()
                win_loss += loss_sum.detach()
            win_seen += len(sampler.step_rows(cursor)) * seq_len  # positions processed (MFU)
            # d. clip and step
            if config.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                    grad_norm = grad_norm.full_tensor()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            cursor = sampler.advance(cursor)
            trained_total += step_tokens
            win_tokens += step_tokens
            # e. log / evaluate / checkpoint / stop
            if step % config.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - win_start
                last_loss = dist.all_reduce_sum(win_loss.item()) / max(win_tokens, 1)
                lr = scheduler.get_last_lr()[0]
                step_mfu = mfu(
                    flops_per_token,
                    win_seen / elapsed if elapsed > 0 else 0.0,
                    peak_tflops=peak_tflops,
                    world_size=dist.world_size,
                )
                row = {
                    "step": step,
                    "epoch": round(step / sampler.steps_per_epoch, 4),
                    "loss": last_loss,
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "trained_tokens": trained_total,
                    "tokens_per_s": round(win_tokens / elapsed, 1) if elapsed > 0 else 0.0,
                    "peak_mem_mb": round(peak_memory_mb(device), 1),
                    "mfu": None if step_mfu is None else round(step_mfu, 4),
                }
                metrics.write(row)
                if bar is not None:
                    bar.update(
                        0,
                        loss=f"{last_loss:.4f}",
                        lr=f"{lr:.2e}",
                        tps=f"{row['tokens_per_s']:,.0f}",
                        mfu="-" if step_mfu is None else f"{100 * step_mfu:.1f}%",
                    )
                win_loss.zero_()
                win_tokens, win_seen, win_start = 0, 0, time.perf_counter()
            if (
                eval_reader is not None
                and config.eval_steps
                and step % config.eval_steps == 0
                and step < total_steps
            ):
                _log_eval(loss_model, eval_reader, config, dist, autocast, metrics, step, sampler)
                win_start = time.perf_counter()  # evaluation time is not training time
            if bar is not None:
                bar.update(0, advance=1)
            if on_step is not None:
                on_step(step)
            stopped = dist.any_true(stop.requested)
            if (
                stopped
                or step == total_steps
                or (config.save_steps and step % config.save_steps == 0)
            ):
                checkpoint = save_now()
                saved_step = step
                win_start = time.perf_counter()
            if stopped:
                break

    # ---- 5. the end: last checkpoint, final weights, eval, plot ---------------------------------
    if saved_step != step:
        checkpoint = save_now()
    final_dir = None
    if not stopped:
        if eval_reader is not None:
            _log_eval(loss_model, eval_reader, config, dist, autocast, metrics, step, sampler)
        final_state = gather_model_state(model)  # every rank (FSDP all-gathers)
        if dist.is_main:
            with written(run_dir / "final", "the final weights") as tmp:
                save_weights(
                    model, tmp, finetuning_type=config.finetuning_type, state_dict=final_state
                )
                tokenizer.save_pretrained(str(tmp))
            final_dir = run_dir / "final"
            if config.save_merged and config.finetuning_type == "lora":
                from sfttrain.export import export_checkpoint

                export_checkpoint(final_dir, run_dir / "final_merged", merge=True, overwrite=True)
    dist.barrier()  # final/ exists before any rank returns
    if dist.is_main:
        rows = metrics.rows()
        metrics.close()
        if rows:
            plot_loss(rows, run_dir / "loss.png")
    if checkpoint is None:
        checkpoint = latest_checkpoint(run_dir)
    return TrainResult(
        step, total_steps, stopped, checkpoint, final_dir, last_loss, trained_total, resume_notes
    )


# ----------------------------------------------------------------------------- loop pieces


def gather_model_state(model: torch.nn.Module) -> dict[str, Any] | None:
    """Full state dict of an FSDP2-sharded model (all ranks must call it), else None."""
    from sfttrain.distributed import gather_model_state as gather

    return gather(model)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    """transformers' warm-up + cosine/linear/constant schedules (LambdaLR; state saves as plain data)."""
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        config.lr_scheduler_type
    ]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _autocast(config: TrainConfig, device: torch.device) -> Callable[[], Any]:
    """A context factory: bf16 autocast when asked (weights and the loss stay fp32), else nothing."""
    if not config.bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


RUN_ENTRIES = frozenset(
    {
        "checkpoints",
        "final",
        "final_merged",
        "base_model",
        "metrics.jsonl",
        "loss.png",
        "tensorboard",
    }
)
"""What a run writes into its folder; anything else there is someone else's."""


def _check_run_dir(run_dir: Path, *, shards: Path, resume: str | None) -> None:
    """A run writes into an empty or new folder, or continues its own (``--resume``); it never
    replaces a finished run's ``final/``, mixes its files with a user's or writes into (or
    around) the shard folder it reads."""
    refuse_overwriting([shards], run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: exists and is not a folder; -o names the run's folder")
    # dot names: temp files of a killed write (atomic_file/written) and the user's own hidden ones
    foreign = sorted(
        p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and p.name[0] != "."
    )
    if foreign:
        raise ConfigError(
            f"{run_dir}: holds files that are not a sfttrain run's ({', '.join(foreign[:3])}); "
            "give an empty or new -o folder"
        )
    if resume is None and (latest_checkpoint(run_dir) is not None or (run_dir / "final").exists()):
        raise ConfigError(
            f"{run_dir}: already holds a run (checkpoints or final/); continue it with "
            "--resume auto, or give another -o folder"
        )


def _base_model_dir(
    base: Any, tokenizer: Any, *, model_spec: str, run_dir: Path, config: TrainConfig, dist: Dist
) -> str | None:
    """Where an adapter's base model lives; for ``tiny`` + LoRA, the seeded base is saved in the run."""
    if model_spec != TINY:
        path = str(Path(model_spec).resolve())
        base.name_or_path = path  # recorded by PEFT as base_model_name_or_path
        return path
    if config.finetuning_type != "lora":
        return None
    target = run_dir / "base_model"
    if dist.is_main and not (target / "model.safetensors").is_file():
        with written(target, "the base model") as tmp:
            base.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    dist.barrier()
    base.name_or_path = str(target.resolve())
    return str(target.resolve())


def _log_eval(loss_model, reader, config, dist, autocast, metrics, step, sampler) -> None:
    loss, tokens = evaluate(
        loss_model,
        reader,
        batch_size=config.per_device_eval_batch_size,
        dist=dist,
        autocast=autocast,
    )
    metrics.write(
        {
            "step": step,
            "epoch": round(step / sampler.steps_per_epoch, 4),
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 700.0)),
            "eval_tokens": tokens,
        }
    )


def iter_metrics(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The lines of a run's metrics.jsonl (tests, tools)."""
    yield from _read_jsonl(Path(run_dir) / "metrics.jsonl")


__all__ = ["Dist", "TrainResult", "evaluate", "iter_metrics", "plot_loss", "train"]
