"""The set-up of a training run (steps 1 and 2 of ``sfttrain.train``): the shards it reads, the
model checked against them, and what the loop steps (fine-tuning applied, wrapped, optimizer,
schedule, sampler)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sfttrain.checkpoint import Resume, shards_identity
from sfttrain.config import TrainConfig
from sfttrain.data import (
    Cursor,
    StepSampler,
    check_compatible,
    has_split,
    open_split,
    shard_source,
    shards_in_order,
)
from sfttrain.distributed import Dist
from sfttrain.loss import LossModel, isolation_for, liger_loss
from sfttrain.model import (
    apply_finetuning,
    autocast_for,
    check_finetuning,
    compile_layers,
    is_quantized,
    load_base_model,
)
from sfttrain.optim import lr_schedule, param_groups
from sfttrain.perf import device_peak_tflops, model_flops_per_token
from sfttrain.weights import load_weights


@dataclass
class RunData:
    """The shards a run reads (step 1)."""

    folder: Path
    reader: Any
    eval_reader: Any
    identity: dict[str, Any]
    """What checkpoints record of the shards (a resume must read the same ones)."""
    seq_len: int

    def fetch_ahead(self, sampler: StepSampler, cursor: Cursor, steps: int) -> None:
        """A URL's shards fetched in the background in the order this rank reads them (then the
        evaluation split's, one at a time); nothing for a local folder."""
        self.reader.prefetch(shards_in_order(self.reader, sampler, cursor, steps))
        if self.eval_reader is not None:
            self.eval_reader.prefetch(range(self.eval_reader.shard_count), workers=1)

    def close(self) -> None:
        """Stop fetching ahead."""
        for reader in (self.reader, self.eval_reader):
            if reader is not None:
                reader.close()


def setup_data(config: TrainConfig, shards: str | Path) -> RunData:
    # A local folder: verify="full", every shard's sha256 checked and every shard opened now, so
    # a corrupt folder is refused before anything is written (hashing is cheap next to training;
    # the lazy mode would fail mid-run). A URL's shards are fetched while the run trains (see
    # _prefetch), each checked against the index as it arrives: a refused one stops the run at
    # its next step.
    folder, fetch = shard_source(shards)
    verify = "full" if fetch is None else "lazy"
    reader = open_split(folder, "train", verify=verify, fetch=fetch)
    has_eval = has_split(folder, config.eval_split)
    eval_reader = (
        open_split(folder, config.eval_split, verify=verify, fetch=fetch) if has_eval else None
    )
    return RunData(
        folder=folder, reader=reader, eval_reader=eval_reader,
        identity=shards_identity(folder, reader.index), seq_len=int(reader.index["seq_len"]),
    )  # fmt: skip


def setup_model(config: TrainConfig, data: RunData, model_spec: str, device: torch.device):
    """Step 1b: the base model and tokenizer, checked against the shards (same tokenizer, fits)."""
    base, tokenizer = load_base_model(
        model_spec, attn_implementation=config.attn_implementation, seed=config.seed,
        quantization_bit=config.quantization_bit, device=device,
    )  # fmt: skip
    check_compatible(
        data.reader.index, tokenizer, base, shards_dir=data.folder, model_spec=model_spec
    )
    check_finetuning(base, config)
    return base, tokenizer


@dataclass
class Training:
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


def setup_training(
    config: TrainConfig,
    base: Any,
    data: RunData,
    dist: Dist,
    *,
    resumed: Resume,
) -> Training:
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
    if resumed.folder is not None:
        # Weights go into the UNWRAPPED model: every rank loads the full tensors, then
        # DDP/FSDP wraps (FSDP shards what was loaded), whatever rank count saved them.
        load_weights(model, resumed.folder, finetuning_type=resumed.finetuning_type)
    flops_per_token = model_flops_per_token(model, seq_len=data.seq_len)  # before sharding
    peak_tflops = device_peak_tflops(device, config.peak_tflops)
    fused_loss = liger_loss(model) if config.use_liger_kernel else None
    if config.torch_compile:
        compile_layers(model)
    isolation = isolation_for(config.attn_implementation, config.attn_isolation)
    loss_model = dist.wrap(LossModel(model, isolation=isolation, fused_loss=fused_loss))
    # After wrapping: FSDP2 replaces parameters by sharded DTensors, the optimizer must see those.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )
    return Training(
        model=model, loss_model=loss_model, params=params, optimizer=optimizer,
        scheduler=lr_schedule(optimizer, config, total_steps), sampler=sampler,
        total_steps=total_steps, autocast=autocast_for(config, device),
        flops_per_token=flops_per_token, peak_tflops=peak_tflops,
    )  # fmt: skip


__all__ = ["RunData", "Training", "setup_data", "setup_model", "setup_training"]
