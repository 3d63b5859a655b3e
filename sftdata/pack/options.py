"""``PackOptions``: everything that decides the bytes of a pack's shards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sftdata.templates import DEFAULT_TEMPLATE_DATE

OVERFLOW = ("drop", "truncate", "error")


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
    """Records longer than seq_len: drop (counted), truncate (keep the first seq_len), error."""
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
    """Records per encode_batch call (does not change the output)."""
    template_date: str = DEFAULT_TEMPLATE_DATE
    """The date templates see (``strftime_now``, ``date_string``), pinned for reproducibility."""
    strict: bool = False
    """Refuse records that need a documented fold-in instead of folding them in."""
    skip_invalid: bool = False
    """Skip and count records the template cannot render (else the first one stops the pack)."""
    allow_long: bool = False
    """Allow a seq_len past the tokenizer's ``model_max_length`` / the model's positions."""

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
        }
