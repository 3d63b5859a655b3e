"""torch.distributed for the loop: a ``Dist`` built from torchrun's environment, DDP and FSDP2.

``torchrun --nproc_per_node N -m sfttrain run ...`` (or ``sfttrain run --nproc N``, which execs
that) sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; ``dist_from_env``
joins the process group (``nccl`` on CUDA, ``gloo`` on CPU) and returns a ``TorchDist`` whose hooks
the loop calls (``Dist`` below documents them). Nothing here is a home-made engine: DDP is
``DistributedDataParallel``, FSDP is FSDP2's ``fully_shard`` (per decoder layer, then the root), and
checkpoints gather full state dicts with ``torch.distributed.checkpoint.state_dict`` so the files
on disk are the same whatever the number of ranks or the wrapper (resume on any rank count).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftdata.errors import ConfigError
from sfttrain.wrappers import decoder_layers


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or any launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def default_device(local_rank: int | None = None) -> torch.device:
    """``cuda:LOCAL_RANK`` (``local_rank``, else the environment's) when CUDA is available, else
    the CPU."""
    if torch.cuda.is_available():
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


@dataclass
class Dist:
    """Process-group hooks of the loop. This single-process version is the identity; the
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
        """The module the loop calls (the DDP/FSDP wrapper under torchrun)."""
        return module

    def no_sync(self, module: torch.nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on accumulation micro-batches but the last one."""
        return contextlib.nullcontext()

    def barrier(self) -> None:
        """Wait for every rank (around checkpoints)."""

    def close(self) -> None:
        """Leave the process group (nothing to leave here)."""


@dataclass
class TorchDist(Dist):
    """``Dist`` over an initialised torch.distributed process group."""

    local_rank: int = 0
    mode: str = "ddp"
    cpu_offload: bool = False
    bf16: bool = False

    def _tensor(self, value: float, dtype: torch.dtype) -> torch.Tensor:
        # nccl reduces CUDA tensors only; gloo CPU tensors.
        return torch.tensor(value, dtype=dtype, device=self.device)

    def all_reduce_sum(self, value: float) -> float:
        """Sum over ranks in float64 (exact for token counts below 2**53)."""
        import torch.distributed as td

        t = self._tensor(float(value), torch.float64)
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return float(t.item())

    def any_true(self, flag: bool) -> bool:
        """MAX-reduce of a 0/1 flag: a SIGTERM seen by one rank stops every rank at the same step."""
        import torch.distributed as td

        t = self._tensor(1 if flag else 0, torch.int32)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item())

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP replica, or FSDP2 shards (each decoder layer, then the root)."""
        if self.mode == "fsdp":
            return shard_fsdp2(module, cpu_offload=self.cpu_offload, bf16=self.bf16)
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers=False: the only buffers are rotary tables, identical on every rank;
        # broadcasting them would add a collective to every forward (also in evaluation).
        return DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    def no_sync(self, module: torch.nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        """DDP: ``no_sync()`` on all but the last micro-batch. FSDP2: gradient sync only on the last."""
        if self.mode == "fsdp":
            module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else module.no_sync()

    def barrier(self) -> None:
        """torch.distributed.barrier (device-bound under nccl)."""
        import torch.distributed as td

        if self.device.type == "cuda":
            td.barrier(device_ids=[self.device.index])
        else:
            td.barrier()

    def close(self) -> None:
        """Leave the process group."""
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def shard_fsdp2(module: torch.nn.Module, *, cpu_offload: bool, bf16: bool) -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, output head).

    Per-layer units keep only one layer's full parameters alive at a time; mixed-precision keeps
    fp32 sharded master weights and computes in bf16 with fp32 gradient reduction when bf16 is on.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(module)
    if not layers:
        raise ConfigError("distributed: fsdp needs a model with decoder layers (model.layers)")
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(module, **kw)
    return module


def is_fsdp(module: torch.nn.Module) -> bool:
    """True if ``module`` (or one of its children) is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def gather_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full (unsharded, CPU) state dict of an FSDP2 model, keys as in the unwrapped model; None otherwise.

    Every rank must call it (it all-gathers); with ``cpu_offload`` only rank 0 keeps the tensors.
    """
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def dist_from_env(config: Any) -> Dist:
    """The process group torchrun describes (``TorchDist``), or the single-process ``Dist``.

    Raises ConfigError (one line) for what cannot work: ``distributed: fsdp`` outside torchrun is
    allowed (one rank, nothing to shard, it simply runs), a CUDA launch with fewer GPUs than ranks
    per node is refused.
    """
    if not under_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return Dist(device=default_device(local))
    import torch.distributed as td

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"--nproc_per_node: local rank {local} has no GPU (this node has "
                f"{torch.cuda.device_count()}); start at most that many processes per node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not td.is_initialized():
        td.init_process_group(backend=backend, rank=rank, world_size=world)
    return TorchDist(
        rank=rank,
        world_size=world,
        device=device,
        local_rank=local,
        mode=config.distributed,
        cpu_offload=bool(config.fsdp_cpu_offload),
        bf16=bool(config.bf16),
    )


def torchrun_argv(nproc: int, args: list[str]) -> list[str]:
    """The command ``sfttrain run --nproc N ARGS`` execs: torchrun on this node, N processes.

    ``--standalone`` gives a local c10d rendezvous on a free port (several runs can share a node).
    """
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "sfttrain",
        "run",
        *args,
    ]


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the rest is passed to every rank as is)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


class StopRequest:
    """SIGTERM/SIGINT -> finish the current step, save a checkpoint, exit 0. A second SIGINT aborts."""

    def __init__(self, on_request: Callable[[str], None] | None = None) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        # called with the signal's name on the first request, from the handler: a user whose
        # step is slow sees at once that the stop was heard
        self._on_request = on_request

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = not self.requested
        self.requested = True
        if first and self._on_request is not None:
            self._on_request(signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_torchrun(argv: list[str], *, env: dict[str, str] | None = None) -> int:
    """Run the torchrun command ``argv`` to its end; its exit code.

    torchrun runs in its own session and this process stays as its parent only to route
    SIGTERM/SIGINT to the WORKERS: they agree, save one checkpoint and exit 0, so torchrun exits
    0 too. (Signalled itself, torchrun forwards the signal but then re-raises it: a traceback
    and a failed exit even though the checkpoint was written; a terminal's Ctrl-C would reach it
    through the process group, hence the separate session.)
    """
    proc = subprocess.Popen(argv, start_new_session=True, env=env)

    def forward(signum: int, _frame: Any) -> None:
        signal_workers(proc.pid, signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def signal_workers(agent: int, signum: int) -> None:
    """Send ``signum`` to torchrun's worker processes (its children); to torchrun if none is found."""
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:  # not Linux, or no /proc children list
        children = []
    for pid in [int(c) for c in children] or [agent]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


__all__ = [
    "Dist",
    "StopRequest",
    "TorchDist",
    "default_device",
    "dist_from_env",
    "gather_model_state",
    "is_fsdp",
    "run_torchrun",
    "shard_fsdp2",
    "signal_workers",
    "strip_nproc",
    "torchrun_argv",
    "under_torchrun",
]
