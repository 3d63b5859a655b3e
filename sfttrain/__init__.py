"""sfttrain: a lean, provably correct fine-tuning loop over sftdata shards."""

from __future__ import annotations

from sftdata import __version__

__all__ = ["__version__"]
