"""Rendering and exact label masks (C2) on hand-written conversations, plus template refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sftdata.conversation import Conversation, Message, Source
from sftdata.errors import ConfigError, TemplateError
from sftdata.render import TRAIN_ON, EncodedSample, Renderer, mask_from_offsets
from tests.chat_oracle import EOT, _norm, assert_c2, cached_tokenizer, trained_runs
from tests.conftest import ROOT


def _conv(*messages: Message, cid: str = "r1", tools: Any = None, line: int = 7) -> Conversation:
    return Conversation(
        id=cid, messages=list(messages), source=Source(file="data.jsonl", line=line), tools=tools
    )


U, A, S, T = "user", "assistant", "system", "tool"
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "巴黎"}}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]

FIXTURES = {
    "multi_turn_system": _conv(
        Message(S, "You are terse."),
        Message(U, "Name a colour."),
        Message(A, "Blue."),
        Message(U, "Another one?"),
        Message(A, "Green, obviously.\nAnd red."),
    ),
    "chinese": _conv(
        Message(U, "天空为什么是蓝色的？"), Message(A, "因为瑞利散射：蓝光散射得更多。")
    ),
    "tool_calls": _conv(
        Message(U, "Weather in Paris?"),
        Message(A, "", tool_calls=[CALL]),
        Message(T, '{"temp_c": 21}'),
        Message(A, "It is 21 °C in Paris."),
        tools=TOOLS,
    ),
    "tool_call_with_text": _conv(
        Message(U, "Weather?"), Message(A, "Let me check.", tool_calls=[CALL]), tools=TOOLS
    ),
    "flags": _conv(
        Message(S, "Rules.", train=True),
        Message(U, "Question one", train=True),
        Message(A, "Answer one (bad, do not learn)", train=False),
        Message(U, "Question two"),
        Message(A, "Answer two"),
    ),
    "repeated_text": _conv(
        Message(U, "Yes"), Message(A, "Yes"), Message(U, "Yes"), Message(A, "No")
    ),
    "padded_whitespace": _conv(Message(U, "  spaced question  "), Message(A, "  spaced answer \n")),
    "template_lookalike": _conv(
        Message(U, "Say [/INST] and ### Response:"), Message(A, "[INST] ### Response: </s> ok")
    ),
    "empty_reply": _conv(Message(U, "Say nothing."), Message(A, "")),
    "reply_inside_header": _conv(
        Message(U, "Which role writes replies?"),
        Message(A, "assistant"),
        Message(U, "Q"),
        Message(A, "A"),
    ),
    "reply_stripped_later_exact": _conv(
        Message(U, "Go"), Message(A, "Yes\n"), Message(U, "Yes\nand more"), Message(A, "Ok")
    ),
    "nothing_trained": _conv(Message(U, "Q"), Message(A, "A", train=False)),
}


@pytest.fixture
def tiny() -> Any:
    return cached_tokenizer("tiny")


@pytest.fixture
def llama2(llama2_tokenizer_dir: Path) -> Any:
    return cached_tokenizer(str(llama2_tokenizer_dir))


TEMPLATES_TINY = ["auto", "chatml", "llama2", "alpaca"]
TEMPLATES_LLAMA2 = ["llama2", "alpaca", "fastchat:vicuna_v1.1"]


@pytest.mark.parametrize("train_on", ["all-assistant", "last-assistant"])
@pytest.mark.parametrize("template", TEMPLATES_TINY)
def test_c2_fixtures_tiny(tiny: Any, template: str, train_on: str) -> None:
    r = Renderer(tiny, template=template, train_on=train_on)
    convs = list(FIXTURES.values())
    for conv, enc in zip(convs, r.encode_batch(convs), strict=True):
        assert_c2(r, tiny, conv, enc, template)


@pytest.mark.parametrize("train_on", ["all-assistant", "last-assistant"])
@pytest.mark.parametrize("template", TEMPLATES_LLAMA2)
def test_c2_fixtures_llama2(llama2: Any, template: str, train_on: str) -> None:
    # The template_lookalike reply holds "</s>", a special token of Llama-2: kept as the token
    # here (--special-text keep), and its reply is still trained through the template's stop.
    r = Renderer(llama2, template=template, train_on=train_on, special_text="keep")
    convs = list(FIXTURES.values())
    for conv, enc in zip(convs, r.encode_batch(convs), strict=True):
        assert_c2(r, llama2, conv, enc, template)


@pytest.mark.parametrize("template", TEMPLATES_TINY)
def test_everything_trains_all_tokens_except_explicit_false(tiny: Any, template: str) -> None:
    r = Renderer(tiny, template=template, train_on="everything")
    conv = FIXTURES["multi_turn_system"]
    rec = r.encode(conv)
    assert rec.samples[0].train_mask.all()
    assert_c2(r, tiny, conv, rec, template)
    flagged = FIXTURES["flags"]
    text, spans = r.render(flagged)
    enc = r.encode(flagged).samples[0]
    inverse = EncodedSample(enc.input_ids, ~enc.train_mask)
    untrained = _norm("".join(run for run, _, _ in trained_runs(tiny, inverse)))
    # Only the excluded reply, through its stop token, is untrained (a token straddling its
    # first character is trained).
    eot = _norm(EOT.get(template) or tiny.eos_token)
    assert untrained in _norm("Answer one (bad, do not learn)") + eot and "donotlearn" in untrained
    assert spans[0][0] == 0 and spans[-1][1] == len(text) and len(spans) == 2


def test_llama2_template_matches_meta_format(llama2: Any) -> None:
    r = Renderer(llama2, template="llama2")
    text, _ = r.render(FIXTURES["multi_turn_system"])
    assert text == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nName a colour. [/INST] Blue. </s>"
        "<s>[INST] Another one? [/INST] Green, obviously.\nAnd red. </s>"
    )
    enc = r.encode(FIXTURES["multi_turn_system"]).samples[0]
    ids = enc.input_ids.tolist()
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 2  # <s>/</s> are single specials
    assert enc.train_mask[ids.index(2)] and not enc.train_mask[0]
    assert r.stop_tokens == ("</s>",)


def test_chatml_alpaca_and_vicuna_layouts(tiny: Any, llama2: Any) -> None:
    conv = _conv(Message(U, "Hi"), Message(A, "Hello"))
    assert Renderer(tiny, template="chatml").render(conv)[0] == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert Renderer(tiny, template="auto").render(conv)[0] == tiny.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        tokenize=False,
    )
    assert Renderer(llama2, template="alpaca").render(conv)[0] == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>\n\n"
    )
    with_input = _conv(Message(U, "Translate."), Message(U, "Bonjour"), Message(A, "Hello"))
    text = Renderer(llama2, template="alpaca").render(with_input)[0]
    assert (
        "paired with an input" in text and "### Input:\nBonjour\n\n### Response:\nHello</s>" in text
    )
    vicuna = Renderer(llama2, template="fastchat:vicuna_v1.1").render(conv)[0]
    assert vicuna.startswith("<s>A chat between a curious user") and vicuna.endswith(
        " USER: Hi ASSISTANT: Hello</s>"
    )


def test_tool_calls_and_tools_are_never_dropped(tiny: Any) -> None:
    r = Renderer(tiny, template="chatml")
    text, spans = r.render(FIXTURES["tool_calls"])
    assert '"name": "get_weather"' in text and "Available tools:" in text
    assert '{"name": "get_weather", "arguments": {"city": "巴黎"}}<|im_end|>' in [
        text[s:e] for s, e in spans
    ]
    assert "<|im_start|>tool\n" in text


def test_native_tool_template_gets_tools_and_calls(tiny: Any, tmp_path: Path) -> None:
    tpl = tmp_path / "tools.jinja"
    tpl.write_text(
        "{% if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        encoding="utf-8",
    )
    r = Renderer(tiny, template=str(tpl))
    conv = FIXTURES["tool_call_with_text"]
    text, spans = r.render(conv)
    assert text.startswith('<|im_start|>system\n[{"type": "function"')
    assert "Available tools" not in text
    assert [text[s:e] for s, e in spans] == [
        'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "巴黎"}}'
        "</tool_call><|im_end|>"
    ]
    # An empty-content call is located through the template's generation prompt.
    text, spans = r.render(FIXTURES["tool_calls"])
    assert text[spans[0][0] : spans[0][1]].startswith("<tool_call>")


def test_zero_trained_tokens_give_an_empty_mask(tiny: Any, llama2: Any) -> None:
    for tok, template in [(tiny, "chatml"), (llama2, "llama2"), (llama2, "fastchat:vicuna_v1.1")]:
        enc = Renderer(tok, template=template).encode(FIXTURES["nothing_trained"]).samples[0]
        assert len(enc.input_ids) > 0 and not enc.train_mask.any()
    # FastChat renders an empty reply as the open prompt "ASSISTANT:": what is trained is the
    # appended stop alone (the model learns to stop at once), never the prompt
    enc = (
        Renderer(llama2, template="fastchat:vicuna_v1.1").encode(FIXTURES["empty_reply"]).samples[0]
    )
    assert enc.input_ids[enc.train_mask].tolist() == [llama2.eos_token_id]
    assert enc.train_mask[-1] and enc.train_mask.sum() == 1


def test_encode_batch_equals_encode(tiny: Any) -> None:
    r = Renderer(tiny, template="auto")
    convs = list(FIXTURES.values())
    batch = r.encode_batch(convs)
    for conv, enc in zip(convs, batch, strict=True):
        one = r.encode(conv)
        assert np.array_equal(one.samples[0].input_ids, enc.samples[0].input_ids)
        assert np.array_equal(one.samples[0].train_mask, enc.samples[0].train_mask)
    assert r.encode_batch([]) == []


def test_fixed_overhead_and_template_text(tiny: Any, llama2: Any) -> None:
    r = Renderer(tiny, template="chatml")
    minimal = "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    assert r.fixed_overhead == len(tiny.backend_tokenizer.encode(minimal, add_special_tokens=False))
    assert r.fixed_overhead < len(
        r.encode(_conv(Message(U, "Hi"), Message(A, "Hello"))).samples[0].input_ids
    )
    assert r.name == "chatml"
    assert r.template_text == (ROOT / "sftdata/templates/chatml.jinja").read_text()
    assert Renderer(tiny, template="auto").template_text == tiny.chat_template
    ll = Renderer(llama2, template="llama2")
    assert ll.fixed_overhead == len(
        llama2.encode("<s>[INST]  [/INST]  </s>", add_special_tokens=False)
    )
    fc = Renderer(llama2, template="fastchat:vicuna_v1.1")
    assert "vicuna_v1.1" in fc.template_text and "</s>" in fc.template_text


def test_auto_without_chat_template_names_the_options(llama2: Any) -> None:
    with pytest.raises(
        TemplateError,
        match=r"no chat_template.*chatml, .*llama2, .*qwen3, a LLaMA-Factory template name, fastchat:NAME",
    ):
        Renderer(llama2, template="auto")


@pytest.mark.parametrize(
    ("template", "pattern"),
    [
        (
            "nonsense",
            r"template 'nonsense' is not known; choose one of auto, alpaca, chatml, cohere",
        ),
        ("fastchat:no_such_template", r"fastchat:no_such_template: not a FastChat"),
        ("missing.jinja", r"missing.jinja: template file does not exist"),
    ],
)
def test_unknown_templates_are_refused(tiny: Any, template: str, pattern: str) -> None:
    with pytest.raises(TemplateError, match=pattern):
        Renderer(tiny, template=template)


def test_bad_jinja_file_names_file_and_line(tiny: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text(
        "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}\n", encoding="utf-8"
    )
    with pytest.raises(TemplateError) as e:
        Renderer(tiny, template=str(bad))
    assert str(e.value).startswith(f"{bad}:3: template syntax error")
    assert "\n" not in str(e.value)


def test_template_that_rewrites_contents_is_refused(tiny: Any, tmp_path: Path) -> None:
    upper = tmp_path / "upper.jinja"
    upper.write_text("{% for m in messages %}{{ m.content | upper }}{{ eos_token }}{% endfor %}")
    with pytest.raises(TemplateError, match="verbatim"):
        Renderer(tiny, template=str(upper))


def test_render_failure_names_the_record_source(tiny: Any, tmp_path: Path) -> None:
    tpl = tmp_path / "picky.jinja"
    tpl.write_text(
        "{% if messages | length > 4 %}{{ raise_exception('at most two turns') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        encoding="utf-8",
    )
    r = Renderer(tiny, template=str(tpl))
    assert r.name == "picky.jinja"
    with pytest.raises(TemplateError) as e:
        r.encode_batch([FIXTURES["chinese"], FIXTURES["multi_turn_system"]])
    msg = str(e.value)
    assert msg.startswith("data.jsonl:7: template picky.jinja: record 'r1': TemplateError:")
    assert "at most two turns" in msg and "\n" not in msg


def test_a_template_whose_markers_the_tokenizer_lacks_is_refused(tiny: Any) -> None:
    """FastChat's Vicuna ends each reply with the text "</s>": on a tokenizer without that
    token the model would learn to write it as plain pieces and never to stop."""
    with pytest.raises(TemplateError) as e:
        Renderer(tiny, template="fastchat:vicuna_v1.1")
    assert str(e.value) == (
        "template fastchat:vicuna_v1.1: </s> is not a special token of tiny: pick the model's "
        "own tokenizer or a template for it"
    )


def test_bad_train_on_is_a_config_error(tiny: Any) -> None:
    assert TRAIN_ON == ("all-assistant", "last-assistant", "everything")
    with pytest.raises(ConfigError, match="train_on 'prompt'"):
        Renderer(tiny, template="chatml", train_on="prompt")


def test_mask_rule_on_offsets() -> None:
    offsets = np.array([[0, 3], [3, 5], [5, 5], [5, 9], [9, 12]])
    assert mask_from_offsets(offsets, []).tolist() == [False] * 5
    assert mask_from_offsets(offsets, [(4, 5)]).tolist() == [False, True, False, False, False]
    assert mask_from_offsets(offsets, [(5, 6)]).tolist() == [False, False, True, True, False]
    assert mask_from_offsets(offsets, [(0, 1), (11, 12)]).tolist() == [
        True,
        False,
        False,
        False,
        True,
    ]


def test_hf_generation_tag_is_accepted(tiny: Any, tmp_path: Path) -> None:
    tpl = tmp_path / "gen.jinja"
    tpl.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m.content }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        encoding="utf-8",
    )
    r = Renderer(tiny, template=str(tpl))
    conv = FIXTURES["multi_turn_system"]
    assert r.render(conv)[0] == Renderer(tiny, template="chatml").render(conv)[0]
    assert_c2(r, tiny, conv, r.encode(conv), "chatml")


def test_template_that_always_fails_is_refused_with_its_message(tiny: Any, tmp_path: Path) -> None:
    tpl = tmp_path / "fails.jinja"
    tpl.write_text("{{ raise_exception('this template needs tools') }}", encoding="utf-8")
    with pytest.raises(
        TemplateError, match=r"fails.jinja: cannot render a probe conversation: .*needs tools"
    ):
        Renderer(tiny, template=str(tpl))
