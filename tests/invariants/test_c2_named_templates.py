"""The named built-in templates (``--template qwen2.5`` ...) render exactly like each family's
official template and train exactly what C2 says.

The official templates are read from installed packages at test time, never from the project:
``trl``'s shipped chat templates for most families, ``mistral-common`` (Mistral's own reference
encoder) for Mistral. Phi-4 has no installed reference; it is checked against its published layout
written out below. For each record (hand-written edge cases and real data), every prefix of the
messages the template sees is rendered with and without the generation prompt by both, and the
record's samples and masks are checked with the independent oracle of ``chat_oracle`` on the
official template.
"""

from __future__ import annotations

import itertools
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from sftdata.audit.oracle import (
    _render,
)
from sftdata.conversation import Conversation, Message, Source
from sftdata.errors import TemplateError
from sftdata.render import Renderer
from sftdata.sources import read_conversations
from sftdata.templates import BUILTIN_TEMPLATES, LLAMAFACTORY_NAMES, load_template
from sftdata.tokenizer import load_tokenizer
from sftdata.tokenizer_cache import load_snapshot
from tests.chat_oracle import (
    EDGE,
    FILES,
    check_record,
    check_refusal,
    family_of,
    family_tokenizer,
)
from tests.chat_oracle import trl_templates as _trl_templates

pytest.importorskip("trl", reason="the test extra installs trl (its chat templates are data)")

PER_FILE = 4  # records per real file: every prefix is rendered twice by both templates

# named template -> the official one it must equal (a trl file stem)
OFFICIAL = {
    "qwen2.5": "qwen2_5",
    "qwen3": "qwen3",
    "llama3": "llama3",
    "gemma": "gemma",
    "gemma3": "gemma3",
    "phi3": "phi3_5",
    "deepseek3": "deepseekv3",
    "glm4": "glm4moe",
    "gpt-oss": "gptoss",
    "cohere": "cohere",
}
# Family specials for the two without a trl template: bos, eos, generation eos, extra specials.
MISTRAL = (
    "<s>",
    "</s>",
    ["</s>"],
    [
        "[INST]",
        "[/INST]",
        "[TOOL_CALLS]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
    ],
)
PHI4 = (None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"], ["<|im_start|>", "<|im_sep|>"])


def _own(name: str) -> str:
    from sftdata.templates import TEMPLATES_DIR

    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def _two_tool_rounds(conv: Conversation) -> bool:
    return sum(1 for m in conv.messages if m.tool_calls) > 1


# DeepSeek-V3's official template never resets its "first tool call" and "first tool output"
# flags, so a second tool-calling turn loses its <｜Assistant｜> and <｜tool▁calls▁begin｜>
# markers (and a second round of results its <｜tool▁outputs▁begin｜>). Ours writes them for every
# turn; such records are compared in test_deepseek3_writes_every_tool_round instead.
SKIP = {"deepseek3": _two_tool_rounds}


@cache
def _base(llama2: str) -> Any:
    return load_tokenizer(llama2)


@cache
def _folder(official: str, root: str, llama2: str) -> tuple[Any, Any, list[str]]:
    from sftdata.audit.oracle import stop_strings

    folder = family_tokenizer(
        _base(llama2), Path(root) / official, _trl_templates()[official], family_of(official)
    )
    hf = load_tokenizer(folder)
    return hf, load_snapshot(folder), stop_strings(hf, folder)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("named"))


def _records(shared_data: Path) -> list[Conversation]:
    return list(EDGE) + [
        c
        for f, opts in FILES.items()
        for c in itertools.islice(read_conversations(shared_data / f, **opts), PER_FILE)
    ]


def _renders(render: Any, msgs: list[dict[str, Any]], tools: Any) -> list[str]:
    """Every prefix, without and with the generation prompt ("RAISES" where it raises)."""
    out = []
    for k in range(1, len(msgs) + 1):
        for gen in (False, True):
            try:
                out.append(render(msgs[:k], tools, gen))
            except Exception:
                out.append("RAISES")
    return out


def test_named_templates_are_the_listed_families() -> None:
    want = {"chatml", "llama2", "alpaca", "mistral", "phi4", *OFFICIAL}
    assert set(BUILTIN_TEMPLATES) == want


@pytest.mark.parametrize("named", sorted(OFFICIAL))
def test_named_template_renders_like_the_official_one(
    named: str, root: str, llama2_tokenizer_dir: Path, shared_data: Path
) -> None:
    hf, snap, stops = _folder(OFFICIAL[named], root, str(llama2_tokenizer_dir))
    ours = Renderer(snap, template=named)
    official = Renderer(snap, template="auto")
    assert ours.caps == official.caps
    skip = SKIP.get(named, lambda c: False)
    convs = [c for c in _records(shared_data) if not skip(c)]
    compared = 0
    for conv, enc in zip(convs, ours.encode_batch(convs, skip_invalid=True), strict=True):
        msgs, tools, _, _ = ours.template_messages(conv)
        assert official.template_messages(conv)[:2] == (msgs, tools)
        want = _renders(lambda m, t, g: _render(hf, m, t, g), msgs, tools)
        assert _renders(ours._backend.render, msgs, tools) == want, (named, conv.id)
        if enc.render.refusal is not None:
            check_refusal(ours, hf, conv, enc)
        else:
            check_record(ours, hf, stops, conv, enc)
            compared += 1
    assert compared >= len(convs) / 2


SCHEMA_SHAPES = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the catalogue",
            "parameters": {
                "type": "object",
                "required": ["q"],
                "properties": {
                    "q": {"type": "string", "description": "what to look for"},
                    "n": {"type": "integer", "default": 10},
                    "mode": {"type": "string", "enum": ["fast", "slow"], "default": "fast"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "points": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                            "required": ["x"],
                        },
                    },
                    "maybe": {"type": "string", "nullable": True},
                    "either": {"type": ["string", "number"]},
                    "one": {
                        "oneOf": [
                            {"type": "string", "description": "as text"},
                            {"type": "number", "default": 3},
                        ]
                    },
                    "flags": {"type": "object", "properties": {"on": {"type": "boolean"}}},
                    "anything": {},
                    "list": {"type": "array"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "now",
            "description": "The time",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]


@pytest.mark.parametrize("named", ["qwen2.5", "qwen3", "glm4", "gpt-oss"])
def test_named_template_writes_tool_schemas_like_the_official_one(
    named: str, root: str, llama2_tokenizer_dir: Path, shared_data: Path
) -> None:
    """Every tool set of the Glaive file and schema shapes it lacks (enums, defaults, nested
    objects, unions, nullable, untyped), with and without a system prompt."""
    hf, snap, _ = _folder(OFFICIAL[named], root, str(llama2_tokenizer_dir))
    ours = Renderer(snap, template=named)
    glaive = shared_data / "glaive_toolcall_en_demo.json"
    tool_sets = [c.tools for c in read_conversations(glaive) if c.tools] + [SCHEMA_SHAPES]
    assert len(tool_sets) > 100
    s, u, a = (
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    )
    for tools in tool_sets:
        for msgs in ([s, u, a], [u, a]):
            assert ours._backend.render(msgs, tools, False) == _render(hf, msgs, tools, False)
            assert ours._backend.render(msgs[:-1], tools, True) == _render(
                hf, msgs[:-1], tools, True
            )


def test_deepseek3_writes_every_tool_round(
    root: str, llama2_tokenizer_dir: Path, shared_data: Path
) -> None:
    """Where the official DeepSeek-V3 template drops the markers of a second tool round (see
    SKIP), ours writes them, and the C2 oracle (on our template) holds."""
    _, snap, _ = _folder("deepseekv3", root, str(llama2_tokenizer_dir))
    r = Renderer(snap, template="deepseek3")
    glaive = shared_data / "glaive_toolcall_en_demo.json"
    convs = [c for c in read_conversations(glaive) if _two_tool_rounds(c)][:5]
    assert convs
    for conv in convs:
        msgs, tools, _, _ = r.template_messages(conv)
        text = r._backend.render(msgs, tools, False)
        rounds = sum(1 for m in msgs if m.get("tool_calls"))
        assert text.count("<｜Assistant｜><｜tool▁calls▁begin｜>") == rounds
        results = [i for i, m in enumerate(msgs) if m["role"] == "tool"]
        starts = sum(1 for i in results if i == 0 or msgs[i - 1]["role"] != "tool")
        assert text.count("<｜tool▁outputs▁begin｜>") == starts


# -- Mistral: mistral-common, Mistral's reference encoder ----------------------------------------

BYTES_RE = re.compile(r"(?:<0x[0-9A-F]{2}>)+")


def _plain(pieces: str) -> str:
    """mistral-common's token-piece text as plain text (``▁`` spaces, ``<0xNN>`` bytes)."""
    text = BYTES_RE.sub(
        lambda m: bytes(int(h, 16) for h in re.findall(r"<0x([0-9A-F]{2})>", m.group(0))).decode(
            "utf-8", "replace"
        ),
        pieces,
    )
    return text.replace("▁", " ")


def _mistral_common(msgs: list[dict[str, Any]], tools: Any, finetuning: bool) -> str:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    def one(m: dict[str, Any]) -> Any:
        if m["role"] == "system":
            return SystemMessage(content=m["content"])
        if m["role"] == "user":
            return UserMessage(content=m["content"])
        if m["role"] == "tool":
            return ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"])
        calls = [
            ToolCall(
                id=c["id"],
                function=FunctionCall(
                    name=c["function"]["name"], arguments=json.dumps(c["function"]["arguments"])
                ),
            )
            for c in m.get("tool_calls") or []
        ]
        return AssistantMessage(content=m["content"] or None, tool_calls=calls or None)

    tok = MistralTokenizer.v3()
    tok._chat_completion_request_validator._mode = (
        ValidationMode.finetuning if finetuning else ValidationMode.test
    )
    request = ChatCompletionRequest(
        messages=[one(m) for m in msgs],
        tools=[Tool(function=Function(**t["function"])) for t in tools] if tools else None,
    )
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    ids = tok.encode_chat_completion(request).tokens
    return _plain(tok.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP))


def _mistral_records(shared_data: Path) -> list[Conversation]:
    def conv(cid: str, *messages: Message, tools: Any = None) -> Conversation:
        return Conversation(cid, list(messages), Source("mistral.jsonl", line=1), tools=tools)

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    weather = EDGE[-1].tools
    glaive = shared_data / "glaive_toolcall_en_demo.json"
    return [
        *[c for c in EDGE if not any(m.tool_calls or m.role == "tool" for m in c.messages)],
        conv(
            "tools",
            Message("system", "Use tools."),
            Message("user", "Weather in Oslo?"),
            Message("assistant", "", tool_calls=[{**call, "id": "abcdefghi"}]),
            Message("tool", '{"temp_c": 3}', tool_call_id="abcdefghi"),
            Message("assistant", "3 °C."),
            tools=weather,
        ),
        *itertools.islice(read_conversations(glaive), 6),
        *itertools.islice(read_conversations(shared_data / "sharegpt_dummy_conversation.json"), 6),
    ]


def test_mistral_renders_like_mistral_common(
    root: str, llama2_tokenizer_dir: Path, shared_data: Path
) -> None:
    pytest.importorskip("mistral_common", reason="the test extra installs mistral-common")
    from sftdata.audit.oracle import stop_strings

    folder = family_tokenizer(
        _base(str(llama2_tokenizer_dir)), Path(root) / "mistral", _own("mistral"), MISTRAL
    )
    hf = load_tokenizer(folder)
    stops = stop_strings(hf, folder)
    r = Renderer(load_snapshot(folder), template="mistral")
    checked = 0
    for conv in _mistral_records(shared_data):
        msgs, tools, _, _ = r.template_messages(conv)
        for k, m in enumerate(msgs, start=1):
            if m["role"] == "assistant":  # mistral-common encodes a finished turn ...
                assert r._backend.render(msgs[:k], tools, False) == _mistral_common(
                    msgs[:k], tools, finetuning=True
                ), conv.id
                checked += 1
            elif m["role"] in ("user", "tool"):  # ... or a prompt
                assert r._backend.render(msgs[:k], tools, True) == _mistral_common(
                    msgs[:k], tools, finetuning=False
                ), conv.id
        # C2 by the oracle on transformers' renders of this same template
        check_record(r, hf, stops, conv, r.encode(conv))
    assert checked > 20


def test_phi4_has_its_published_layout(root: str, llama2_tokenizer_dir: Path) -> None:
    """No installed package ships Phi-4's template: its layout, written out by hand."""
    from sftdata.audit.oracle import stop_strings

    folder = family_tokenizer(
        _base(str(llama2_tokenizer_dir)), Path(root) / "phi4", _own("phi4"), PHI4
    )
    r = Renderer(load_snapshot(folder), template="phi4")
    hf = load_tokenizer(folder)
    for conv, enc in zip(EDGE, r.encode_batch(EDGE), strict=True):
        check_record(r, hf, stop_strings(hf, folder), conv, enc)
    conv = EDGE[0]  # system, user, assistant
    text, spans = r.render(conv)
    assert text == (
        "<|im_start|>system<|im_sep|>You are terse.<|im_end|>"
        "<|im_start|>user<|im_sep|>Name a colour.<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Blue.<|im_end|>"
    )
    assert [text[s:e] for s, e in spans] == ["Blue.<|im_end|>"]
    assert "<|im_end|>" in r.stop_tokens


@pytest.mark.parametrize("lf_name", sorted(LLAMAFACTORY_NAMES))
def test_llamafactory_names_select_the_same_template(lf_name: str) -> None:
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    name, text, _ = load_template(lf_name, None, specials=specials)
    target = LLAMAFACTORY_NAMES[lf_name]
    assert (name, text) == load_template(target, None, specials=specials)[:2]


def test_unknown_template_name_lists_the_choices() -> None:
    with pytest.raises(TemplateError, match=r"qwen2\.5.*LLaMA-Factory template name"):
        load_template("qwen9", None, specials={"bos_token": "", "eos_token": ""})


BLOCK_TEMPLATES = {  # built-ins whose {% generation %} blocks give the masks: their family
    "chatml": "qwen2-vocabulary",
    "llama2": None,
    "qwen2.5": "qwen2_5",
    "llama3": "llama3",
    "gemma": "gemma",
    "gemma3": "gemma3",
    "phi3": "phi3_5",
    "phi4": PHI4,
    "cohere": "cohere",
}


def test_the_templates_with_blocks_are_the_listed_ones() -> None:
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    have = {
        n for n in BUILTIN_TEMPLATES if load_template(n, None, specials=specials)[2].exact_blocks
    }
    assert have == set(BLOCK_TEMPLATES)


@pytest.mark.parametrize("named", sorted(BLOCK_TEMPLATES))
def test_generation_blocks_of_builtins_equal_the_prefix_derivation(
    named: str, root: str, llama2_tokenizer_dir: Path, shared_data: Path, shared_tokenizers: Path
) -> None:
    """One render with blocks gives exactly what the prefix renders (C2's definition) give:
    samples, ids, masks and counts, on the edge cases and real data, every train-on mode."""
    family = BLOCK_TEMPLATES[named]
    if family == "qwen2-vocabulary":  # the real Qwen2 vocabulary: ChatML's markers are its own
        snap = load_snapshot(shared_tokenizers / "qwen2")
    elif family is None:
        snap = _base(str(llama2_tokenizer_dir))
    elif isinstance(family, tuple):
        snap = load_snapshot(
            family_tokenizer(_base(str(llama2_tokenizer_dir)), Path(root) / named, "", family)
        )
    else:
        snap = _folder(family, root, str(llama2_tokenizer_dir))[1]
    convs = _records(shared_data)
    for train_on in ("all-assistant", "last-assistant", "everything"):
        fast = Renderer(snap, template=named, train_on=train_on)
        slow = Renderer(snap, template=named, train_on=train_on)
        assert fast._backend.exact_blocks
        slow._backend = _NoBlocks(slow._backend)
        for a, b in zip(
            fast.encode_batch(convs, skip_invalid=True),
            slow.encode_batch(convs, skip_invalid=True),
            strict=True,
        ):
            ra, rb = a.render, b.render
            assert (ra.refusal, ra.no_stop, ra.appended, ra.fallback, ra.split_turns) == (
                rb.refusal,
                rb.no_stop,
                rb.appended,
                rb.fallback,
                rb.split_turns,
            )
            assert [(s.text, s.spans) for s in ra.samples] == [
                (s.text, s.spans) for s in rb.samples
            ]


class _NoBlocks:
    """A built-in template with its blocks ignored: masks from prefix renders only."""

    exact_blocks = False

    def __init__(self, backend: Any) -> None:
        self._b = backend

    def render(self, *args: Any) -> str:
        return self._b.render(*args)
