"""C2 on the real conversational files in ../shared/data with the real Llama-2 tokenizer and the
project's tiny tokenizer (its own ChatML chat_template), 200 records per file and template
(ChatML and the family templates on their own real vocabularies: test_c2_real_vocabularies)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from sftdata.render import Renderer
from sftdata.sources import read_conversations
from tests.chat_oracle import FILES, assert_c2, cached_tokenizer

PER_FILE = 200  # keeps the whole module within a few seconds on 2 cores


def _records(shared_data: Path, name: str) -> list[Any]:
    convs = list(itertools.islice(read_conversations(shared_data / name, **FILES[name]), PER_FILE))
    assert len(convs) >= min(PER_FILE, 90), name  # identity.json holds 91, seed tasks 175
    return convs


@pytest.mark.parametrize("name", list(FILES))
def test_c2_real_data_llama2_tokenizer(
    shared_data: Path, llama2_tokenizer_dir: Path, name: str
) -> None:
    tok = cached_tokenizer(str(llama2_tokenizer_dir))
    convs = _records(shared_data, name)
    for template in ("llama2", "fastchat:vicuna_v1.1", "alpaca"):
        r = Renderer(tok, template=template)
        encs = r.encode_batch(convs)
        for conv, enc in zip(convs, encs, strict=True):
            assert_c2(r, tok, conv, enc, template)
        assert sum(int(s.train_mask.sum()) for e in encs for s in e.samples) > 0


@pytest.mark.parametrize("name", list(FILES))
def test_c2_real_data_tiny_tokenizer_auto(shared_data: Path, name: str) -> None:
    tok = cached_tokenizer("tiny")
    convs = _records(shared_data, name)
    r = Renderer(tok, template="auto")
    for conv, enc in zip(convs, r.encode_batch(convs), strict=True):
        assert_c2(r, tok, conv, enc, "auto")


def test_last_assistant_on_multi_turn_real_data(
    shared_data: Path, llama2_tokenizer_dir: Path
) -> None:
    tok = cached_tokenizer(str(llama2_tokenizer_dir))
    convs = _records(shared_data, "sharegpt_dummy_conversation.json")
    assert any(sum(m.role == "assistant" for m in c.messages) > 1 for c in convs)
    r = Renderer(tok, template="llama2", train_on="last-assistant")
    for conv, enc in zip(convs, r.encode_batch(convs), strict=True):
        assert_c2(r, tok, conv, enc, "llama2")
