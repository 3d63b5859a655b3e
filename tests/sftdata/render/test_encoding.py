"""The ASCII twin (``sftdata.render.encoding``): a tokenizer whose normalizer is only Unicode
normal forms encodes ASCII texts without it, and every encoding stays what the tokenizer gives."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, normalizers

from sftdata.conversation import read_jsonl
from sftdata.convert import convert
from sftdata.render import Renderer
from sftdata.render.encoding import NORMAL_FORMS, ascii_twin, encode_texts
from sftdata.tokenizer import load_tokenizer

ASCII = [chr(i) for i in range(128)]


@pytest.mark.parametrize("form", sorted(NORMAL_FORMS))
def test_normal_forms_leave_every_ascii_text_as_it_is(form: str) -> None:
    # The premise, on the Rust normalizers themselves: every ASCII character and every pair of
    # them (a composition takes two characters) comes back unchanged.
    n = getattr(normalizers, form)()
    assert n.normalize_str("".join(ASCII)) == "".join(ASCII)
    for a, b in itertools.product(ASCII, repeat=2):
        assert n.normalize_str(a + b) == a + b
    assert n.normalize_str("e\u0301") != "e\u0301" or form in ("NFD", "NFKD")  # not a no-op


def _without_normalizer(backend: Tokenizer) -> dict:
    d = json.loads(backend.to_str())
    d["normalizer"] = None
    return d


def test_twin_is_the_same_tokenizer_less_its_normalizer(shared_tokenizers: Path) -> None:
    # transformers gives Qwen2 its NFC normalizer; the twin serializes to the same JSON without it
    backend = load_tokenizer(shared_tokenizers / "qwen2").backend_tokenizer
    assert json.loads(backend.normalizer.__getstate__()) == {"type": "NFC"}
    twin = ascii_twin(backend)
    assert twin is not None
    assert json.loads(twin.to_str()) == _without_normalizer(backend)


@pytest.mark.parametrize("vocab", ["llama3", "phi3"])
def test_no_twin_where_the_normalizer_changes_ascii_or_there_is_none(
    shared_tokenizers: Path, vocab: str
) -> None:
    # Llama 3 has no normalizer (nothing to skip); Phi-3's prepends and replaces on ASCII text
    assert ascii_twin(load_tokenizer(shared_tokenizers / vocab).backend_tokenizer) is None


def test_no_twin_for_other_normalizers(shared_tokenizers: Path) -> None:
    backend = Tokenizer.from_file(str(shared_tokenizers / "qwen2" / "tokenizer.json"))
    for normalizer in (
        normalizers.Lowercase(),
        normalizers.Sequence([normalizers.NFC(), normalizers.Strip()]),
        normalizers.BertNormalizer(),
    ):
        backend.normalizer = normalizer
        assert ascii_twin(backend) is None, normalizer
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.NFD()])
    assert ascii_twin(backend) is not None
    backend.enable_truncation(16)  # a setting the twin would not carry: no twin
    assert ascii_twin(backend) is None


def test_encodings_are_the_tokenizers_own_in_order(
    shared_tokenizers: Path, shared_data: Path
) -> None:
    # Real texts, ASCII and not (Chinese Alpaca, accents, a decomposed é that NFC composes),
    # interleaved: ids, offsets and order equal one encode_batch of the tokenizer itself.
    backend = load_tokenizer(shared_tokenizers / "qwen2").backend_tokenizer
    twin = ascii_twin(backend)
    en = json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:40]
    zh = json.loads((shared_data / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[:40]
    texts = [x for pair in zip(en, zh, strict=True) for x in (pair[0]["output"], pair[1]["output"])]
    texts += ["cafe\u0301 <|im_end|>", "<|im_start|>user\nhi<|im_end|>\n", ""]
    assert any(t.isascii() for t in texts) and not all(t.isascii() for t in texts)
    for batch in (texts, [t for t in texts if t.isascii()], [t for t in texts if not t.isascii()]):
        got = encode_texts(backend, batch, twin)
        want = backend.encode_batch(batch, add_special_tokens=False)
        assert [(e.ids, e.offsets) for e in got] == [(e.ids, e.offsets) for e in want]


def test_renderer_masks_equal_with_and_without_the_twin(
    shared_tokenizers: Path, shared_data: Path, tmp_path: Path
) -> None:
    # Glaive tool calls through Qwen2's own template: ids and masks as without the twin.
    out = tmp_path / "glaive.jsonl"
    convert([shared_data / "glaive_toolcall_en_demo.json"], out)
    convs = list(read_jsonl(out))
    r = Renderer(load_tokenizer(shared_tokenizers / "qwen2"), template="auto")
    assert r._twin is not None
    with_twin = r.encode_batch(convs, skip_invalid=True)
    r._twin = None
    without = r.encode_batch(convs, skip_invalid=True)
    assert sum(len(x.samples) for x in with_twin) >= len(convs)
    for a, b in zip(with_twin, without, strict=True):
        for x, y in zip(a.samples, b.samples, strict=True):
            assert x.input_ids.tolist() == y.input_ids.tolist()
            assert x.train_mask.tolist() == y.train_mask.tolist()
