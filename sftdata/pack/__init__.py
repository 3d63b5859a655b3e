"""``sftdata pack``: canonical JSONL -> rendered, masked, tokenized records -> packed shards.

One stage per module, in data-flow order:

- ``options``: :class:`PackOptions`, everything that decides the output bytes, and its checks;
- ``output``: the output folder (what may be replaced), input hashes and the no-op fingerprint;
- ``encode``: chunks of JSONL lines rendered and tokenized with one ``encode_batch`` call each
  (worker side), zero-trained and overflow policies applied;
- ``rows``: the pure packer (best-fit decreasing) and the layout of one row (labels, positions);
- ``workers``: the worker processes and the shard-writing tasks they run;
- ``report``: :class:`PackReport`, what a pack did, in numbers and in words;
- ``pipeline``: :func:`pack` itself — inputs hashed, spill, validation split, rows, shards,
  ``index.json`` last, the work folder moved into place.
"""

from __future__ import annotations

from sftdata.pack.encode import encode_chunk, read_chunks, render_stats
from sftdata.pack.options import OVERFLOW, PackOptions
from sftdata.pack.output import fingerprint
from sftdata.pack.pipeline import pack
from sftdata.pack.report import PackReport
from sftdata.pack.rows import build_row, efficiency, pack_rows

__all__ = [
    "OVERFLOW",
    "PackOptions",
    "PackReport",
    "build_row",
    "efficiency",
    "encode_chunk",
    "fingerprint",
    "pack",
    "pack_rows",
    "read_chunks",
    "render_stats",
]
