"""Chat-template rendering with exact label masks (invariant C2; README, "Pack").

- ``renderer``: :class:`Renderer` — a record through its template, the trained spans of every
  turn (by construction from generation-prompt prefixes, or one render with our own
  ``{% generation %}`` blocks), samples of their own for turns history renders differently;
- ``probe``: what a template renders natively (system, tool role, tool calls, schemas, reasoning);
- ``foldins``: what a template cannot render natively is folded in, documented and counted;
- ``coverage``: after rendering, everything the record holds is in the text, or it is refused;
- ``stops``: the stop set, where each reply ends, the stop appended where the template has none;
- ``control``: control tokens come only from the template (refused, split or kept in text);
- ``samples``: what rendering gives (samples, spans, ids and masks, refusals);
- ``masks``: trained character spans -> trained tokens of the sample's one tokenization.
"""

from __future__ import annotations

from sftdata.render.control import SPECIAL_TEXT, ControlTokens, SpecialText, find_control
from sftdata.render.foldins import FOLD_INS, TOOL_RESULT_HEADER
from sftdata.render.masks import mask_from_offsets
from sftdata.render.renderer import TRAIN_ON, Renderer, TrainOn
from sftdata.render.samples import (
    REFUSALS,
    EncodedRecord,
    EncodedSample,
    RenderedRecord,
    RenderedSample,
)
from sftdata.render.stops import MISSING_STOP, MissingStop, Stop

__all__ = [
    "FOLD_INS",
    "MISSING_STOP",
    "REFUSALS",
    "SPECIAL_TEXT",
    "TOOL_RESULT_HEADER",
    "TRAIN_ON",
    "ControlTokens",
    "EncodedRecord",
    "EncodedSample",
    "MissingStop",
    "RenderedRecord",
    "RenderedSample",
    "Renderer",
    "SpecialText",
    "Stop",
    "TrainOn",
    "find_control",
    "mask_from_offsets",
]
