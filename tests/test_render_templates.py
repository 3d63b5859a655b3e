"""C2 on the chat templates real models ship: every template trl ships as a data file, rendered by
sftdata and by the independent oracle in ``chat_oracle`` (transformers' ``apply_chat_template``
prefix renders), on hand-written edge cases and on the real data in ../shared/data, with the real
Llama-2 tokenizer plus each family's special tokens."""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chat_oracle import (
    expected_samples,
    family_of,
    family_tokenizer,
    rendered_texts,
    stop_strings,
    token_mask,
)
from chat_oracle import trl_templates as _trl_templates
from test_render_real import FILES

from sftdata.conversation import Conversation, Message, Source
from sftdata.render import Renderer
from sftdata.sources import read_conversations
from sftdata.templates import bounds
from sftdata.tokenizer import load_snapshot, load_tokenizer

pytest.importorskip("trl", reason="the test extra installs trl (its chat templates are data)")

TEMPLATES = _trl_templates()
PER_FILE = 3  # records per real file and template (62 templates x 9 files): bounded CI time
HEADROOM = 20
"""The real templates render every record here within 1/HEADROOM of the work bound
(sftdata.templates.bounds): the tests run with the bound lowered that much, and a record the
bound stopped would fail check_refusal (transformers renders it)."""

U, A, S, T = "user", "assistant", "system", "tool"


def _call(name: str, args: dict[str, Any], cid: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if cid:
        call["id"] = cid
    return call


WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def _conv(cid: str, *messages: Message, tools: Any = None) -> Conversation:
    return Conversation(cid, list(messages), Source("edge.jsonl", line=1), tools=tools)


EDGE = [
    _conv(
        "system", Message(S, "You are terse."), Message(U, "Name a colour."), Message(A, "Blue.")
    ),
    _conv(
        "multi",
        Message(U, "Hi"),
        Message(A, "Hello!"),
        Message(U, "How are you?"),
        Message(A, "Fine, thanks."),
        Message(U, "Bye"),
        Message(A, "Goodbye."),
    ),
    _conv(
        "short", Message(U, "Say a"), Message(A, "a"), Message(U, "Role?"), Message(A, "assistant")
    ),
    _conv("think_word", Message(U, "One word"), Message(A, "think")),
    _conv("newline", Message(U, "Start with a newline"), Message(A, "\nStarted.")),
    _conv("cjk", Message(U, "天空为什么是蓝色的？"), Message(A, "因为瑞利散射。")),
    _conv("reason_last", Message(U, "2+2?"), Message(A, "4", reasoning="Add two and two.")),
    _conv(
        "reason_history",
        Message(U, "2+2?"),
        Message(A, "4", reasoning="Add two and two."),
        Message(U, "And 3+3?"),
        Message(A, "6", reasoning="Add three and three."),
    ),
    _conv(
        "tool_single",
        Message(U, "Weather in Paris?"),
        Message(A, "", tool_calls=[_call("get_weather", {"city": "Paris"}, "call_a1")]),
        Message(T, '{"temp_c": 21}', tool_call_id="call_a1", name="get_weather"),
        Message(A, "It is 21 °C in Paris."),
        tools=WEATHER,
    ),
    _conv(
        "tool_with_text",
        Message(U, "Weather in Oslo?"),
        Message(A, "Let me check.", tool_calls=[_call("get_weather", {"city": "Oslo"})]),
        Message(T, '{"temp_c": 3}'),
        Message(A, "3 °C."),
        tools=WEATHER,
    ),
    _conv(
        "tool_parallel",
        Message(S, "Use tools."),
        Message(U, "Oslo and Rome?"),
        Message(
            A,
            "",
            tool_calls=[
                _call("get_weather", {"city": "Oslo"}, "call_o1"),
                _call("get_weather", {"city": "Rome"}, "call_r1"),
            ],
        ),
        Message(T, '{"temp_c": 3}', tool_call_id="call_o1"),
        Message(T, '{"temp_c": 21}', tool_call_id="call_r1"),
        Message(A, "Oslo 3 °C, Rome 21 °C."),
        tools=WEATHER,
    ),
]


@cache
def _base_tokenizer(folder: str) -> Any:
    return load_tokenizer(folder)


@cache
def _model_folder(name: str, root: str, llama2: str) -> Path:
    return family_tokenizer(
        _base_tokenizer(llama2), Path(root) / name, TEMPLATES[name], family_of(name)
    )


@cache
def _tokenizers(name: str, root: str, llama2: str) -> tuple[Any, Any, list[str]]:
    folder = _model_folder(name, root, llama2)
    hf = load_tokenizer(folder)
    return hf, load_snapshot(folder), stop_strings(hf, folder)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("families"))


def _trained(r: Renderer, conv: Conversation, origin: list[int | None]) -> list[bool]:
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    out = []
    for o in origin:
        m = None if o is None else conv.messages[o]
        if m is None or m.role != "assistant":
            out.append(False)
        elif m.train is not None:
            out.append(m.train)
        else:
            out.append(r.train_on == "all-assistant" or o == last)
    return out


def check_record(r: Renderer, hf: Any, stops: list[str], conv: Conversation, enc: Any) -> None:
    """The record's samples are exactly the oracle's: same ids, same trained tokens."""
    where = f"{r.name} {conv.source} {conv.id}"
    assert enc.render.refusal is None, enc.render.refusal
    msgs, tools, origin, _ = r.template_messages(conv)
    want, located = expected_samples(hf, msgs, tools, _trained(r, conv, origin), stops)
    assert enc.render.fallback == located, where
    assert len(enc.samples) == len(want), (where, len(enc.samples), len(want))
    for got, (text, spans) in zip(enc.samples, want, strict=True):
        ids, mask = token_mask(hf, text, spans)
        assert got.input_ids.tolist() == ids, where
        if not np.array_equal(got.train_mask, mask):
            diff = [hf.decode(ids[k]) for k in np.flatnonzero(got.train_mask != mask)]
            raise AssertionError(f"{where}: masks differ at tokens {diff[:8]}")
    assert sum(int(s.train_mask.sum()) for s in enc.samples) > 0, where


def check_refusal(r: Renderer, hf: Any, conv: Conversation, enc: Any) -> None:
    """A refusal is one line naming the record, and is justified: the template raises on the
    record, or (checked with transformers' own renders) leaves part of it out."""
    msg = enc.render.refusal
    assert msg.startswith(f"{conv.source}: template {r.name}: record {conv.id!r}: "), msg
    assert "\n" not in msg
    msgs, tools, _, _ = r.template_messages(conv)
    if enc.render.reason == "template_error":
        with pytest.raises(Exception):  # noqa: B017 - whatever the template raises
            rendered_texts(hf, msgs, tools)
        return
    assert enc.render.reason == "not_rendered", msg
    texts = rendered_texts(hf, msgs, tools)
    parts = [m.content for m in conv.messages] + [m.reasoning or "" for m in conv.messages]
    assert any(p.strip() and not any(p.strip() in t for t in texts) for p in parts), msg


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_trl_templates_on_edge_cases(
    name: str, model_root: str, llama2_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bounds, "MAX_STEPS", bounds.MAX_STEPS // HEADROOM)
    hf, snap, stops = _tokenizers(name, model_root, str(llama2_tokenizer_dir))
    r = Renderer(snap, template="auto")
    assert set(stops) <= set(r.stop_tokens), (stops, r.stop_tokens)
    for conv, enc in zip(EDGE, r.encode_batch(EDGE, skip_invalid=True), strict=True):
        if enc.render.refusal is not None:
            check_refusal(r, hf, conv, enc)
        else:
            check_record(r, hf, stops, conv, enc)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_trl_templates_on_real_data(
    name: str,
    model_root: str,
    llama2_tokenizer_dir: Path,
    shared_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bounds, "MAX_STEPS", bounds.MAX_STEPS // HEADROOM)
    hf, snap, stops = _tokenizers(name, model_root, str(llama2_tokenizer_dir))
    r = Renderer(snap, template="auto")
    convs = [
        c
        for f, opts in FILES.items()
        for c in itertools.islice(read_conversations(shared_data / f, **opts), PER_FILE)
    ]
    encs = r.encode_batch(convs, skip_invalid=True)
    refused = [e.render.refusal for e in encs if e.render.refusal is not None]
    assert len(refused) < len(convs) / 2, refused[:3]
    for conv, enc in zip(convs, encs, strict=True):
        if enc.render.refusal is not None:
            check_refusal(r, hf, conv, enc)
        else:
            check_record(r, hf, stops, conv, enc)


@pytest.mark.parametrize(
    ("name", "beyond_c2"),
    [
        # the layout newline after <|im_end|> (and before the reply) is inside the block
        ("qwen2_5_training", "\n"),
        # the block opens with the header <|start|>assistant, which the generation prompt holds
        ("gptoss_training", "<|start|>"),
    ],
)
def test_generation_blocks_train_more_than_c2(
    name: str, beyond_c2: str, model_root: str, llama2_tokenizer_dir: Path
) -> None:
    """Why masks are not taken from ``{% generation %}`` blocks: on trl's training templates the
    blocks (transformers' return_assistant_tokens_mask) also cover tokens the model never
    generates; sftdata's mask is C2's own definition (the prefix renders)."""
    hf, snap, stops = _tokenizers(name, model_root, str(llama2_tokenizer_dir))
    conv = EDGE[1]  # multi-turn
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
    out = hf.apply_chat_template(
        msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    blocks = np.asarray(out["assistant_masks"], dtype=bool)
    r = Renderer(snap, template="auto")
    ours = r.encode(conv).samples[0]
    assert ours.input_ids.tolist() == list(out["input_ids"])
    extra = [hf.decode([t]) for t in ours.input_ids[blocks & ~ours.train_mask].tolist()]
    assert any(beyond_c2 in t for t in extra), extra
    check_record(r, hf, stops, conv, r.encode(conv))
