"""What rendering gives: a record's samples (text and trained character spans), their
tokenization (ids and train mask), and the refusal of a record that cannot be trained."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

REFUSALS = ("template_error", "not_rendered", "strict", "control_token")
"""Reasons a record is refused (``sftdata pack --skip-invalid`` counts them)."""


@dataclass(frozen=True)
class EncodedSample:
    """One tokenized sample: token ids and which of them are trained."""

    input_ids: np.ndarray
    """int32 token ids of the rendered sample (no padding)."""
    train_mask: np.ndarray
    """bool, same length: True where the token is trained (its label is itself)."""
    offsets: np.ndarray | None = None
    """int64[n, 2]: each token's characters in the sample's text, kept only when asked for (the
    audit's second renderer reads them); None otherwise."""


@dataclass(frozen=True)
class RenderedSample:
    """One rendered sample: its text and trained character spans (sorted, disjoint)."""

    text: str
    spans: list[tuple[int, int]]
    hidden: str | None = None
    """``--special-text split``: the text with the record's own control tokens hidden
    (``sftdata.render.control``), which the split encoder tokenizes; None: ``text`` as it is."""


@dataclass
class RenderedRecord:
    """What rendering one record gave: its samples, or the reason it was refused."""

    samples: list[RenderedSample] = field(default_factory=list)
    """The whole record first, then one sample per split turn."""
    fold_ins: list[str] = field(default_factory=list)
    """The documented fold-ins applied (kinds from :data:`FOLD_INS`)."""
    split_turns: int = 0
    """Turns trained as samples of their own (the template renders history differently)."""
    fallback: bool = False
    """A turn was located by its content (neither derivation applied)."""
    no_stop: int = 0
    """Trained turns left without a stop token (``--missing-stop allow``)."""
    appended: int = 0
    """Trained turns after which the appended stop token was inserted."""
    refusal: str | None = None
    """Why the record cannot be trained (one line naming the record), or None."""
    reason: str | None = None
    """The refusal's kind, one of :data:`REFUSALS`."""


@dataclass
class EncodedRecord:
    """One record tokenized: a sample per :class:`RenderedSample` of its :class:`RenderedRecord`."""

    samples: list[EncodedSample]
    render: RenderedRecord
