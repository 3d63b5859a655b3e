"""Capability probing (``sftdata.render.probe``) against template stand-ins written as plain
functions: each renders exactly the fields it claims, so the expected Caps are known up front."""

from __future__ import annotations

import json
from typing import Any

from sftdata.render.foldins import Caps
from sftdata.render.probe import PROBE, probe_caps


def _plain(msgs: list[dict[str, Any]], tools: Any = None) -> str:
    """Renders user and assistant contents only; system, tools, calls and reasoning vanish."""
    return "".join(m["content"] for m in msgs if m["role"] in ("user", "assistant"))


def _everything(msgs: list[dict[str, Any]], tools: Any = None) -> str:
    out = [json.dumps(tools or [])]
    for m in msgs:
        out.append(m["content"])
        out.append(m.get("reasoning_content", ""))
        for c in m.get("tool_calls") or []:
            args = c["function"]["arguments"]
            out.append(c["function"]["name"] + " " + json.dumps(dict(args)))  # needs a mapping
    return "\n".join(out)


def _string_args(msgs: list[dict[str, Any]], tools: Any = None) -> str | Exception:
    """Like a template that writes arguments as they come and refuses anything but a string."""
    out = []
    for m in msgs:
        out.append(m["content"])
        for c in m.get("tool_calls") or []:
            args = c["function"]["arguments"]
            if not isinstance(args, str):
                return TypeError("arguments must be a string")
            out.append(args)
    return "\n".join(out)


def test_a_template_that_renders_only_the_exchange_has_no_capabilities() -> None:
    assert probe_caps(_plain) == Caps(
        system=False, tool_role=False, tool_calls=False, tools=False, reasoning=False,
        args_as_string=False,
    )  # fmt: skip


def test_a_template_that_renders_every_field_has_every_capability() -> None:
    assert probe_caps(_everything) == Caps(
        system=True, tool_role=True, tool_calls=True, tools=True, reasoning=True,
        args_as_string=False,
    )  # fmt: skip


def test_arguments_accepted_only_as_a_json_string_are_detected() -> None:
    caps = probe_caps(_string_args)
    assert caps.tool_calls and caps.args_as_string
    assert caps.system and caps.tool_role  # it writes every message's content


def test_a_template_that_raises_lacks_the_capability_instead_of_failing() -> None:
    def no_tools(msgs: list[dict[str, Any]], tools: Any = None) -> str | Exception:
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in msgs):
            return ValueError("no tools here")
        return _plain(msgs)

    caps = probe_caps(no_tools)
    assert not (caps.tool_calls or caps.tool_role or caps.tools)
    assert PROBE["user"] in no_tools([{"role": "user", "content": PROBE["user"]}])
