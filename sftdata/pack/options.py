"""``PackOptions``: everything that decides the bytes of a pack's shards, and the checks that
refuse options no pack can honour (before any input is read)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftdata import physical_memory
from sftdata.errors import ConfigError
from sftdata.render import MISSING_STOP, SPECIAL_TEXT, TRAIN_ON
from sftdata.templates import DEFAULT_TEMPLATE_DATE

OVERFLOW = ("drop", "truncate", "cutoff", "error")


SHARD_BYTES = 64 << 20
"""Auto shard size: about this many bytes per shard file (3 int32 columns x seq_len per row)."""


Progress = Callable[[str, int, int | None], None]
"""``progress(stage, done, total)``: stage is "encode" (records) or "write" (rows)."""


@dataclass(frozen=True)
class PackOptions:
    """Everything that decides the bytes of the shards (plus ``num_proc``, which never does)."""

    seq_len: int
    """Row length in tokens."""
    tokenizer: str
    """``"tiny"``, a local HF tokenizer folder or a SentencePiece ``.model`` file."""
    template: str = "auto"
    """Chat template: auto, a built-in name (chatml, qwen2.5, llama3, ...), a LLaMA-Factory name, fastchat:NAME or a .jinja file."""
    train_on: str = "all-assistant"
    """Which turns are trained when a message carries no ``train`` flag."""
    overflow: str = "drop"
    """Records longer than seq_len: drop (counted), truncate (keep the first seq_len), cutoff (cut each prompt/answer pair as LLaMA-Factory does), error."""
    pack: bool = True
    """False: one record per row, padded (``--no-pack``)."""
    val_fraction: float | None = None
    """Fraction of kept records held out as the ``validation`` split."""
    val_count: int | None = None
    """Number of kept records held out as the ``validation`` split."""
    seed: int = 0
    """Seed of the validation pick and of the row shuffle."""
    shard_size: int | None = None
    """Rows per shard file; None: about 64 MB per file."""
    num_proc: int = 1
    """Encoding worker processes (does not change the output)."""
    chunk_size: int = 2000
    """Most records per encode task and tokenizer call (does not change the output)."""
    template_date: str = DEFAULT_TEMPLATE_DATE
    """The date templates see (``strftime_now``, ``date_string``), pinned for reproducibility."""
    strict: bool = False
    """Refuse records that need a documented fold-in instead of folding them in."""
    skip_invalid: bool = False
    """Skip and count records the template cannot render (else the first one stops the pack)."""
    allow_long: bool = False
    """Allow a seq_len past the tokenizer's ``model_max_length`` / the model's positions."""
    max_samples: int | None = None
    """Pack only the first N records of the inputs (LLaMA-Factory's ``max_samples``)."""
    special_text: str = "refuse"
    """A record whose own text holds a control token of the tokenizer: refuse it, split (encode the text as plain text) or keep (encode the token)."""
    missing_stop: str = "append"
    """A trained reply after which the template writes no stop token: append the model's stop token, error, or allow (train it without one)."""

    def resolved_shard_size(self) -> int:
        """Rows per shard file after applying the automatic default."""
        if self.shard_size is not None:
            return self.shard_size
        return max(1, SHARD_BYTES // (12 * self.seq_len))

    def output_options(self) -> dict[str, Any]:
        """The options recorded in the index and fingerprinted (those that change the bytes)."""
        return {
            "train_on": self.train_on,
            "overflow": self.overflow,
            "pack": self.pack,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "val_count": self.val_count,
            "shard_size": self.resolved_shard_size(),
            "template_date": self.template_date,
            "strict": self.strict,
            "skip_invalid": self.skip_invalid,
            "special_text": self.special_text,
            "missing_stop": self.missing_stop,
            # recorded only when set, so packs without it keep their fingerprints
            **({} if self.max_samples is None else {"max_samples": self.max_samples}),
        }


def check_options(opts: PackOptions, inputs: Sequence[Path]) -> None:
    if not inputs:
        raise ConfigError("no input files given")
    if opts.seq_len < 2:
        raise ConfigError(f"--seq-len {opts.seq_len}: must be at least 2")
    # Writing a shard holds a few rows' int32 columns; a row must fit in memory many times over.
    need = ROW_BUFFERS * 4 * opts.seq_len
    if need > physical_memory() // 4:
        raise ConfigError(
            f"--seq-len {opts.seq_len:,}: a row's buffers alone would take {need / 2**30:,.1f} GiB, "
            f"more than a quarter of this machine's memory"
        )
    if opts.overflow not in OVERFLOW:
        raise ConfigError(f"--overflow {opts.overflow!r}: must be one of {', '.join(OVERFLOW)}")
    for flag, value, choices in (
        ("--train-on", opts.train_on, TRAIN_ON),
        ("--special-text", opts.special_text, SPECIAL_TEXT),
        ("--missing-stop", opts.missing_stop, MISSING_STOP),
    ):
        if value not in choices:
            raise ConfigError(f"{flag} {value!r}: must be one of {', '.join(choices)}")
    if opts.val_fraction is not None and opts.val_count is not None:
        raise ConfigError("--val-fraction and --val-count: give at most one")
    if opts.val_fraction is not None and not 0 <= opts.val_fraction < 1:
        raise ConfigError(f"--val-fraction {opts.val_fraction}: must be in [0, 1)")
    if opts.val_count is not None and opts.val_count < 0:
        raise ConfigError(f"--val-count {opts.val_count}: must not be negative")
    if opts.shard_size is not None and opts.shard_size < 1:
        raise ConfigError(f"--shard-size {opts.shard_size}: must be at least 1")
    if opts.num_proc < 1:
        raise ConfigError(f"--num-proc {opts.num_proc}: must be at least 1")
    if opts.max_samples is not None and opts.max_samples < 1:
        raise ConfigError(f"--max-samples {opts.max_samples}: must be at least 1")


ROW_BUFFERS = 6
"""int32 columns of one row held at once while a shard is written (ids, labels, positions and
their copies in the writer)."""


def check_length_limit(opts: PackOptions, limit: int | None, tokenizer: str) -> None:
    if limit is not None and opts.seq_len > limit and not opts.allow_long:
        raise ConfigError(
            f"--seq-len {opts.seq_len:,} is more than {tokenizer}'s maximum length {limit:,} "
            "(model_max_length / max_position_embeddings); the model was not trained on longer "
            "rows: pack with a smaller --seq-len, or pass --allow-long"
        )
