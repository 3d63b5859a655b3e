"""What a chat template can render natively, learned once by rendering probe conversations:
a system role, a tool role, tool calls (arguments as a mapping or as a JSON string), tool schemas
and reasoning. What it cannot is folded in (``foldins``), never dropped.

The probe contents are plain ASCII words no real data holds, so a template renders them verbatim
and finding one in the output means the template rendered that field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sftdata.render.foldins import Caps

# Probe contents: plain ASCII so that templates render them verbatim.
PROBE = {
    "system": "Qzx7SystemProbe",
    "user": "Qzx7UserProbe",
    "assistant": "Qzx7AssistantProbe",
    "tool": "Qzx7ToolProbe",
    "fn": "qzx7_probe_fn",
    "arg": "qzx7arg",
    "tool_schema": "qzx7_probe_tool",
    "reasoning": "Qzx7ReasoningProbe",
}


def probe_caps(render: Callable[..., str | Exception]) -> Caps:
    """The template's capabilities; ``render(messages, tools)`` returns its text or the exception
    it raised (a probe the template fails on is a capability it lacks)."""
    p = PROBE
    u = {"role": "user", "content": p["user"]}
    a = {"role": "assistant", "content": p["assistant"]}

    def renders(needle: str, msgs: list[dict[str, Any]], tools: Any = None) -> bool:
        out = render(msgs, tools)
        return isinstance(out, str) and needle in out

    def call(args: Any) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "a1b2c3d4e",
                    "type": "function",
                    "function": {"name": p["fn"], "arguments": args},
                }
            ],
        }

    result = {
        "role": "tool",
        "content": p["tool"],
        "tool_call_id": "a1b2c3d4e",
        "name": p["fn"],
    }
    args = {p["arg"]: 1}
    args_as_string = False
    tool_calls = renders(p["arg"], [u, call(args)]) or renders(p["arg"], [u, call(args), result, a])
    if not tool_calls:
        as_string = json.dumps(args)
        if renders(p["arg"], [u, call(as_string)]) or renders(
            p["arg"], [u, call(as_string), result, a]
        ):
            tool_calls = args_as_string = True
    tool_call = call(json.dumps(args) if args_as_string else args)
    tool_role = renders(p["tool"], [u, tool_call, result, a]) if tool_calls else False
    if not tool_calls:
        tool_role = renders(p["tool"], [u, a, result, a])
    # A schema as tool-calling data carries it: templates that write the description or walk
    # the properties (gpt-oss) raise on a bare {"name": ...}.
    schema = {
        "type": "function",
        "function": {
            "name": p["tool_schema"],
            "description": "Probe",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    reasoning = {**a, "reasoning_content": p["reasoning"], "thinking": p["reasoning"]}
    return Caps(
        system=renders(p["system"], [{"role": "system", "content": p["system"]}, u, a]),
        tool_role=tool_role,
        tool_calls=tool_calls,
        tools=renders(p["tool_schema"], [u, a], [schema]),
        reasoning=renders(p["reasoning"], [u, reasoning]),
        args_as_string=args_as_string,
    )


__all__ = ["PROBE", "probe_caps"]
