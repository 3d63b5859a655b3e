"""What a checkpoint holds as tensors: the trained weights (safetensors, PEFT or HF layout), the
optimizer and scheduler state, and the RNG states; each saved and loaded here, every failure one
CheckpointError line naming the file.

``torch.load`` is only ever called with ``weights_only=True``: tensors and plain containers, never
arbitrary pickle (a checkpoint folder may come from someone else).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sftdata.atomic import atomic_dir
from sftdata.errors import CheckpointError, first_line
from sfttrain.wrappers import unwrap

OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


def write_failure(e: BaseException) -> str:
    """A failed write in words: safetensors reports one as SafetensorError, torch.save as
    RuntimeError ("... file write failed"), the rest as OSError; a full disk reads the same."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return first_line(e)


def _is_write_failure(e: BaseException) -> bool:
    from safetensors import SafetensorError

    if isinstance(e, RuntimeError) and not isinstance(e, SafetensorError):
        return "writ" in str(e).lower()  # torch.save: "... failed writing file ..."
    return isinstance(e, (OSError, SafetensorError))


@contextlib.contextmanager
def written(target: Path, what: str) -> Iterator[Path]:
    """``atomic_dir(target)`` where a failed write (a full disk, a read-only folder) is one
    CheckpointError line naming ``target`` and ``what``; nothing is left at ``target``."""
    try:
        with atomic_dir(target) as tmp:
            yield tmp
    except Exception as e:
        if not _is_write_failure(e):
            raise
        raise CheckpointError(f"{target}: could not write {what} ({write_failure(e)})") from None


def save_weights(
    model, folder: Path, *, finetuning_type: str, state_dict: dict[str, Any] | None = None
) -> None:
    """The trained weights as safetensors: a PEFT adapter (LoRA) or a full HF model folder.

    ``state_dict``: the full state dict gathered from an FSDP-sharded ``model`` (keys as in the
    unwrapped model); without it the model's own (unsharded) tensors are written.
    """
    kw: dict[str, Any] = {} if state_dict is None else {"state_dict": state_dict}
    if finetuning_type == "lora":
        model.save_pretrained(str(folder), safe_serialization=True, **kw)
    else:
        unwrap(model).save_pretrained(str(folder), safe_serialization=True, **kw)


def _load_file(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read the weights ({e})") from None


def load_weights(model, folder: Path, *, finetuning_type: str) -> None:
    """Load what ``save_weights`` wrote into the (identically built) ``model``, in place."""
    if finetuning_type == "lora":
        from peft import set_peft_model_state_dict

        f = folder / "adapter_model.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{folder}: no adapter_model.safetensors (not a LoRA checkpoint)")
        result = set_peft_model_state_dict(model, _load_file(f))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise CheckpointError(f"{f}: adapter does not fit the model (e.g. {unexpected[0]})")
        return
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors (not a full fine-tuning checkpoint)")
    inner = unwrap(model)
    state: dict[str, Any] = {}
    for f in files:
        state.update(_load_file(f))
    missing, unexpected = inner.load_state_dict(state, strict=False)
    tied = set(getattr(inner, "_tied_weights_keys", None) or [])
    if isinstance(getattr(inner, "_tied_weights_keys", None), dict):
        tied = set(inner._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if unexpected or missing:
        what = (unexpected or missing)[0]
        raise CheckpointError(f"{folder}: weights do not fit the model (e.g. {what})")


def optimizer_state(model, optimizer) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name (same file for any rank count or wrapper).

    Under FSDP every rank must call it (it all-gathers); only rank 0 then holds the tensors.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def save_optimizer(folder: Path, optim_state: dict[str, Any], scheduler) -> None:
    """``optimizer.pt``: the full optimizer state (``optimizer_state``) and the scheduler's."""
    import torch

    torch.save(
        {"optimizer": optim_state, "scheduler": scheduler.state_dict()}, folder / OPTIMIZER_FILE
    )


def load_optimizer(folder: Path, *, model, optimizer, scheduler) -> None:
    """Optimizer (full, name-keyed) and scheduler state into a possibly DDP/FSDP-wrapped run.

    Every rank reads the file (the run folder is on a filesystem all nodes see) and
    ``set_optimizer_state_dict`` keeps each rank's shard under FSDP.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        opt = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            model,
            optimizer,
            optim_state_dict=opt["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        scheduler.load_state_dict(opt["scheduler"])
    except Exception as e:
        raise CheckpointError(
            f"{folder / OPTIMIZER_FILE}: cannot load optimizer state ({first_line(e)})"
        ) from None


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) RNG states as tensors and plain containers."""
    import torch

    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    import torch

    v, keys, gauss = state["python"]
    random.setstate((v, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(folder: Path) -> None:
    """``rng.pt``: the RNG states of this moment (``rng_state``)."""
    import torch

    torch.save(rng_state(), folder / RNG_FILE)


def load_rng(folder: Path) -> None:
    """Restore the RNG states saved in ``folder`` (call it right before the first resumed step)."""
    import torch

    try:
        state = torch.load(folder / RNG_FILE, map_location="cpu", weights_only=True)
        set_rng_state(state)
    except Exception as e:
        raise CheckpointError(
            f"{folder / RNG_FILE}: cannot load RNG state ({first_line(e)})"
        ) from None


def restore_training(folder: Path, *, model, optimizer, scheduler) -> None:
    """Resume step 3: optimizer and scheduler state from ``folder``, then the RNG (last:
    building the model drew from it)."""
    load_optimizer(folder, model=model, optimizer=optimizer, scheduler=scheduler)
    load_rng(folder)


__all__ = [
    "OPTIMIZER_FILE",
    "RNG_FILE",
    "load_optimizer",
    "load_rng",
    "load_weights",
    "optimizer_state",
    "restore_training",
    "rng_state",
    "save_optimizer",
    "save_rng",
    "save_weights",
    "set_rng_state",
    "write_failure",
    "written",
]
