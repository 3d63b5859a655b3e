"""The C2 oracle: the second renderer of ``sftdata.audit.oracle`` (transformers'
``apply_chat_template`` renders of conversation prefixes, written independently of
``sftdata.render``), with what the tests add around it.

Tokenizers for real families are built here from the Llama-2 SentencePiece model plus the family's
special tokens (``family_tokenizer``), and the real templates are read from the installed ``trl``
package (``trl_templates``); nothing is copied into the project.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sftdata.audit.oracle import (  # the second renderer, shared with `sftdata audit`
    PINNED,
    _render,
    appended_token,
    expected_samples,
    token_mask,
    trained_flags,
)
from sftdata.conversation import Conversation, Message, Source
from sftdata.render import EncodedSample, Renderer, mask_from_offsets
from sftdata.tokenizer import load_tokenizer

DATE = PINNED["date"]  # sftdata's default --template-date
U, A, S, T = "user", "assistant", "system", "tool"

# bos, eos, generation_config eos tokens, extra specials: as the real models of each family set
# them (tokenizer_config.json / generation_config.json of their Hub folders).
FAMILIES: dict[str, tuple[str | None, str, list[str], list[str]]] = {
    "cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ["<|END_OF_TURN_TOKEN|>"], []),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ["<｜end▁of▁sentence｜>"], []),
    "diffusion_gemma": ("<bos>", "<eos>", ["<eos>", "<turn|>"], []),
    "gemma4": ("<bos>", "<eos>", ["<eos>", "<turn|>"], []),
    "gemma": ("<bos>", "<eos>", ["<eos>", "<end_of_turn>"], []),
    "glm4": (
        None,
        "<|endoftext|>",
        ["<|endoftext|>", "<|user|>", "<|observation|>"],
        ["[gMASK]", "<sop>"],
    ),
    "gptoss": (
        "<|startoftext|>",
        "<|return|>",
        ["<|return|>", "<|endoftext|>", "<|call|>"],
        ["<|endoftext|>"],
    ),
    "idefics3": ("<|begin_of_text|>", "<end_of_utterance>", ["<end_of_utterance>"], []),
    "lfm2": ("<|startoftext|>", "<|im_end|>", ["<|im_end|>"], []),
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        ["<|end_of_text|>", "<|eom_id|>"],
    ),
    "llava": ("<s>", "</s>", ["</s>"], []),
    "muse": (None, "<|eot|>", ["<|eot|>", "<|eom|>"], []),
    "nemotron": ("<s>", "<|im_end|>", ["<|im_end|>"], []),
    "phi3": (
        "<s>",
        "<|endoftext|>",
        ["<|endoftext|>", "<|assistant|>", "<|end|>"],
        ["<|endoftext|>"],
    ),
    "qwen": (None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"], ["<|endoftext|>"]),
    "smolvlm": ("<|im_start|>", "<end_of_utterance>", ["<end_of_utterance>"], []),
}
SPECIAL_RE = re.compile(
    r"<\|[A-Za-z0-9_]+\|>|<｜[^｜]+｜>|<[a-z_]+_of_[a-z_]+>|<\|[a-z_]+>|<[a-z_]+\|>|"
    r"\[/?[A-Z_]+\]|</?think>|</?tool_call>|</?tool_response>"
)


def family_of(name: str) -> tuple[str | None, str, list[str], list[str]]:
    for prefix, spec in FAMILIES.items():
        if name.startswith(prefix):
            return spec
    raise KeyError(f"no tokenizer family for template {name}")


def trl_templates() -> dict[str, str]:
    """Every chat template trl ships as a data file, by file stem."""
    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.jinja"))}


def family_tokenizer(
    base: Any, folder: Path, template: str, family: tuple[str | None, str, list[str], list[str]]
) -> Path:
    """Save Llama-2 + the family's specials + ``template`` as a model folder; return it."""
    import copy

    bos, eos, gen_eos, extra = family
    tok = copy.deepcopy(base)
    specials = sorted(
        {*SPECIAL_RE.findall(template), *extra, eos, *gen_eos, *([bos] if bos else [])}
    )
    specials = [s for s in specials if s not in ("<s>", "</s>", "<unk>")]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token = bos
    tok.eos_token = eos
    tok.pad_token = eos
    tok.chat_template = template
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    ids = [tok.convert_tokens_to_ids(t) for t in gen_eos]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return folder


def rendered_texts(tok: Any, msgs: list[dict[str, Any]], tools: Any) -> list[str]:
    """The whole render and each render ending on an assistant turn (what training can see)."""
    out = [_render(tok, msgs, tools, False)]
    out += [
        _render(tok, msgs[: i + 1], tools, False)
        for i, m in enumerate(msgs)
        if m["role"] == "assistant"
    ]
    return out


@cache
def cached_tokenizer(spec: str) -> Any:
    """Load each tokenizer once per test session (tests never mutate them)."""
    return load_tokenizer(spec)


def assert_c2(
    renderer: Renderer, tok: Any, conv: Conversation, enc: EncodedSample, template: str
) -> None:
    """C2: the trained tokens are exactly the trained contents plus their end-of-turn tokens."""
    assert enc.render.refusal is None, enc.render.refusal
    assert len(enc.samples) == 1, "these templates render every turn as they do the last"
    enc = enc.samples[0]
    text, spans = renderer.render(conv)
    backend = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    assert enc.input_ids.dtype == np.int32 and enc.train_mask.dtype == np.bool_
    assert enc.input_ids.tolist() == backend.ids, "ids must be the one-shot encoding of the text"
    reference = mask_from_offsets(np.array(backend.offsets, dtype=np.int64).reshape(-1, 2), spans)
    assert np.array_equal(enc.train_mask, reference), "fast edge lookup must equal the overlap rule"
    runs = trained_runs(tok, enc)
    if renderer.train_on == "everything":
        if not any(m.train is False for m in conv.messages):
            assert [_norm(r) for r, _, _ in runs] == [_norm(text)], conv.source
        return
    want = expected_runs(renderer, tok, conv, template)
    where = f"{conv.source} {conv.id} {template}"
    # The character spans are exactly the contents plus end-of-turn strings.
    assert [_norm(text[s:e]) for s, e in spans] == [_norm(w) for w in want], where
    eot = _norm(EOT.get(template) or tok.eos_token)
    del eot
    assert len(runs) == len(want), (where, [r for r, _, _ in runs], want)
    for (run, first, last), expected in zip(runs, want, strict=True):
        got, exp = _norm(run), _norm(expected)
        i = got.find(exp)
        assert i >= 0, (where, run, expected)
        # Extra characters may only come from a token that straddles the span's edge (e.g.
        # ".<" in "Rules.<|im_end|>" with the Llama-2 pieces), never from a whole extra token.
        assert i < max(1, len(_norm(first))), (where, run, expected)
        assert len(got) - i - len(exp) < max(1, len(_norm(last))), (where, run, expected)


# Every conversational file of ../shared/data (dataset_info.json is a registry, not data).
FILES: dict[str, dict[str, Any]] = {
    "alpaca_en_demo.json": {},
    "alpaca_zh_demo.json": {},
    "identity.json": {},
    "glaive_toolcall_en_demo.json": {},
    "v1_sft_demo.jsonl": {},
    "sharegpt_dummy_conversation.json": {},
    "alpaca_seed_tasks.jsonl": {},
    "qa_en.csv": {"mapping": {"question": "instruction", "context": "input", "answer": "output"}},
    "qa_zh.xlsx": {"mapping": {"问题": "instruction", "背景": "input", "回应": "output"}},
}


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


def check_record(r: Renderer, hf: Any, stops: list[str], conv: Conversation, enc: Any) -> None:
    """The record's samples are exactly the oracle's: same ids, same trained tokens."""
    where = f"{r.name} {conv.source} {conv.id}"
    assert enc.render.refusal is None, enc.render.refusal
    msgs, tools, origin, _ = r.template_messages(conv)
    append = appended_token(hf, stops)
    want, located, appended = expected_samples(
        hf, msgs, tools, trained_flags(r, conv, origin), stops, append
    )
    assert enc.render.fallback == located, where
    assert enc.render.appended == appended, (where, enc.render.appended, appended)
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


# The end-of-turn text each template must train after an assistant reply (None: the tokenizer's
# EOS token).
EOT = {"auto": "<|im_end|>", "chatml": "<|im_end|>", "llama2": None, "alpaca": None,
       "fastchat:vicuna_v1.1": "</s>"}  # fmt: skip


def _norm(s: str) -> str:
    # SentencePiece adds/drops leading spaces around pieces; every other character must match.
    return re.sub(r"\s+", "", s)


def expected_runs(renderer: Renderer, tok: Any, conv: Conversation, template: str) -> list[str]:
    """What the trained tokens must decode to, run by run, computed from the record alone."""
    eot = EOT.get(template) or tok.eos_token
    msgs = conv.messages
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=-1)
    runs = []
    for i, m in enumerate(msgs):
        if m.train is not None:
            trained = m.train
        elif renderer.train_on == "last-assistant":
            trained = i == last
        else:
            trained = m.role == "assistant"
        if not trained:
            continue
        content = "\n".join(
            ([m.content] if m.content else []) + [_plain_call(c) for c in m.tool_calls or []]
        )
        if m.role == "assistant":
            # (FastChat renders an empty reply as an open prompt: the appended stop is trained)
            runs.append(content + eot)
        elif content:
            runs.append(content)
    return runs


def trained_runs(tok: Any, enc: EncodedSample) -> list[tuple[str, str, str]]:
    """Decode each maximal run of trained tokens separately: (run, its first token, its last)."""
    m = np.concatenate([[False], enc.train_mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    ids = enc.input_ids.tolist()
    return [
        (tok.decode(ids[a:b]), tok.decode(ids[a : a + 1]), tok.decode(ids[b - 1 : b]))
        for a, b in zip(edges[::2], edges[1::2], strict=True)
    ]


def _plain_call(call: dict[str, Any]) -> str:
    fn = call["function"]
    obj = {"name": fn["name"], "arguments": fn["arguments"]}
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))
