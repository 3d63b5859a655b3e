"""The one error tree. Library code raises these; the CLIs map them to one-line messages."""

from __future__ import annotations


class SftError(Exception):
    """Base of every error caused by what the user gave us (data, paths, options, configs)."""


class ConversionError(SftError):
    """A raw input file or record cannot be turned into a canonical conversation."""


class RecordError(ConversionError):
    """One raw record cannot be converted (``--skip-invalid`` counts it under ``reason``)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ValidationError(SftError):
    """A canonical conversation file breaks the schema or the structural rules."""


class TemplateError(SftError):
    """A chat template cannot be loaded or cannot render a record."""


class ShardError(SftError):
    """A shard folder is missing, incomplete, foreign, corrupted or unsafe."""


class CheckpointError(SftError):
    """A training checkpoint cannot be written (disk full, permissions) or read back intact."""


class ModelError(SftError):
    """A model or adapter folder is missing, incomplete or unsafe (pickle, paths outside it), or
    cannot be loaded."""


class ConfigError(SftError):
    """A training/packing configuration is unknown, ill-typed or impossible."""


class OutputError(SftError):
    """An output cannot be written: no permission, a full disk, a closed standard output, or a
    lock another process holds on it."""


def first_line(e: BaseException) -> str:
    """The first non-blank line of ``e``'s message, stripped; its class name when it has none
    (what a one-line error quotes of a library's exception)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
