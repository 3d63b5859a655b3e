"""Alpaca records: ``instruction``, ``input``, ``output``, optional ``system`` and ``history``.

Also the stanford_alpaca seed-task shape ``{id, name, instruction, instances: [{input, output}]}``
(one conversation per instance), and the rows of CSV/TSV/XLSX tables, which are Alpaca-like
once their headers are mapped. The prompt is ``instruction`` and ``input`` joined by a newline,
as LLaMA-Factory and stanford_alpaca do.
"""

from __future__ import annotations

from typing import Any

from sftdata.conversation import Conversation, Message, Source
from sftdata.errors import RecordError
from sftdata.sources.base import require_object, string_field, type_name


def matches(record: dict[str, Any]) -> str | None:
    """Why ``record`` looks like Alpaca, or None."""
    if "instruction" in record and "instances" in record:
        return 'first record has "instruction" and "instances" (stanford_alpaca seed task)'
    if "instruction" in record and "output" in record:
        return 'first record has "instruction" and "output"'
    if "instruction" in record and "conversations" not in record and "messages" not in record:
        return 'first record has "instruction"'
    return None


def _history(value: Any, where: str) -> list[Message]:
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise RecordError(
            f"{where}: 'history' must be a list of [question, answer] pairs, got {type_name(value)}",
            reason="wrong type",
        )
    out: list[Message] = []
    for i, pair in enumerate(value):
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(x, str) for x in pair)
        ):
            raise RecordError(
                f"{where}: history[{i}] must be a [question, answer] pair of strings",
                reason="wrong type",
            )
        out += [Message("user", pair[0]), Message("assistant", pair[1])]
    return out


def build(
    record: dict[str, Any],
    *,
    where: str,
    source: Source,
    rid: str,
    instruction_required: bool = True,
) -> Conversation:
    """One conversation from Alpaca fields (already mapped onto canonical names)."""
    instruction = string_field(record, "instruction", where, required=instruction_required) or ""
    inp = string_field(record, "input", where, required=False) or ""
    if "output" not in record or record["output"] is None:
        keys = ", ".join(map(str, record)) or "none"
        raise RecordError(
            f"{where}: record has no answer 'output' (keys: {keys}); map one with --map KEY=output",
            reason="missing answer",
        )
    output = record["output"]
    if not isinstance(output, str):
        raise RecordError(
            f"{where}: 'output' must be a string, got {type_name(output)}", reason="wrong type"
        )
    if not output.strip():
        raise RecordError(f"{where}: empty answer ('output' is blank)", reason="empty answer")
    prompt = "\n".join(p for p in (instruction, inp) if p.strip())
    if not prompt.strip():
        raise RecordError(
            f"{where}: empty question ('instruction' and 'input' are blank)",
            reason="empty question",
        )
    system = string_field(record, "system", where, required=False)
    messages: list[Message] = [Message("system", system)] if system and system.strip() else []
    messages += _history(record.get("history"), where)
    messages += [Message("user", prompt), Message("assistant", output)]
    return Conversation(id=rid, messages=messages, source=source)


def convert(value: Any, *, where: str, source: Source, rid: str) -> list[Conversation]:
    """Conversations from one raw Alpaca (or seed-task) record."""
    record = require_object(value, where)
    if "instances" in record and "output" not in record:
        instances = record["instances"]
        if not isinstance(instances, list) or not instances:
            raise RecordError(
                f"{where}: 'instances' must be a non-empty list of {{input, output}} objects",
                reason="wrong type",
            )
        out = []
        for k, inst in enumerate(instances):
            inst = require_object(inst, f"{where}: instances[{k}]")
            fields = {**{key: record[key] for key in ("instruction", "system") if key in record}}
            fields.update(inst)
            sub_id = rid if len(instances) == 1 else f"{rid}-{k}"
            out.append(build(fields, where=f"{where}: instances[{k}]", source=source, rid=sub_id))
        return out
    return [build(record, where=where, source=source, rid=rid)]
