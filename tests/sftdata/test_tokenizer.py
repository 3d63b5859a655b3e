"""Tokenizer loading (tiny, HF folder, bare SentencePiece file), refusals and identity hashes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sftdata.tokenizer as tokmod
from sftdata.errors import ConfigError
from sftdata.tokenizer import TINY_DIR, load_tokenizer, tokenizer_identity
from tests.conftest import ROOT


def test_tiny_tokenizer_files_and_specials() -> None:
    tok = load_tokenizer("tiny")
    assert TINY_DIR == ROOT / "sftdata" / "tiny"
    assert tok.is_fast
    assert len(tok) == 4096
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert "<|im_start|>" in tok.all_special_tokens
    assert "{% for message in messages %}" in tok.chat_template
    ids = tok.backend_tokenizer.encode(
        "<|im_start|>user\n你好 world<|im_end|>", add_special_tokens=False
    ).ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "<|im_start|>user\n你好 world<|im_end|>"


def test_tiny_tokenizer_training_is_deterministic(tmp_path: Path) -> None:
    script = ROOT / "fixtures" / "make_tiny_tokenizer.py"
    copy = tmp_path / "make_tiny_tokenizer.py"
    shutil.copy(script, copy)
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(copy), str(out)], check=True, capture_output=True, env=env)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tiny" / name).read_bytes() == (TINY_DIR / name).read_bytes(), name


def test_llama2_folder_and_bare_model_file_are_the_same_tokenizer(
    llama2_tokenizer_dir: Path,
) -> None:
    a = load_tokenizer(llama2_tokenizer_dir)
    b = load_tokenizer(llama2_tokenizer_dir / "tokenizer.model")
    ia, ib = tokenizer_identity(a), tokenizer_identity(b)
    assert ia == ib
    assert ia["name"] == "llama2"
    assert ia["vocab_size"] == 32000
    assert (ia["bos_token_id"], ia["eos_token_id"], ia["pad_token_id"]) == (1, 2, 2)
    text = "<s>[INST] Hi 你好 [/INST] Hello </s>"
    ids = a.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1
    assert b.backend_tokenizer.encode(text, add_special_tokens=False).ids == ids


def test_identity_is_path_independent_and_content_sensitive(tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere"
    shutil.copytree(TINY_DIR, copy)
    tiny = tokenizer_identity(load_tokenizer("tiny"))
    assert tokenizer_identity(load_tokenizer(copy))["sha256"] == tiny["sha256"]
    assert tiny["pad_token_id"] == 0 and tiny["eos_token_id"] == 2 and tiny["bos_token_id"] is None
    # A different chat template is a different tokenizer for packing purposes.
    cfg = copy / "tokenizer_config.json"
    data = json.loads(cfg.read_text(encoding="utf-8"))
    changed = data["chat_template"].replace("'\\n'", "''")
    assert changed != data["chat_template"]
    data["chat_template"] = changed
    cfg.write_text(json.dumps(data), encoding="utf-8")
    assert tokenizer_identity(load_tokenizer(copy))["sha256"] != tiny["sha256"]


def test_pad_falls_back_to_eos() -> None:
    tok = load_tokenizer("tiny")
    tok.pad_token = None
    assert tokenizer_identity(tok)["pad_token_id"] == tok.eos_token_id


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "not a tokenizer folder"),
        (lambda d: _write(d / "notes.txt", b"hello"), "not a tokenizer"),
        (lambda d: _write(d / "fake.model", b"just text"), "not a SentencePiece model file"),
        (lambda d: _write(d / "bad.model", b"\n\x05hello garbage"), "not a usable tokenizer"),
        (lambda d: _write(d / "t" / "tokenizer.json", b"{not json"), "not a usable tokenizer"),
    ],
)
def test_bad_tokenizer_paths_give_one_line_config_errors(tmp_path: Path, make, expect: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_tokenizer(path)
    msg = str(e.value)
    assert expect in msg
    assert "\n" not in msg
    assert msg.startswith(str(path))
    assert "sftdata-spm-" not in msg  # the temporary folder never leaks into messages


def test_missing_protobuf_is_named_instead_of_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokmod, "_missing_packages", lambda: ["protobuf"])
    err = tokmod._conversion_error(Path("tok"), ValueError("tiktoken is required to read tok"))
    assert "protobuf" in str(err) and "sentencepiece" in str(err)
    assert "tiktoken" not in str(err)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.parent if path.name == "tokenizer.json" else path


def test_slow_tokenizer_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    class Slow:
        is_fast = False

    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Slow())
    with pytest.raises(ConfigError, match="only a slow tokenizer could be built"):
        load_tokenizer(tmp_path)


def test_llama2_pieces_equal_sentencepiece_per_chunk(llama2_tokenizer_dir: Path) -> None:
    """Text right after a special token gets SentencePiece's dummy '▁' prefix, as in Meta's,
    FastChat's and MindFormers' per-turn encoding (transformers 5.23's bare conversion drops it)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir / "tokenizer.model"))
    for tok in (
        load_tokenizer(llama2_tokenizer_dir),
        load_tokenizer(llama2_tokenizer_dir / "tokenizer.model"),
    ):
        chunks = ["[INST] Hi 你好 [/INST] Hello", "USER: 12 apples\nASSISTANT: A chat"]
        text = "".join(f"<s>{c}</s>" for c in chunks)
        want = [i for c in chunks for i in [1, *sp.encode(c), 2]]
        assert tok.backend_tokenizer.encode(text, add_special_tokens=False).ids == want
        assert tok.backend_tokenizer.encode("A chat", add_special_tokens=False).ids == sp.encode(
            "A chat"
        )
        assert tok.decode(sp.encode("Hello world")) == "Hello world"


# ------------------------------------------------------------------ snapshots and their cache


LOAD_BY_CLASS = """
import json, sys
from sftdata.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1], cls=sys.argv[2])
print(json.dumps({"torch": "torch" in sys.modules, "backend": tok.backend_tokenizer.to_str(),
                  "specials": tok.special_tokens_map, "template": tok.chat_template,
                  "added": {str(k): str(v) for k, v in tok.added_tokens_decoder.items()}}))
"""


@pytest.mark.parametrize("name", ["tiny", "llama2", "qwen2", "llama3", "phi3"])
def test_the_class_autotokenizer_picked_loads_the_same_tokenizer_without_torch(
    name: str, shared_tokenizers: Path
) -> None:
    """The audit's second renderer loads the class AutoTokenizer picked (recorded in the
    snapshot) directly: the same tokenizer as AutoTokenizer's (the oracle here: the Rust
    tokenizer, special tokens, template and added tokens), and torch is never imported."""
    from sftdata.tokenizer import tokenizer_class
    from sftdata.tokenizer_cache import load_snapshot

    spec = name if name == "tiny" else str(shared_tokenizers / name)
    auto = load_tokenizer(spec)  # AutoTokenizer
    assert load_snapshot(spec).tokenizer_class == tokenizer_class(auto)
    argv = [sys.executable, "-c", LOAD_BY_CLASS, spec, tokenizer_class(auto)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(r.stdout) == {
        "torch": False,
        "backend": auto.backend_tokenizer.to_str(),
        "specials": auto.special_tokens_map,
        "template": auto.chat_template,
        "added": {str(k): str(v) for k, v in auto.added_tokens_decoder.items()},
    }


def test_a_class_name_outside_transformers_is_refused() -> None:
    for name in ("os:system", "transformers:nothing_here", "json:JSONDecoder"):
        with pytest.raises(ConfigError, match="not a transformers tokenizer class"):
            load_tokenizer("tiny", cls=name)
