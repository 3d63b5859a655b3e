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
agreeing on a stop request. ``sfttrain.distributed`` holds the single-process ``Dist`` and
builds the torch.distributed one from torchrun's environment. Every rank runs the same number of
micro-batches per step (zero-weight padding, ``StepSampler.padded_micro_batches``) because DDP and
FSDP run collectives in every forward/backward.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftdata.atomic import exclusive
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
    check_compatible,
    has_split,
    open_split,
    to_tensors,
    trained_tokens,
)
from sfttrain.distributed import Dist
from sfttrain.evaluate import evaluate
from sfttrain.loss import LossModel, isolation_for, liger_loss
from sfttrain.metrics import Metrics, peak_memory_mb, plot_loss, progress_bar
from sfttrain.model import TINY, apply_finetuning, compile_layers, is_quantized, load_base_model
from sfttrain.optim import lr_schedule, param_groups
from sfttrain.perf import check_platform, device_peak_tflops, mfu, model_flops_per_token


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
    scheduler = lr_schedule(optimizer, config, total_steps)
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
    with StopRequest() as stop, progress_bar(progress and dist.is_main, total_steps, step) as bar:
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


__all__ = ["TrainResult", "train"]
