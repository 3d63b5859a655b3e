"""Stops (C2, C8): every trained reply ends in a token that stops the model. The stop set and
where each token came from, the stop appended where the template writes none (GLM-4's last
reply, replies that end at the next plain-text header), ``--missing-stop``, two end markers
(Command R7B), and a reply's own trailing newline; through ``sftdata pack`` and ``inspect``."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from sftdata.conversation import Conversation, Message, Source
from sftdata.errors import TemplateError
from sftdata.render import Renderer
from sftdata.shards import read_index
from sftdata.templates import TEMPLATES_DIR
from sftdata.tokenizer import load_tokenizer
from tests.c8 import check_stops
from tests.chat_oracle import FAMILIES, family_tokenizer
from tests.sftdata_helpers import _rec, run_cli, write_jsonl

U, A = "user", "assistant"

# Replies end at the next plain-text header and nothing else (Falcon/Nemotron-Mini layouts).
HEADERS = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Command R7B's layout: a reply between <|START_RESPONSE|> and <|END_RESPONSE|>, then the end of
# the turn, <|END_OF_TURN_TOKEN|>, which is the model's EOS.
R7B = (
    "{{ bos_token }}{% for m in messages %}<|START_OF_TURN_TOKEN|>"
    "{% if m.role == 'assistant' %}<|CHATBOT_TOKEN|><|START_RESPONSE|>{{ m.content }}"
    "<|END_RESPONSE|>{% else %}<|USER_TOKEN|>{{ m.content }}{% endif %}<|END_OF_TURN_TOKEN|>"
    "{% endfor %}{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    "<|START_RESPONSE|>{% endif %}"
)


def _conv(*messages: Message) -> Conversation:
    return Conversation("r1", list(messages), Source("data.jsonl", line=4))


@cache
def _llama2(folder: str) -> Any:
    return load_tokenizer(folder)


def _glm(root: Path, llama2: Path, *, generation: bool) -> Path:
    """A GLM-4-like model folder: Llama-2 pieces plus GLM's specials, our glm4 template."""
    folder = family_tokenizer(
        _llama2(str(llama2)),
        root / f"glm-{generation}",
        (TEMPLATES_DIR / "glm4.jinja").read_text(encoding="utf-8"),
        FAMILIES["glm4"],
    )
    if not generation:
        (folder / "generation_config.json").unlink()
    return folder


def test_glm4_final_reply_gets_the_stop_the_template_writes_next(
    tmp_path: Path, llama2_tokenizer_dir: Path
) -> None:
    conv = _conv(Message(U, "Hi"), Message(A, "Hello"), Message(U, "Bye"), Message(A, "Bye."))
    with_config = Renderer(load_tokenizer(_glm(tmp_path, llama2_tokenizer_dir, generation=True)))
    assert [(s.token, s.sources) for s in with_config.stops] == [
        ("<|endoftext|>", ("eos", "generation_config")),
        ("<|user|>", ("generation_config",)),
        ("<|observation|>", ("generation_config",)),
    ]
    # GLM ends a reply by generating the next turn's <|user|>: the last reply gets it too
    assert with_config.append_stop == "<|user|>"
    text, spans = with_config.render(conv)
    assert text.endswith("Bye.<|user|>")
    assert [text[s:e] for s, e in spans] == [
        "\n<think></think>\nHello<|user|>",
        "\n<think></think>\nBye.<|user|>",
    ]
    assert with_config.render_record(conv).appended == 1
    # without generation_config.json only EOS stops: appended after every reply
    bare = Renderer(load_tokenizer(_glm(tmp_path, llama2_tokenizer_dir, generation=False)))
    assert [(s.token, s.sources) for s in bare.stops] == [("<|endoftext|>", ("eos",))]
    text, spans = bare.render(conv)
    assert [text[s:e] for s, e in spans] == [
        "\n<think></think>\nHello<|endoftext|>",
        "\n<think></think>\nBye.<|endoftext|>",
    ]
    assert bare.render_record(conv).appended == 2


def test_command_r7b_trains_both_end_markers_through_the_eos(tmp_path: Path) -> None:
    tok = load_tokenizer("tiny")
    folder = tmp_path / "r7b"
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                "<|CHATBOT_TOKEN|>", "<|USER_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>",
            ]
        }
    )  # fmt: skip
    tok.bos_token, tok.eos_token, tok.chat_template = "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", R7B
    tok.save_pretrained(folder)
    r = Renderer(load_tokenizer(folder))
    assert [s.sources for s in r.stops] == [("eos", "template")]
    text, spans = r.render(_conv(Message(U, "Hi"), Message(A, "Hello")))
    assert [text[s:e] for s, e in spans] == ["Hello<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]


def test_replies_ending_at_the_next_header_get_eos_after_their_own_newline() -> None:
    r = Renderer(load_tokenizer("tiny"), template=_write(HEADERS))
    assert r.append_stop == "<|im_end|>" and [s.token for s in r.stops] == ["<|im_end|>"]
    conv = _conv(Message(U, "Q"), Message(A, "First\n"), Message(U, "Again"), Message(A, "Two"))
    text, spans = r.render(conv)
    assert text == (
        "User: Q\nAssistant: First\n<|im_end|>\nUser: Again\nAssistant: Two<|im_end|>\n"
    )
    # the generation prompt ends at "Assistant:", so the model generates the space too
    assert [text[s:e] for s, e in spans] == [" First\n<|im_end|>", " Two<|im_end|>"]


@cache
def _write(template: str) -> str:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sftpipe-tpl-")) / "headers.jinja"
    path.write_text(template, encoding="utf-8")
    return str(path)


def test_missing_stop_error_and_allow() -> None:
    conv = _conv(Message(U, "Q"), Message(A, "A"))
    tok = load_tokenizer("tiny")
    with pytest.raises(TemplateError) as e:
        Renderer(tok, template=_write(HEADERS), missing_stop="error").render_record(conv)
    assert str(e.value) == (
        "data.jsonl:4: record 'r1': the reply in message 1 ends without a stop token: template "
        "headers.jinja writes none after it and --missing-stop error (the default, append, "
        "would append '<|im_end|>'); pass --missing-stop allow to train replies without one"
    )
    allowed = Renderer(tok, template=_write(HEADERS), missing_stop="allow").render_record(conv)
    assert allowed.no_stop == 1 and allowed.appended == 0
    text = allowed.samples[0].text
    assert "<|im_end|>" not in text and text[slice(*allowed.samples[0].spans[0])] == " A"


def test_no_stop_token_to_append_fails_naming_the_tokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer("tiny")
    tok.eos_token = None
    folder = tmp_path / "no-eos"
    tok.save_pretrained(folder)
    r = Renderer(load_tokenizer(folder), template=_write(HEADERS))
    assert r.stops == () and r.append_stop is None
    with pytest.raises(TemplateError, match="no-eos has no stop token to append"):
        r.render_record(_conv(Message(U, "Q"), Message(A, "A")))


def test_pack_records_the_stop_set_and_appended_stops(
    tmp_path: Path, llama2_tokenizer_dir: Path
) -> None:
    folder = _glm(tmp_path, llama2_tokenizer_dir, generation=False)
    msgs = [{"role": U, "content": "Name a colour."}, {"role": A, "content": "Blue."}]
    data = write_jsonl(tmp_path / "d.jsonl", [_rec(i, msgs) for i in range(3)])
    out = tmp_path / "s"
    r = run_cli("pack", data, "-o", out, "--tokenizer", folder, "--seq-len", 128)
    assert r.exit_code == 0, r.output
    assert "stop tokens <|endoftext|> (eos); appended after 3 replies: <|endoftext|>" in r.output
    index = read_index(out)
    eos = load_tokenizer(folder).eos_token_id
    assert index["template"]["stops"] == [{"token": "<|endoftext|>", "id": eos, "from": ["eos"]}]
    assert index["template"]["appended_stop"] == "<|endoftext|>"
    assert index["counts"]["appended_stops"] == 3 and index["counts"]["no_stop"] == 0
    assert index["options"]["missing_stop"] == "append"
    assert check_stops(out) == 3
    shown = run_cli("inspect", out, "--plain")
    assert "stop tokens <|endoftext|> (eos); appended after 3 replies" in shown.output
    assert "[[stop: <|endoftext|>]]" in shown.output
    # --missing-stop error: one line naming the record, the template and the tokenizer
    failed = run_cli(
        "pack", data, "-o", tmp_path / "e", "--tokenizer", folder, "--seq-len", 128,
        "--missing-stop", "error",
    )  # fmt: skip
    assert failed.exit_code == 1 and len(failed.output.strip().splitlines()) == 1
    assert failed.output.startswith("Error: data.jsonl:1: record 'r0': the reply in message 1")
    assert "template auto" in failed.output and not (tmp_path / "e").exists()
    # --missing-stop allow: trained as the template renders it, counted
    allowed = run_cli(
        "pack", data, "-o", tmp_path / "a", "--tokenizer", folder, "--seq-len", 128,
        "--missing-stop", "allow", "--json",
    )  # fmt: skip
    report = json.loads(allowed.output)
    assert report["no_stop"] == 3 and report["appended_stops"] == 0
