"""What a run tells its command while it goes (rank 0 only): how it starts, where it resumed,
each checkpoint saved, a stop request. The command prints them (``lines``) in a terminal and in a
cluster log alike; the library never prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdata.text import counted


@dataclass(frozen=True)
class RunStart:
    """The run as it starts: model, method, precision, where, data, steps, output."""

    model: str
    architecture: str
    parameters: int
    trainable: int
    method: str
    """``full``, ``LoRA r=8`` or ``QLoRA 4-bit r=8``."""
    precision: str
    device: str
    world_size: int
    rows: int
    seq_len: int
    tokens: int
    trained_tokens: int
    total_steps: int
    steps_per_epoch: int
    rows_per_step: int
    output: str
    cleared: bool = False
    """``overwrite_output_dir`` removed an earlier run in ``output``."""
    resumed_step: int | None = None
    resumed_from: str | None = None
    resume_notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str
    seconds: float


@dataclass(frozen=True)
class StopRequested:
    signal: str
    """``SIGTERM`` or ``SIGINT``."""
    step: int
    """The step being trained when it came."""


Event = RunStart | CheckpointSaved | StopRequested
OnEvent = Callable[[Event], None]


def method_of(config: Any) -> str:
    if config.finetuning_type == "full":
        return "full fine-tuning"
    quant = f"QLoRA {config.quantization_bit}-bit" if config.quantization_bit else "LoRA"
    return f"{quant} r={config.lora_rank}"


def precision_of(config: Any, device: Any) -> str:
    if not config.bf16:
        return "fp32"
    if getattr(device, "type", str(device)) == "cpu":
        # bf16 autocast on a CPU without bf16 matrix units is slower than fp32, not faster (measured
        # on the CPUs these tests run on); a user who kept a GPU config's bf16 should know.
        return "bf16 autocast (on a CPU usually slower than fp32: set bf16: false)"
    return "bf16 autocast"


def parameter_counts(model: Any) -> tuple[int, int]:
    """All parameters and the trainable ones (LoRA: the adapters)."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def lines(event: Event) -> list[str]:
    """One event as log lines (plain text, no terminal codes)."""
    if isinstance(event, CheckpointSaved):
        return [f"checkpoint saved at step {event.step}: {event.path} ({event.seconds:.1f} s)"]
    if isinstance(event, StopRequested):
        again = "; Ctrl-C again aborts without saving" if event.signal == "SIGINT" else ""
        return [
            f"{event.signal}: stopping after step {event.step}; a checkpoint will be saved "
            f"(then --resume auto continues){again}"
        ]
    e = event
    share = 100 * e.trainable / max(e.parameters, 1)
    out = []
    if e.cleared:
        out.append(f"overwrite_output_dir: removed the earlier run in {e.output}")
    out += [
        f"run: model {e.model} ({e.architecture}), {e.parameters:,} parameters, "
        f"{e.trainable:,} trainable ({share:.2f}%), {e.method}",
        f"run: {e.precision} on {e.device}, world size {e.world_size}",
        f"run: data {counted(e.rows, 'row')} of {e.seq_len:,} tokens: "
        f"{counted(e.tokens, 'token')}, {e.trained_tokens:,} trained",
        f"run: {counted(e.total_steps, 'step')} of {counted(e.rows_per_step, 'row')} "
        f"({e.steps_per_epoch:,} per epoch), output {e.output}",
    ]
    out += e.resume_notes
    if e.resumed_step is not None:
        out.append(f"resumed from step {e.resumed_step} (checkpoint {e.resumed_from})")
    return out


def start_event(
    config: Any, *, model: Any, model_spec: str, index: dict[str, Any], split: str, dist: Any,
    sampler: Any, total_steps: int, output: Path, cleared: bool, resumed: Any,
) -> RunStart:  # fmt: skip
    """The :class:`RunStart` of a run set up with these (train.py's step 3)."""
    total, trainable = parameter_counts(model)
    counts = index["splits"][split]
    # PEFT wraps the model; its own class is what a user knows (Qwen2ForCausalLM)
    arch = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    return RunStart(
        model=model_spec, architecture=arch, parameters=total, trainable=trainable,
        method=method_of(config), precision=precision_of(config, dist.device),
        device=str(dist.device), world_size=dist.world_size, rows=int(counts["rows"]),
        seq_len=int(index["seq_len"]), tokens=int(counts["tokens"]),
        trained_tokens=int(counts["trained_tokens"]), total_steps=total_steps,
        steps_per_epoch=sampler.steps_per_epoch,
        rows_per_step=config.per_device_train_batch_size * config.gradient_accumulation_steps
        * dist.world_size,
        output=str(output), cleared=cleared,
        resumed_step=resumed.state.step if resumed.state is not None else None,
        resumed_from=str(resumed.folder) if resumed.folder is not None else None,
        resume_notes=list(resumed.notes),
    )  # fmt: skip


__all__ = [
    "CheckpointSaved",
    "Event",
    "OnEvent",
    "RunStart",
    "StopRequested",
    "lines",
    "start_event",
]
