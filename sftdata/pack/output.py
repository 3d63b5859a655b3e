"""The output folder of a pack: what may be replaced, the inputs' hashes and the fingerprint that
makes a repeated pack a no-op.

A folder is replaced only when it is empty, an earlier pack's (``index.json`` or the marker file a
pack leaves in it), or ``--overwrite`` says so; never the root, the home folder or an input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftdata import __version__
from sftdata.errors import ConfigError, ShardError
from sftdata.inputs import refuse_overwriting, shown
from sftdata.pack.options import PackOptions
from sftdata.shards import INDEX_NAME, KIND

MARKER = ".sftdata-pack"


def hash_inputs(inputs: Sequence[Path]) -> tuple[list[dict[str, Any]], int]:
    """sha256 and size of every input (and its line count, a progress total)."""
    out, lines = [], 0
    for p in inputs:
        if not p.is_file():
            raise ConfigError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
        h = hashlib.sha256()
        size = 0
        with p.open("rb") as f:
            while block := f.read(4 << 20):
                h.update(block)
                size += len(block)
                lines += block.count(b"\n")
        out.append({"file": Path(shown(p)).name, "bytes": size, "sha256": h.hexdigest()})
    return out, lines


LAYOUT = 2
"""Bump when the same inputs and options come to be written as different bytes (2: default shard
files split a split's rows evenly), so a folder written the older way is rebuilt, not served as
up to date under a fingerprint that no longer says what its bytes are."""


def fingerprint(
    inputs: list[dict[str, Any]], tokenizer_sha: str, template_key: str, opts: PackOptions
) -> str:
    """sha256 of everything that decides the output bytes; equal fingerprints => pack is a no-op."""
    payload = {
        "inputs": [[i["sha256"], i["bytes"]] for i in inputs],
        "tokenizer": tokenizer_sha,
        "template": template_key,
        "seq_len": opts.seq_len,
        "options": opts.output_options(),
        "tool": __version__,
        "layout": LAYOUT,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def existing_index(output: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError, RecursionError):
        d = json.loads((output / INDEX_NAME).read_text(encoding="utf-8"))
        if isinstance(d, dict) and d.get("kind") == KIND:
            return d
    return None


def check_output(output: Path, inputs: Sequence[Path], *, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: exists and is not a folder")
    out = output.resolve()
    if out == Path(out.anchor) or out == Path.home().resolve():
        raise ConfigError(f"{output}: refusing to use this folder as a shard folder")
    refuse_overwriting(inputs, output)
    if not output.exists() or overwrite or existing_index(output) is not None:
        return
    if any(output.iterdir()) and not (output / MARKER).exists():
        raise ShardError(
            f"{output}: exists and holds other files (not an sftdata shard folder); "
            "use --overwrite to replace it"
        )
