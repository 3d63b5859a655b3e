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

from sftdata.audit.oracle import (
    stop_strings,
)
from sftdata.render import Renderer
from sftdata.sources import read_conversations
from sftdata.templates import bounds
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

TEMPLATES = _trl_templates()
PER_FILE = 3  # records per real file and template (62 templates x 9 files): bounded CI time
HEADROOM = 20
"""The real templates render every record here within 1/HEADROOM of the work bound
(sftdata.templates.bounds): the tests run with the bound lowered that much, and a record the
bound stopped would fail check_refusal (transformers renders it)."""

U, A, S, T = "user", "assistant", "system", "tool"


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
