"""Nothing dropped silently (``sftdata.render.coverage``): what of a record no sample holds."""

from __future__ import annotations

from sftdata.conversation import Conversation, Message, Source
from sftdata.render.coverage import not_rendered

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
SCHEMA = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


def _conv() -> Conversation:
    return Conversation(
        id="r1",
        messages=[
            Message("system", "Be brief."),
            Message("user", "Weather?"),
            Message("assistant", "", tool_calls=[CALL], reasoning="Look it up."),
            Message("tool", '{"t": 21}'),
            Message("assistant", "21 degrees."),
        ],
        source=Source(file="d.jsonl", line=3),
        tools=[SCHEMA],
    )


FULL = 'Be brief. Weather? Look it up. get_weather {"city": "Paris"} {"t": 21} 21 degrees.'


def test_a_complete_render_misses_nothing() -> None:
    assert not_rendered(_conv(), [FULL]) is None


def test_each_missing_field_is_named() -> None:
    conv = _conv()
    assert (
        not_rendered(conv, [FULL.replace("Be brief.", "")]) == "the content of message 0 (system)"
    )
    assert not_rendered(conv, [FULL.replace("Look it up.", "")]) == "the reasoning of message 2"
    assert (
        not_rendered(conv, [FULL.replace('"city"', "")]) == "tool call 0 of message 2 (get_weather)"
    )
    assert not_rendered(conv, [FULL.replace('{"t": 21}', "")]) == "the content of message 3 (tool)"


def test_a_tool_schema_nobody_renders_is_named() -> None:
    conv = _conv()
    conv.messages[2] = Message("assistant", "", reasoning="Look it up.")
    text = FULL.replace("get_weather", "")
    assert not_rendered(conv, [text]) == "tool schema 0 (get_weather)"


def test_split_samples_together_cover_the_record() -> None:
    half = len(FULL) // 2
    assert not_rendered(_conv(), [FULL[: half + 12], FULL[half - 12 :]]) is None
    assert not_rendered(_conv(), [FULL[:half]]) is not None
