"""Checkpoints: written to a temp folder, completed with a marker, renamed; found and validated on resume.

Layout of ``OUT_DIR/checkpoints/step-0000050/`` (``schemas/checkpoint.v1.json`` describes
``trainer_state.json``):

- ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA, PEFT format) or
  ``model.safetensors`` + ``config.json`` (full fine-tuning; the folder is then an HF model folder);
- tokenizer files (so the folder can be loaded, exported or sampled on its own);
- ``optimizer.pt``: optimizer and scheduler state (``torch.save``; loaded with ``weights_only=True``,
  i.e. tensors and plain containers only — never arbitrary pickle). The optimizer state is the
  FULL state keyed by parameter name (``torch.distributed.checkpoint.state_dict``'s
  ``get_optimizer_state_dict(..., full_state_dict=True)``), so the file is the same for one
  process, DDP or FSDP on any number of ranks, and resumes on any of them;
- ``rng.pt``: python, numpy and torch RNG states (same loading rule);
- ``trainer_state.json``: step, data cursor, trained tokens, the resolved config and its
  trajectory hash, the shards' identity, the model spec;
- ``COMPLETE``: written last; a folder without it is never resumed from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdata import __version__, sha256_file
from sftdata.errors import CheckpointError
from sftdata.inputs import read_small
from sftdata.jsonfile import read_json, schema_problem
from sfttrain.config import TrainConfig, build_config, trajectory_hash
from sfttrain.data import Cursor
from sfttrain.weights import optimizer_state, save_optimizer, save_rng, save_weights, written

FORMAT_VERSION = 1
KIND = "sftpipe.checkpoint"
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
SCHEMA = "checkpoint.v1"
MARKER_SCHEMA = "checkpoint_marker.v1"


@dataclass
class RunState:
    """Where a run stands, saved whole in every checkpoint's ``trainer_state.json`` (beside the
    config and its hash) and restored whole on resume, as torchtune's ``TrainingProgress``."""

    step: int
    """Optimizer steps done."""
    cursor: Cursor
    """Where the data stream stands (the next step's rows)."""
    trained_tokens: int
    """Trained tokens of every step so far, summed over ranks."""
    total_steps: int
    """Steps the run will take in all."""
    world_size: int
    """Ranks that trained it (resume on another count is allowed for DDP/FSDP)."""
    model: str
    """The model given to ``sfttrain run`` (``tiny`` or a folder)."""
    base_model: str | None
    """Where an adapter's base model lives (``base_model/`` of the run for tiny + LoRA)."""
    shards: dict[str, Any]
    """The shard folder's identity: a resume must read the same shards."""
    last_loss: float | None
    """Loss of the last logging window."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``trainer_state.json`` keys, schemas/checkpoint.v1.json)."""
        return {**dataclasses.asdict(self), "cursor": self.cursor.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        """The state a ``trainer_state.json`` saved (its other keys, e.g. the config, ignored);
        ``d`` already checked against the schema (:func:`read_state`)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"cursor"}
        return cls(cursor=Cursor(**d["cursor"]), **{k: d.get(k) for k in names})


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step-0000050``: zero-padded so names sort by step."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def shards_identity(shards_dir: str | Path, index: dict[str, Any]) -> dict[str, Any]:
    """What identifies the training data of a run: the index's fingerprint and the index bytes' hash."""
    raw = (Path(shards_dir) / "index.json").read_bytes()
    return {
        "path": str(Path(shards_dir).resolve()),
        "fingerprint": index.get("fingerprint"),
        "index_sha256": hashlib.sha256(raw).hexdigest(),
    }


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | Path,
    *,
    state: RunState,
    model,
    tokenizer,
    optimizer,
    scheduler,
    config: TrainConfig,
    model_state: dict[str, Any] | None = None,
    optim_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, then apply ``save_total_limit``. Returns its folder.

    ``model_state``/``optim_state``: full state dicts gathered by every rank beforehand (FSDP);
    when None they are taken from ``model``/``optimizer`` here (one process or DDP).
    On any failure (e.g. a full disk) the temp folder is removed, earlier checkpoints are untouched,
    and a one-line CheckpointError says so.
    """

    if optim_state is None:
        optim_state = optimizer_state(model, optimizer)
    step = state.step
    target = checkpoint_dir(run_dir, step)
    full_state = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "tool": {"name": "sftpipe", "version": __version__},
        **state.to_dict(),
        "finetuning_type": config.finetuning_type,
        "config": config.to_dict(),
        "config_hash": trajectory_hash(config, world_size=state.world_size),
    }
    try:
        with written(target, "the checkpoint") as tmp:
            save_weights(model, tmp, finetuning_type=config.finetuning_type, state_dict=model_state)
            tokenizer.save_pretrained(str(tmp))
            save_optimizer(tmp, optim_state, scheduler)
            save_rng(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2) + "\n", encoding="utf-8")
            # last: the marker says the folder is complete and what each file must hash to
            marker = {"format_version": 1, "step": step, "sha256": _file_digests(tmp)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    except CheckpointError as e:
        prev = latest_checkpoint(run_dir)
        kept = f"; {prev} is still valid" if prev else ""
        raise CheckpointError(f"{e}{kept}") from None
    if config.save_total_limit is not None:
        rotate(run_dir, keep=config.save_total_limit)
    return target


def rotate(run_dir: str | Path, *, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep``; returns what was removed."""
    done = complete_checkpoints(run_dir)
    old = done[:-keep] if keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def remove_stale_temps(run_dir: str | Path) -> None:
    """Temp folders left by a run killed mid-checkpoint (they never became checkpoints)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".step-*"):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- find and load


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders with their completion marker, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and _step_of(p) >= 0 and (p / MARKER).is_file()
    ]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_state(folder: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a complete checkpoint, or CheckpointError (one line)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist")
    if not (folder / MARKER).is_file():
        raise CheckpointError(
            f"{folder}: checkpoint is incomplete (no {MARKER} marker); resume from an earlier one"
        )
    path = folder / STATE_FILE
    state = read_json(path, error=CheckpointError, what="checkpoint state")
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise CheckpointError(f"{path}: not an sftpipe checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {state.get('format_version')!r} is not supported (this reader knows {FORMAT_VERSION})"
        )
    _validate_schema(state, where=str(path))
    return state


def _validate_schema(state: dict[str, Any], *, where: str) -> None:
    problem = schema_problem(state, SCHEMA)
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")


def _file_digests(folder: Path, *, hash_files: bool = True) -> dict[str, str]:
    """Every file of a checkpoint folder but its marker -> its sha256 (or "" unhashed)."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p) if hash_files else ""
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MARKER
    }


LEGACY_MARKER = re.compile(r"step \d+\s*")
"""The marker of checkpoints written before checksums were recorded: it verifies nothing."""


def verify_checkpoint(folder: Path, *, allow_unverified: bool = False) -> None:
    """The completion marker parses (``schemas/checkpoint_marker.v1.json``) and lists every
    other file of the checkpoint with its sha256, and every file still has it.

    A marker written before checksums were recorded (``step N``) verifies nothing: it is refused
    unless ``allow_unverified`` (``--allow-unverified``).

    Raises:
        CheckpointError: naming the checkpoint and what is wrong (the first missing, unlisted or
            changed file; a marker that is not one).
    """
    from sftdata.inputs import inside
    from sftdata.jsonfile import loads_strict

    where = folder / MARKER
    text = read_small(where, error=CheckpointError, what="checkpoint marker", limit=1 << 20)
    if LEGACY_MARKER.fullmatch(text):
        if allow_unverified:
            return
        raise CheckpointError(
            f"{where}: an old-format marker that records no checksums, so nothing of this "
            "checkpoint can be verified; pass --allow-unverified to use it anyway"
        )
    try:
        marker = loads_strict(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: not a checkpoint marker (invalid JSON: {e})") from None
    problem = schema_problem(marker, MARKER_SCHEMA)
    if problem is not None:
        raise CheckpointError(f"{where}: not a checkpoint marker of this version ({problem})")
    recorded: dict[str, str] = marker["sha256"]
    present = set(_file_digests(folder, hash_files=False))
    unlisted = sorted(present - set(recorded))
    if not recorded or unlisted:
        what = unlisted[0] if unlisted else "any file"
        raise CheckpointError(
            f"{where}: does not record the checksum of {what} (a damaged or edited checkpoint)"
        )
    for name, digest in sorted(recorded.items()):
        path = folder / name
        if not inside(folder, name) or not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing (a damaged checkpoint)")
        if sha256_file(path) != digest:
            raise CheckpointError(
                f"{folder}: {name} does not match the sha256 recorded when it was saved "
                "(a damaged checkpoint)"
            )


def verify_before_use(*folders: str | Path | None, allow_unverified: bool = False) -> None:
    """Verify each of ``folders`` that is a checkpoint (holds a completion marker) before a
    command reads it (``eval``, ``generate``, ``chat``, ``export``); other folders and ``tiny``
    pass.

    Raises:
        CheckpointError: as :func:`verify_checkpoint`.
    """
    for folder in folders:
        if folder is not None and str(folder) != "tiny" and (Path(folder) / MARKER).is_file():
            verify_checkpoint(Path(folder), allow_unverified=allow_unverified)


def resolve_resume(
    resume: str, run_dir: str | Path, *, allow_unverified: bool = False
) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, and notes on damaged ones passed over.

    ``auto``: the newest complete checkpoint of ``run_dir`` whose files verify (None if there is
    none); a damaged newer one is skipped and noted. A path: that checkpoint, verified.

    Raises:
        CheckpointError: the given checkpoint is damaged, or every checkpoint of the run is.
    """
    if resume != "auto":
        folder = Path(resume)
        if (folder / MARKER).is_file():
            verify_checkpoint(folder, allow_unverified=allow_unverified)
        return folder, []  # read_state names what else is wrong with it
    notes: list[str] = []
    for folder in reversed(complete_checkpoints(run_dir)):
        try:
            verify_checkpoint(folder, allow_unverified=allow_unverified)
        except CheckpointError as e:
            notes.append(f"{e}; skipped")
            continue
        if notes:
            notes.append(f"resuming from {folder}, the newest intact checkpoint")
        return folder, notes
    if notes:
        raise CheckpointError(f"{run_dir}: no intact checkpoint to resume from ({notes[0]})")
    return None, []


def check_resumable(
    folder: Path,
    *,
    config: TrainConfig,
    shards: dict[str, Any],
    model_spec: str,
    world_size: int = 1,
) -> dict[str, Any]:
    """The state of ``folder`` if this run can continue from it; else CheckpointError naming the difference.

    The number of ranks may differ from the saved run's as long as the global batch (micro-batch ×
    accumulation × ranks) is the same: 2 ranks × accumulation 4 resume as 1 rank × accumulation 8.
    """
    state = read_state(folder)
    saved = build_config(state["config"], where=f"{folder / STATE_FILE}: config: ")
    saved_ws = int(state.get("world_size", 1))
    if trajectory_hash(saved, world_size=saved_ws) != state["config_hash"]:
        raise CheckpointError(
            f"{folder / STATE_FILE}: config_hash does not match its config (edited by hand?)"
        )
    if trajectory_hash(saved, world_size=saved_ws) != trajectory_hash(
        config, world_size=world_size
    ):
        mine, theirs = config.to_dict(), saved.to_dict()
        from sfttrain.config import NON_TRAJECTORY_KEYS, PER_DEVICE_BATCH_KEYS, global_batch_rows

        diff = [
            k
            for k in mine
            if mine[k] != theirs.get(k)
            and k not in NON_TRAJECTORY_KEYS
            and k not in PER_DEVICE_BATCH_KEYS
        ]
        if not diff:
            raise CheckpointError(
                f"{folder}: checkpoint is from a run with global batch "
                f"{global_batch_rows(saved, saved_ws)} rows "
                f"({saved.per_device_train_batch_size} × accumulation "
                f"{saved.gradient_accumulation_steps} × {saved_ws} ranks), now "
                f"{global_batch_rows(config, world_size)} ({config.per_device_train_batch_size} × "
                f"{config.gradient_accumulation_steps} × {world_size}); set "
                "gradient_accumulation_steps so the product matches"
            )
        key = diff[0]
        raise CheckpointError(
            f"{folder}: checkpoint is from a run with a different config "
            f"({key}: {theirs.get(key)!r} there, {mine[key]!r} now)"
        )
    if state["shards"]["index_sha256"] != shards["index_sha256"]:
        raise CheckpointError(
            f"{folder}: checkpoint was trained on other shards ({state['shards']['path']}), not {shards['path']}"
        )
    if state["model"] != model_spec:
        raise CheckpointError(
            f"{folder}: checkpoint was trained from model {state['model']!r}, not {model_spec!r}"
        )
    return state


@dataclass
class Resume:
    """The checkpoint a run continues from (step 1c), read and verified before anything is written."""

    folder: Path | None = None
    """The checkpoint folder, or None for a fresh run (also: ``--resume auto`` found none)."""
    state: RunState | None = None
    """Where that run stood, checked against this run's config, shards, model and ranks."""
    finetuning_type: str = ""
    """What its weights are (``lora``: an adapter; ``full``: the whole model)."""
    notes: list[str] = field(default_factory=list)
    """Damaged checkpoints ``--resume auto`` passed over, and which one it used instead."""


def find_resume(
    resume: str | None, run_dir: Path, *, config: TrainConfig, shards: dict[str, Any],
    model_spec: str, world_size: int, allow_unverified: bool = False,
) -> Resume:  # fmt: skip
    """``--resume auto|PATH`` -> the checkpoint to continue from, verified (or none)."""
    if resume is None:
        return Resume()
    folder, notes = resolve_resume(resume, run_dir, allow_unverified=allow_unverified)
    if folder is None:
        return Resume(notes=notes)
    saved = check_resumable(
        folder, config=config, shards=shards, model_spec=model_spec, world_size=world_size
    )
    return Resume(
        folder=folder, state=RunState.from_dict(saved),
        finetuning_type=saved["finetuning_type"], notes=notes,
    )  # fmt: skip


def checkpoint_due(save_steps: int, step: int) -> bool:
    """``save_steps``' rule (0: only at the end and on a stop)."""
    return bool(save_steps) and step % save_steps == 0


__all__ = [
    "CHECKPOINTS",
    "FORMAT_VERSION",
    "MARKER",
    "Resume",
    "RunState",
    "check_resumable",
    "checkpoint_dir",
    "checkpoint_due",
    "complete_checkpoints",
    "find_resume",
    "latest_checkpoint",
    "read_state",
    "remove_stale_temps",
    "resolve_resume",
    "rotate",
    "save_checkpoint",
    "shards_identity",
    "verify_before_use",
    "verify_checkpoint",
]
