"""sftdata: turn Q&A data in any shape into packed, label-masked, memory-mapped training shards."""

from __future__ import annotations

__version__ = "0.1.0"

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMAS_DIR = PACKAGE_DIR / "schemas"
"""JSON Schemas of every file format sftpipe writes (package data: found in an installed wheel)."""
TINY_DIR = PACKAGE_DIR / "tiny"
"""The built-in tiny tokenizer and tiny model config (package data)."""

IGNORE_INDEX = -100
"""Label value for tokens that are not trained (Hugging Face / PyTorch cross-entropy convention)."""


def physical_memory() -> int:
    """This machine's memory in bytes (what sizing checks compare against)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        return 8 << 30


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()
