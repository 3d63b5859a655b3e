"""The run's folder (``sfttrain run -o``): what it may hold, and the weights written beside the
checkpoints — ``base_model/`` (the seeded tiny base an adapter needs) and ``final/``.

A run writes into an empty or new folder, or continues its own; it never mixes its files with a
user's, replaces a finished run (unless ``overwrite_output_dir``) or writes into (or around) the
shard folder it reads. The files of ``final/`` are also linked from the run folder itself, where a
LLaMA-Factory inference config expects the adapter or model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sftdata.errors import CheckpointError, ConfigError
from sftdata.inputs import read_small, refuse_overwriting
from sfttrain.checkpoint import RunState, latest_checkpoint, read_state, save_checkpoint
from sfttrain.config import TrainConfig
from sfttrain.distributed import Dist, gather_model_state
from sfttrain.model import TINY
from sfttrain.weights import optimizer_state, save_weights, written

RUN_ENTRIES = frozenset(
    {
        "checkpoints",
        "final",
        "final_merged",
        "base_model",
        "metrics.jsonl",
        "loss.png",
        "tensorboard",
        "wandb",
        "mlruns",
        "predictions",
    }
)
"""What a run writes into its folder; anything else there is someone else's."""


def _is_final_link(p: Path) -> bool:
    """One of the links ``link_final`` makes (``NAME -> final/NAME``)."""
    return p.is_symlink() and os.readlink(p) == f"final/{p.name}"


def _ours(p: Path) -> bool:
    # dot names: temp files of a killed write (atomic_file/written) and the user's own hidden ones
    return p.name in RUN_ENTRIES or p.name[0] == "." or _is_final_link(p)


def check_run_dir(
    run_dir: Path, *, shards: Path, resume: str | None, overwrite: bool = False
) -> None:
    """A run writes into an empty or new folder, or continues its own (``--resume``); it never
    replaces a finished run's ``final/``, mixes its files with a user's or writes into (or
    around) the shard folder it reads."""
    refuse_overwriting([shards], run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: exists and is not a folder; -o names the run's folder")
    foreign = sorted(p.name for p in run_dir.iterdir() if not _ours(p))
    if foreign:
        raise ConfigError(
            f"{run_dir}: holds files that are not a sfttrain run's ({', '.join(foreign[:3])}); "
            "give an empty or new -o folder"
        )
    if overwrite or resume is not None:
        return
    if latest_checkpoint(run_dir) is not None or (run_dir / "final").exists():
        raise ConfigError(
            f"{run_dir}: already holds a run (checkpoints or final/); continue it with "
            "--resume auto, start afresh with overwrite_output_dir: true, or give another -o folder"
        )


def clear_run_dir(run_dir: Path) -> bool:
    """Remove an earlier run from ``run_dir`` (``overwrite_output_dir``): only what a run writes.
    True when something was removed (the command says so)."""
    if not run_dir.is_dir():
        return False
    removed = False
    for p in run_dir.iterdir():
        if _is_final_link(p):
            p.unlink()
        elif p.name in RUN_ENTRIES and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.name in RUN_ENTRIES:
            p.unlink()
        else:
            continue
        removed = True
    return removed


def link_final(run_dir: Path) -> list[str]:
    """``run_dir/NAME -> final/NAME`` for every file of ``final/``: the weights where a
    LLaMA-Factory user's inference config looks for them (``adapter_name_or_path: OUTPUT_DIR``,
    or ``model_name_or_path`` after full fine-tuning). Names a run writes itself are skipped."""
    made = []
    for f in sorted((run_dir / "final").iterdir()):
        link = run_dir / f.name
        if f.name in RUN_ENTRIES or not f.is_file():
            continue
        if link.is_symlink() or not link.exists():
            link.unlink(missing_ok=True)
            link.symlink_to(f"final/{f.name}")
            made.append(f.name)
    return made


def base_model_dir(
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


def save_final(
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
    link_final(run_dir)
    if config.save_merged and config.finetuning_type == "lora":
        from sfttrain.export.hf import export_checkpoint

        export_checkpoint(final_dir, run_dir / "final_merged", merge=True, overwrite=True)
    return final_dir


def save_run_checkpoint(
    run_dir: Path, state: RunState, *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
    tokenizer: Any, config: TrainConfig, dist: Dist,
) -> Path | None:  # fmt: skip
    """Checkpoint where the run stands (every rank gathers, rank 0 writes, every rank waits)."""
    dist.barrier()
    model_state = gather_model_state(model)  # FSDP all-gathers the shards
    optim_state = optimizer_state(model, optimizer)
    path = None
    if dist.is_main:
        path = save_checkpoint(
            run_dir, state=state, model=model, tokenizer=tokenizer, optimizer=optimizer,
            scheduler=scheduler, config=config, model_state=model_state, optim_state=optim_state,
        )  # fmt: skip
    dist.barrier()
    return path


def run_parts(run_dir: Path) -> tuple[Path, Path] | None:
    """(shards, model) of a run folder given where shards are asked for (``sfttrain eval RUN``):
    the shards its newest checkpoint recorded, unchanged since (their index hashes the same),
    and its ``final/`` weights (else that checkpoint). None when ``run_dir`` is not a run folder.
    """
    if (run_dir / "index.json").exists() or not (run_dir / "checkpoints").is_dir():
        return None
    newest = latest_checkpoint(run_dir)
    if newest is None:
        raise CheckpointError(f"{run_dir}: a run folder without a complete checkpoint")
    recorded = read_state(newest).get("shards") or {}
    shards = Path(str(recorded.get("path", "")))
    try:
        raw = read_small(shards / "index.json", error=CheckpointError, what="shard index")
    except CheckpointError:
        raise CheckpointError(
            f"{run_dir}: the run's shards {shards} are gone; give the shard folder itself"
        ) from None
    if hashlib.sha256(raw.encode("utf-8")).hexdigest() != recorded.get("index_sha256"):
        raise CheckpointError(
            f"{run_dir}: its shards {shards} were packed again since the run; give the shard "
            "folder itself to evaluate on the new ones"
        )
    final = run_dir / "final"
    return shards, final if final.is_dir() else newest


__all__ = [
    "RUN_ENTRIES",
    "base_model_dir",
    "check_run_dir",
    "clear_run_dir",
    "link_final",
    "run_parts",
    "save_final",
    "save_run_checkpoint",
]
