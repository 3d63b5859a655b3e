"""``PackOptions``: everything that decides the bytes of a pack's shards, and the checks that
refuse options no pack can honour (before any input is read)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from sftdata import physical_memory
from sftdata.errors import ConfigError
from sftdata.render import MissingStop, SpecialText, TrainOn
from sftdata.templates import DEFAULT_TEMPLATE_DATE

Overflow = Literal["drop", "truncate", "cutoff", "error"]
"""What a pack does with a record longer than seq_len."""
OVERFLOW: tuple[str, ...] = get_args(Overflow)


SHARD_BYTES = 64 << 20
"""Auto shard size: about this many bytes per shard file (3 int32 columns x seq_len per row)."""


Progress = Callable[[str, int, int | None], None]
"""``progress(stage, done, total)``: stage is "encode" (records) or "write" (rows)."""


@dataclass(frozen=True)
class PackOptions:
    """Everything that decides the bytes of the shards (plus ``num_proc`` and ``chunk_size``, which
    never do). The one declaration of the pack options: ``sftdata pack``'s and ``audit``'s
    command-line options and a ``data:`` section's keys are made from these fields, their types
    and their docstrings (the help text), and checked by :func:`knob_problem`."""

    seq_len: int
    """Row length in tokens."""
    tokenizer: str
    """'tiny', a local HF tokenizer folder or a SentencePiece .model file."""
    template: str = "auto"
    """auto (the tokenizer's chat_template), a built-in (chatml, llama2, alpaca, qwen2.5, qwen3, llama3, mistral, gemma, gemma3, phi3, phi4, deepseek3, glm4, gpt-oss, cohere), a LLaMA-Factory template name, fastchat:NAME or FILE.jinja."""
    train_on: TrainOn = "all-assistant"
    """Trained turns when a message has no 'train' flag (the flag always wins)."""
    overflow: Overflow = "drop"
    """Records longer than the seq-len: drop and count, keep the first seq-len tokens, cut each prompt/answer pair in proportion as LLaMA-Factory's cutoff_len does, or stop."""
    pack: bool = True
    """Pack several records per row; off: one record per row, padded."""
    val_fraction: float | None = None
    """Hold out this fraction of records as 'validation'."""
    val_count: int | None = None
    """Hold out this many records as 'validation'."""
    seed: int = 0
    """Seed of the validation pick and row shuffle (and of a data section's fractional weights)."""
    shard_size: int | None = None
    """Rows per shard file [default: a split's rows in equal files of at most about 64 MB]."""
    num_proc: int = 1
    """Worker processes that encode and write shards (the output is identical)."""
    chunk_size: int = 2000
    """Most records per encode task and tokenizer call (does not change the output)."""
    template_date: str = DEFAULT_TEMPLATE_DATE
    """The date templates print (strftime_now, date_string), fixed so packs reproduce."""
    strict: bool = False
    """Refuse records that need a fold-in (e.g. a system prompt merged into the first user turn for a template without a system role) instead of folding them in."""
    skip_invalid: bool = False
    """Skip records the template cannot render (listed and counted) instead of stopping."""
    allow_long: bool = False
    """Allow a seq-len past the tokenizer's model_max_length / the model's max_position_embeddings (e.g. for a model you will extend with RoPE scaling)."""
    max_samples: int | None = None
    """Pack only the first N records of the inputs (LLaMA-Factory's max_samples)."""
    special_text: SpecialText = "refuse"
    """A record whose own text (any role, reasoning, tool calls, results, schemas) holds a special token of the tokenizer, e.g. '<|im_end|>': refuse it (file:line), split (encode that text as plain text) or keep (encode the token: a forged turn if trained)."""
    missing_stop: MissingStop = "append"
    """A trained reply after which the template writes no stop token (GLM-4's last reply): append the model's stop token (trained), error, or allow (train replies without one)."""

    def resolved_shard_size(self) -> int:
        """Rows per shard file after applying the automatic default (at most: see
        :meth:`shard_bounds`)."""
        if self.shard_size is not None:
            return self.shard_size
        return max(1, SHARD_BYTES // (12 * self.seq_len))

    def shard_bounds(self, rows: int) -> list[int]:
        """Where each shard file of a split of ``rows`` rows starts (one more entry: ``rows``):
        every ``shard_size`` rows as given, or by default the rows split evenly (sizes one apart
        at most) among as few files as hold them (the workers write one file each at a time, so
        a last file much smaller than the others left a worker idle while the largest was
        written)."""
        most = self.resolved_shard_size()
        if self.shard_size is not None:
            return [*range(0, rows, most), rows]
        files = max(1, -(-rows // most))
        return [k * rows // files for k in range(files + 1)]

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


KNOB_MIN = {
    "seq_len": 2,
    "num_proc": 1,
    "shard_size": 1,
    "max_samples": 1,
    "val_count": 0,
    "chunk_size": 1,
}
"""The least value of each integer option that has one."""


def knob_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for :class:`PackOptions` field ``name`` (its type, its
    choices, its range), or None; the caller names the place (``--seq-len``, ``data.seq_len``)."""
    kind = _hints()[name]
    if value is None:
        return None if type(None) in get_args(kind) else "must be given"
    choices = next((get_args(t) for t in (kind, *get_args(kind)) if get_origin(t) is Literal), ())
    if choices:
        return None if value in choices else f"{value!r} is not one of {', '.join(choices)}"
    if bool in (kind, *get_args(kind)):
        return None if isinstance(value, bool) else f"must be true or false, not {value!r}"
    if int in (kind, *get_args(kind)):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, not {value!r}"
        low = KNOB_MIN.get(name)
        return None if low is None or value >= low else f"must be at least {low}, not {value}"
    if float in (kind, *get_args(kind)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, not {value!r}"
        return None if 0 <= value < 1 else f"must be in [0, 1), not {value}"  # val_fraction
    return None if isinstance(value, str) else f"must be a string, not {value!r}"


@functools.cache
def _hints() -> dict[str, Any]:
    return get_type_hints(PackOptions)


def check_options(opts: PackOptions, inputs: Sequence[Path]) -> None:
    if not inputs:
        raise ConfigError("no input files given")
    for f in fields(PackOptions):
        problem = knob_problem(f.name, getattr(opts, f.name))
        if problem is not None:
            raise ConfigError(f"--{f.name.replace('_', '-')}: {problem}")
    # Writing a shard holds a few rows' int32 columns; a row must fit in memory many times over.
    need = ROW_BUFFERS * 4 * opts.seq_len
    if need > physical_memory() // 4:
        raise ConfigError(
            f"--seq-len {opts.seq_len:,}: a row's buffers alone would take {need / 2**30:,.1f} GiB, "
            f"more than a quarter of this machine's memory"
        )
    if opts.val_fraction is not None and opts.val_count is not None:
        raise ConfigError("--val-fraction and --val-count: give at most one")


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
