"""sftdata: turn Q&A data in any shape into packed, label-masked, memory-mapped training shards."""

from __future__ import annotations

__version__ = "0.1.0"

IGNORE_INDEX = -100
"""Label value for tokens that are not trained (Hugging Face / PyTorch cross-entropy convention)."""
