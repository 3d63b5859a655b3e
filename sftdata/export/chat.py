"""Canonical conversations -> the chat formats other tools read (``sftdata export``).

* ``sharegpt``: FastChat's JSON array ``[{id, conversations: [{from, value}]}]`` (what FastChat's
  ``train.py`` and LLaMA-Factory's ``formatting: sharegpt`` read), with LLaMA-Factory's
  ``function_call``/``observation`` turns and a ``tools`` JSON string where a record has tools.
* ``alpaca``: JSON array of ``{instruction, input, output, system?, history?}`` (stanford_alpaca,
  LLaMA-Factory ``formatting: alpaca``). Records Alpaca cannot express are refused with file:line.
* ``openai``: JSON lines of ``{messages, tools?}`` (OpenAI fine-tuning, TRL's ``messages``).

Every ``to_*`` function is pure: a Conversation in, a plain dict out; a record the format cannot
express raises ``ConversionError`` naming ``where`` (default: the record's raw source).
The MindRecord export of packed shards lives in :mod:`sftdata.export.mindrecord`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdata.atomic import atomic_file
from sftdata.conversation import THINK_CLOSE, THINK_OPEN, Conversation, Message, read_jsonl_numbered
from sftdata.errors import ConversionError
from sftdata.inputs import refuse_overwriting
from sftdata.jsonfile import loads_strict

CHAT_FORMATS = ("sharegpt", "alpaca", "openai")
"""Formats ``export_conversations`` writes from canonical JSONL."""

# FastChat/LLaMA-Factory ShareGPT role names ("from" values), LLaMA-Factory's defaults.
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
SHAREGPT_FUNCTION = "function_call"


@dataclass
class ExportReport:
    """What ``export_conversations`` did."""

    records_in: int = 0
    """Canonical records read."""
    records_out: int = 0
    """Records written."""
    output: str = ""
    """The file written."""
    format: str = ""
    """The output format."""
    notes: list[str] = field(default_factory=list)
    """Human-readable remarks (e.g. fields the format cannot carry)."""


def _call_parts(call: Any, where: str) -> tuple[str, Any]:
    """(name, arguments) of an OpenAI-style tool call ``{"function": {name, arguments}}`` or a flat one."""
    if not isinstance(call, dict):
        raise ConversionError(f"{where}: tool_calls entries must be objects")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ConversionError(f"{where}: tool call without a function name")
    return fn["name"], fn.get("arguments", {})


def _arguments_object(args: Any, where: str) -> Any:
    # OpenAI carries arguments as a JSON string; ShareGPT/LLaMA-Factory as a JSON object.
    if isinstance(args, str):
        try:
            return loads_strict(args)
        except ValueError:
            raise ConversionError(f"{where}: tool call arguments are not valid JSON") from None
    return args


def _dumps(obj: Any) -> str:
    # json.dumps defaults (", ", ": ") are what LLaMA-Factory's own data files use.
    return json.dumps(obj, ensure_ascii=False)


def _with_reasoning(m: Message) -> str:
    # ShareGPT and Alpaca have no reasoning field: LLaMA-Factory's reasoning data (and
    # DeepSeek-R1/Qwen3 outputs) carry it as a leading <think> block, which convert reads back.
    if not m.reasoning:
        return m.content
    return f"{THINK_OPEN}\n{m.reasoning}\n{THINK_CLOSE}\n\n{m.content}"


def _refuse_unpairable_results(conv: Conversation, fmt: str, where: str) -> None:
    """Formats without call ids pair results with calls by position: refuse any other order."""
    calls: list[Any] = []
    k = 0
    for i, m in enumerate(conv.messages):
        if m.role == "assistant":
            calls, k = list(m.tool_calls or []), 0
        elif m.role == "tool":
            expected = calls[k].get("id") if k < len(calls) else None
            if m.tool_call_id and expected is not None and expected != m.tool_call_id:
                raise ConversionError(
                    f"{where}: messages[{i}] answers call {m.tool_call_id!r}, not the call in its "
                    f"position ({expected!r}); {fmt} pairs results with calls by "
                    "position only, use --format openai"
                )
            k += 1


def _refuse_train_flags(conv: Conversation, fmt: str, where: str) -> None:
    for i, m in enumerate(conv.messages):
        if m.train is not None and m.train != (m.role == "assistant"):
            raise ConversionError(
                f"{where}: messages[{i}] has train={str(m.train).lower()}, which {fmt} "
                "cannot express (it trains every assistant turn); drop the flag or use --format openai"
            )


def to_sharegpt(conv: Conversation, *, where: str | None = None) -> dict[str, Any]:
    """FastChat/LLaMA-Factory ShareGPT record: ``{id, conversations: [{from, value}], tools?}``.

    An assistant turn with tool calls becomes a ``function_call`` turn whose value is the call
    ``{"name", "arguments"}`` as JSON (a JSON list for parallel calls, as LLaMA-Factory reads it);
    ``tool`` turns become ``observation``; a leading system message becomes the top-level
    ``system`` field; tools become a JSON string of bare function schemas. Raises ConversionError naming the record's source
    for what ShareGPT cannot express: an assistant turn with both text and tool calls, or
    non-default ``train`` flags.
    """
    where = where or str(conv.source)
    _refuse_train_flags(conv, "ShareGPT", where)
    _refuse_unpairable_results(conv, "ShareGPT", where)
    turns: list[dict[str, str]] = []
    msgs = list(conv.messages)
    system = None
    if msgs and msgs[0].role == "system":
        # A top-level "system" (LLaMA-Factory's system column) rather than a system turn:
        # FastChat's train.py maps only human/gpt turns and fails on any other "from".
        system = msgs.pop(0).content
    offset = 0 if system is None else 1
    for i, m in enumerate(msgs, start=offset):
        at = f"{where}: messages[{i}]"
        if m.role == "assistant" and m.tool_calls:
            if m.content.strip() or m.reasoning:
                raise ConversionError(
                    f"{at}: an assistant turn with both text and tool calls (or reasoning and tool calls) has "
                    "no ShareGPT form; use --format openai"
                )
            calls = [
                {"name": name, "arguments": _arguments_object(args, at)}
                for name, args in (_call_parts(c, at) for c in m.tool_calls)
            ]
            value = _dumps(calls[0] if len(calls) == 1 else calls)
            turns.append({"from": SHAREGPT_FUNCTION, "value": value})
        else:
            turns.append({"from": SHAREGPT_ROLE[m.role], "value": _with_reasoning(m)})
    out: dict[str, Any] = {"id": conv.id, "conversations": turns}
    if system is not None:
        out["system"] = system
    if conv.tools is not None:
        # LLaMA-Factory stores bare function schemas as a JSON string (its Glaive data).
        out["tools"] = _dumps([_bare_tool(t) for t in conv.tools])
    return out


def _bare_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if set(tool) == {"type", "function"} and tool["type"] == "function":
        return tool["function"]
    return tool


def to_alpaca(conv: Conversation, *, where: str | None = None) -> dict[str, Any]:
    """Alpaca record ``{instruction, input, output, system?, history?}``.

    The last user turn becomes ``instruction`` (``input`` is empty: the canonical record no longer
    knows where instruction ended and input began), earlier user/assistant pairs become
    ``history``. Raises ConversionError naming the record's source for anything else: tool turns,
    tool calls, tools, a system turn that is not first, turns that do not alternate
    user/assistant, a last turn that is not the assistant's, non-default ``train`` flags.
    """
    where = where or str(conv.source)
    _refuse_train_flags(conv, "Alpaca", where)
    if conv.tools:
        raise ConversionError(f"{where}: records with tools have no Alpaca form; use sharegpt")
    msgs: list[Message] = list(conv.messages)
    system = None
    if msgs and msgs[0].role == "system":
        system = msgs.pop(0).content
    for i, m in enumerate(msgs):
        if m.role in ("tool", "system") or m.tool_calls:
            what = "tool calls" if m.tool_calls else f"a {m.role} turn"
            raise ConversionError(
                f"{where}: {what} at messages[{i + (system is not None)}] has no Alpaca form; "
                "use sharegpt or openai"
            )
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise ConversionError(
                f"{where}: messages[{i + (system is not None)}] is {m.role!r} where Alpaca needs "
                f"{expected!r} (turns must alternate user/assistant)"
            )
    if len(msgs) < 2 or len(msgs) % 2:
        raise ConversionError(
            f"{where}: Alpaca needs user/assistant pairs ending with the assistant"
        )
    out: dict[str, Any] = {
        "instruction": msgs[-2].content,
        "input": "",
        "output": _with_reasoning(msgs[-1]),
    }
    if system is not None:
        out["system"] = system
    if len(msgs) > 2:
        out["history"] = [
            [msgs[j].content, _with_reasoning(msgs[j + 1])] for j in range(0, len(msgs) - 2, 2)
        ]
    return out


def to_openai(conv: Conversation, *, where: str | None = None) -> dict[str, Any]:
    """OpenAI fine-tuning record ``{messages: [{role, content, tool_calls?, weight?}], tools?}``.

    Tool calls are written as OpenAI has them (``{id?, type: "function", function: {name,
    arguments}}`` with ``arguments`` a JSON string); tool results keep ``tool_call_id``;
    and ``name``; reasoning is ``reasoning_content`` (the field of DeepSeek's and Qwen's
    OpenAI-compatible APIs, which ``convert`` reads back). An assistant ``train`` flag becomes OpenAI's
    per-message ``weight`` (0/1); a ``train`` flag on another role cannot be expressed and raises
    ConversionError naming the record's source.
    """
    where = where or str(conv.source)
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(conv.messages):
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.reasoning:
            d["reasoning_content"] = m.reasoning
        if m.tool_calls is not None:
            d["tool_calls"] = [_openai_call(c, f"{where}: messages[{i}]") for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        if m.train is not None:
            if m.role == "assistant":
                d["weight"] = int(m.train)
            elif m.train:
                raise ConversionError(
                    f"{where}: messages[{i}] is a {m.role} turn with train=true, which the "
                    "OpenAI format cannot express (only assistant turns carry a weight)"
                )
        messages.append(d)
    out: dict[str, Any] = {"messages": messages}
    if conv.tools is not None:
        out["tools"] = conv.tools
    return out


def _openai_call(call: Any, where: str) -> dict[str, Any]:
    name, args = _call_parts(call, where)
    out: dict[str, Any] = {}
    if isinstance(call, dict) and call.get("id"):
        out["id"] = call["id"]
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {**out, "type": "function", "function": {"name": name, "arguments": arguments}}


CONVERTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "sharegpt": to_sharegpt,
    "alpaca": to_alpaca,
    "openai": to_openai,
}


def write_records(records: Iterable[dict[str, Any]], f: Any, *, json_lines: bool) -> int:
    """Stream ``records`` to the open text file ``f`` as a JSON array or as JSON lines; return the count."""
    n = 0
    if not json_lines:
        f.write("[")
    for rec in records:
        text = json.dumps(rec, ensure_ascii=False, indent=None if json_lines else 2)
        if json_lines:
            f.write(text + "\n")
        else:
            f.write(("\n" if n == 0 else ",\n") + text)
        n += 1
    if not json_lines:
        f.write("\n]\n")
    return n


def export_conversations(input_path: str | Path, output: str | Path, *, fmt: str) -> ExportReport:
    """Write canonical JSONL ``input_path`` as ``fmt`` (one of CHAT_FORMATS) to ``output``, atomically.

    ``sharegpt`` and ``alpaca`` are JSON arrays (what FastChat and LLaMA-Factory ``json.load``),
    ``openai`` is JSON lines. Streams: memory does not grow with the input size.

    Raises:
        ConversionError: naming ``file:line`` of the first record the format cannot express;
            no output file is left behind.
    """
    if fmt not in CONVERTERS:
        raise ConversionError(f"--format {fmt!r} is not one of {(*CHAT_FORMATS, 'mindrecord')}")
    convert = CONVERTERS[fmt]
    refuse_overwriting([input_path], output)
    report = ExportReport(output=str(output), format=fmt)

    def records() -> Iterable[dict[str, Any]]:
        for lineno, conv in read_jsonl_numbered(input_path):
            report.records_in += 1
            yield convert(conv, where=f"{input_path}:{lineno} (raw record {conv.source})")

    with contextlib.suppress(OSError):  # a parent that cannot be made: atomic_file names it
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as f:
        report.records_out = write_records(records(), f, json_lines=fmt == "openai")
    return report
