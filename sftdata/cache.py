"""Where sftpipe keeps what only saves time or is node-local (tokenizer snapshots, fetched
shards, uploads being built): ``$SFTPIPE_CACHE``, else ``$XDG_CACHE_HOME/sftpipe``, else
``~/.cache/sftpipe``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where snapshots are cached: ``$SFTPIPE_CACHE``, else ``$XDG_CACHE_HOME/sftpipe``, else
    ``~/.cache/sftpipe``."""
    if os.environ.get("SFTPIPE_CACHE"):
        return Path(os.environ["SFTPIPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sftpipe"


__all__ = ["cache_dir"]
