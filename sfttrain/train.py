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
import dataclasses
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
    RunState,
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
from sfttrain.distributed import Dist, gather_model_state
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
    check_platform(config, device)  # QLoRA/Liger/flash attention/bf16 this machine cannot run

    # ---- 1. data, model, the checkpoint to resume: all checked before anything is written ------
    data = _setup_data(config, Path(shards))
    base, tokenizer = load_base_model(
        model_spec,
        attn_implementation=config.attn_implementation,
        seed=config.seed,
        quantization_bit=config.quantization_bit,
        device=device,
    )
    check_compatible(
        data.reader.index, tokenizer, base, shards_dir=data.folder, model_spec=model_spec
    )
    _check_run_dir(run_dir, shards=data.folder, resume=resume)
    resumed_from, saved, resume_notes = None, None, []
    if resume is not None:
        resumed_from, resume_notes = resolve_resume(resume, run_dir)
        if resumed_from is not None:
            saved = check_resumable(
                resumed_from, config=config, shards=data.identity, model_spec=model_spec,
                world_size=dist.world_size,
            )  # fmt: skip
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir)
    base_dir = _base_model_dir(
        base, tokenizer, model_spec=model_spec, run_dir=run_dir, config=config, dist=dist
    )

    # ---- 2. fine-tuning, wrap, optimizer, schedule, sampler; 3. resume their state -------------
    t = _setup_training(config, base, data, dist, resumed_from=resumed_from, saved=saved)
    state = RunState(
        step=0, cursor=Cursor(), trained_tokens=0, total_steps=t.total_steps,
        world_size=dist.world_size, model=model_spec, base_model=base_dir, shards=data.identity,
        last_loss=None,
    )  # fmt: skip
    if resumed_from is not None and saved is not None:
        state = _restore(t, resumed_from, saved, state)
    state.cursor = t.sampler.cursor_at(state.step)
    metrics = Metrics(
        run_dir,
        resume_step=state.step if resumed_from else None,
        report_to=config.report_to,
        enabled=dist.is_main,
    )

    def save() -> Path | None:
        return _save(run_dir, state, t, tokenizer=tokenizer, config=config, dist=dist)

    # ---- 4. the loop ------------------------------------------------------------------------
    model, loss_model, sampler, reader = t.model, t.loss_model, t.sampler, data.reader
    total_steps, seq_len = t.total_steps, data.seq_len
    loss_model.train()
    # The window's loss is summed on the device; .item() only at logging steps (no per-step sync).
    win_loss = torch.zeros((), dtype=torch.float64, device=device)
    win_tokens, win_seen, win_start = 0, 0, time.perf_counter()
    grad_norm: torch.Tensor | None = None
    checkpoint: Path | None = None
    saved_step = state.step if resumed_from else -1
    stopped = False
    with (
        StopRequest() as stop,
        progress_bar(progress and dist.is_main, total_steps, state.step) as bar,
    ):
        while state.step < total_steps:
            # a. this rank's micro-batches of the step, as host arrays (memory-mapped rows, one stack),
            #    padded with zero-weight ones so every rank runs the same number (DDP/FSDP collectives)
            batches, n_real = sampler.padded_micro_batches(state.cursor)
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
                    with t.autocast():
                        loss_sum = loss_model(**to_tensors(b, device)) * weight
                    (loss_sum * scale).backward()
                win_loss += loss_sum.detach()
            win_seen += len(sampler.step_rows(state.cursor)) * seq_len  # positions processed (MFU)
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
            state.trained_tokens += step_tokens
            win_tokens += step_tokens
            # e. log / evaluate / checkpoint / stop
            step = state.step
            if step % config.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - win_start
                state.last_loss = dist.all_reduce_sum(win_loss.item()) / max(win_tokens, 1)
                lr = t.scheduler.get_last_lr()[0]
                step_mfu = mfu(
                    t.flops_per_token,
                    win_seen / elapsed if elapsed > 0 else 0.0,
                    peak_tflops=t.peak_tflops,
                    world_size=dist.world_size,
                )
                row = {
                    "step": step,
                    "epoch": round(step / sampler.steps_per_epoch, 4),
                    "loss": state.last_loss,
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "trained_tokens": state.trained_tokens,
                    "tokens_per_s": round(win_tokens / elapsed, 1) if elapsed > 0 else 0.0,
                    "peak_mem_mb": round(peak_memory_mb(device), 1),
                    "mfu": None if step_mfu is None else round(step_mfu, 4),
                }
                metrics.write(row)
                if bar is not None:
                    bar.update(
                        0,
                        loss=f"{state.last_loss:.4f}",
                        lr=f"{lr:.2e}",
                        tps=f"{row['tokens_per_s']:,.0f}",
                        mfu="-" if step_mfu is None else f"{100 * step_mfu:.1f}%",
                    )
                win_loss.zero_()
                win_tokens, win_seen, win_start = 0, 0, time.perf_counter()
            if (
                data.eval_reader is not None
                and config.eval_steps
                and step % config.eval_steps == 0
                and step < total_steps
            ):
                _log_eval(
                    loss_model, data.eval_reader, config, dist, t.autocast, metrics, step, sampler
                )
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
                checkpoint = save()
                saved_step = step
                win_start = time.perf_counter()
            if stopped:
                break

    # ---- 5. the end: last checkpoint, final weights, eval, plot ---------------------------------
    if saved_step != state.step:
        checkpoint = save()
    final_dir = None
    if not stopped:
        if data.eval_reader is not None:
            _log_eval(
                loss_model, data.eval_reader, config, dist, t.autocast, metrics, state.step, sampler
            )
        final_dir = _save_final(run_dir, model, tokenizer, config=config, dist=dist)
    dist.barrier()  # final/ exists before any rank returns
    if dist.is_main:
        rows = metrics.rows()
        metrics.close()
        if rows:
            plot_loss(rows, run_dir / "loss.png")
    if checkpoint is None:
        checkpoint = latest_checkpoint(run_dir)
    return TrainResult(
        state.step, total_steps, stopped, checkpoint, final_dir, state.last_loss,
        state.trained_tokens, resume_notes,
    )  # fmt: skip


# ----------------------------------------------------------------------------- set-up steps


@dataclass
class _Data:
    """The shards a run reads (step 1)."""

    folder: Path
    reader: Any
    eval_reader: Any
    identity: dict[str, Any]
    """What checkpoints record of the shards (a resume must read the same ones)."""
    seq_len: int


def _setup_data(config: TrainConfig, folder: Path) -> _Data:
    # verify="full": every shard's sha256 is checked now, so a corrupt folder is refused before
    # anything is written (hashing runs at ~1 GB/s; the lazy mode would fail mid-run instead).
    reader = open_split(folder, "train", verify="full")
    has_eval = has_split(folder, config.eval_split)
    eval_reader = open_split(folder, config.eval_split, verify="full") if has_eval else None
    return _Data(
        folder, reader, eval_reader, shards_identity(folder, reader.index),
        int(reader.index["seq_len"]),
    )  # fmt: skip


@dataclass
class _Training:
    """What the loop steps (step 2): the wrapped model, optimizer, schedule and sampler."""

    model: torch.nn.Module
    loss_model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: StepSampler
    total_steps: int
    autocast: Callable[[], Any]
    flops_per_token: float
    peak_tflops: float | None


def _setup_training(
    config: TrainConfig,
    base: Any,
    data: _Data,
    dist: Dist,
    *,
    resumed_from: Path | None,
    saved: dict[str, Any] | None,
) -> _Training:
    device = dist.device
    model = apply_finetuning(base, config)
    if not is_quantized(model):  # bitsandbytes already placed the quantised base on the device
        model = model.to(device)
    sampler = StepSampler(
        len(data.reader),
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
    if resumed_from is not None and saved is not None:
        # Weights go into the UNWRAPPED model: every rank loads the full tensors, then
        # DDP/FSDP wraps (FSDP shards what was loaded), whatever rank count saved them.
        load_weights(model, resumed_from, finetuning_type=saved["finetuning_type"])
    flops_per_token = model_flops_per_token(model, seq_len=data.seq_len)  # before sharding
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
    return _Training(
        model, loss_model, params, optimizer, lr_schedule(optimizer, config, total_steps),
        sampler, total_steps, _autocast(config, device), flops_per_token, peak_tflops,
    )  # fmt: skip


def _restore(t: _Training, folder: Path, saved: dict[str, Any], state: RunState) -> RunState:
    """Step 3: optimizer, scheduler and where the run stood, from checkpoint ``folder``; RNG last
    (building the model drew from it)."""
    load_optimizer(folder, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler)
    step = int(saved["step"])
    if Cursor(**saved["cursor"]) != t.sampler.cursor_at(step):
        raise ConfigError(f"{folder}: data cursor {saved['cursor']} does not match step {step}")
    load_rng(folder)
    return dataclasses.replace(
        state, step=step, trained_tokens=int(saved["trained_tokens"]),
        last_loss=saved.get("last_loss"),
    )  # fmt: skip


def _save(
    run_dir: Path, state: RunState, t: _Training, *, tokenizer: Any, config: TrainConfig, dist: Dist
) -> Path | None:
    """Checkpoint where the run stands (every rank gathers, rank 0 writes, every rank waits)."""
    dist.barrier()
    model_state = gather_model_state(t.model)  # FSDP all-gathers the shards
    optim_state = optimizer_state(t.model, t.optimizer)
    path = None
    if dist.is_main:
        path = save_checkpoint(
            run_dir, state=state, model=t.model, tokenizer=tokenizer, optimizer=t.optimizer,
            scheduler=t.scheduler, config=config, model_state=model_state, optim_state=optim_state,
        )  # fmt: skip
    dist.barrier()
    return path


def _save_final(
    run_dir: Path, model: torch.nn.Module, tokenizer: Any, *, config: TrainConfig, dist: Dist
) -> Path | None:
    """``final/`` (and ``final_merged/`` when asked); every rank gathers, rank 0 writes."""
    final_state = gather_model_state(model)  # every rank (FSDP all-gathers)
    if not dist.is_main:
        return None
    with written(run_dir / "final", "the final weights") as tmp:
        save_weights(model, tmp, finetuning_type=config.finetuning_type, state_dict=final_state)
        tokenizer.save_pretrained(str(tmp))
    final_dir = run_dir / "final"
    if config.save_merged and config.finetuning_type == "lora":
        from sfttrain.export import export_checkpoint

        export_checkpoint(final_dir, run_dir / "final_merged", merge=True, overwrite=True)
    return final_dir


# ----------------------------------------------------------------------------- loop pieces


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
