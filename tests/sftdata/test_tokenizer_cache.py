"""The tokenizer snapshot cache: warm loads equal full loads, damaged or changed entries are
rebuilt, an unwritable cache only costs time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sftdata.errors import ConfigError
from sftdata.tokenizer import TINY_DIR, load_tokenizer, tokenizer_identity
from sftdata.tokenizer_cache import load_snapshot


def _cache_entries(root: Path) -> list[Path]:
    return sorted((root / "tokenizers").glob("*.json"))


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SFTPIPE_CACHE", str(root))
    return root


def test_snapshot_matches_the_full_tokenizer_cold_and_warm(fresh_cache: Path) -> None:
    full = load_tokenizer("tiny")
    cold = load_snapshot("tiny")
    assert len(_cache_entries(fresh_cache)) == 1
    warm = load_snapshot("tiny")
    text = "<|im_start|>user\n你好 world<|im_end|>"
    want = full.backend_tokenizer.encode(text, add_special_tokens=False)
    for snap in (cold, warm):
        assert tokenizer_identity(snap) == tokenizer_identity(full)
        got = snap.backend_tokenizer.encode(text, add_special_tokens=False)
        assert (got.ids, got.offsets) == (want.ids, want.offsets)
        assert (snap.bos_token, snap.eos_token, snap.pad_token) == (
            None,
            "<|im_end|>",
            "<|endoftext|>",
        )
        assert snap.chat_template == full.chat_template
    assert warm.name_or_path == str(TINY_DIR)


def test_llama2_snapshot_from_cache_equals_full_load(
    llama2_tokenizer_dir: Path, fresh_cache: Path
) -> None:
    full = tokenizer_identity(load_tokenizer(llama2_tokenizer_dir))
    load_snapshot(llama2_tokenizer_dir)
    # The bare .model file is the same content, so it is served by the folder's entry.
    warm = load_snapshot(llama2_tokenizer_dir / "tokenizer.model")
    assert len(_cache_entries(fresh_cache)) == 1
    assert tokenizer_identity(warm) == full


def test_warm_snapshot_does_not_import_transformers(fresh_cache: Path) -> None:
    load_snapshot("tiny")
    code = (
        "import sys; from sftdata.tokenizer_cache import load_snapshot; load_snapshot('tiny'); "
        "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        env={**os.environ, "SFTPIPE_CACHE": str(fresh_cache)},
    )  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_damaged_cache_entry_is_rebuilt(fresh_cache: Path) -> None:
    want = tokenizer_identity(load_snapshot("tiny"))
    (entry,) = _cache_entries(fresh_cache)
    d = json.loads(entry.read_text(encoding="utf-8"))
    d["backend_json"] = d["backend_json"].replace('"<|im_end|>"', '"<|im_fin|>"', 1)
    entry.write_text(json.dumps(d), encoding="utf-8")
    assert tokenizer_identity(load_snapshot("tiny")) == want
    assert json.loads(entry.read_text(encoding="utf-8"))["backend_json"].count("<|im_fin|>") == 0
    entry.write_text("{not json", encoding="utf-8")
    assert tokenizer_identity(load_snapshot("tiny")) == want


def test_changed_tokenizer_files_are_not_served_from_the_cache(
    tmp_path: Path, fresh_cache: Path
) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(TINY_DIR, folder)
    before = tokenizer_identity(load_snapshot(folder))
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    after = load_snapshot(folder)
    assert after.chat_template == cfg["chat_template"]
    assert tokenizer_identity(after)["sha256"] != before["sha256"]
    assert tokenizer_identity(after) == tokenizer_identity(load_tokenizer(folder))
    assert len(_cache_entries(fresh_cache)) == 2


def test_unwritable_cache_only_costs_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SFTPIPE_CACHE", str(blocker / "cache"))
    assert tokenizer_identity(load_snapshot("tiny")) == tokenizer_identity(load_tokenizer("tiny"))


def test_snapshot_errors_are_those_of_load_tokenizer(tmp_path: Path, fresh_cache: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_snapshot(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a tokenizer folder"):
        load_snapshot(tmp_path / "empty")
    assert not fresh_cache.exists()


def test_snapshots_hold_the_same_rust_tokenizer_with_compact_merges(
    shared_tokenizers: Path, llama2_tokenizer_dir: Path, fresh_cache: Path
) -> None:
    """Merges kept as "a b" strings (faster to load) give the very tokenizer the folder holds:
    the same JSON once loaded, on tiny, Llama-2 and the three real vocabularies."""
    folders = ["tiny", llama2_tokenizer_dir] + [
        shared_tokenizers / n for n in ("qwen2", "llama3", "phi3")
    ]
    for folder in folders:
        full = load_tokenizer(folder).backend_tokenizer.to_str()
        snap = load_snapshot(folder)
        assert json.loads(snap.backend_json)["model"]["merges"][0].count(" ") == 1, folder
        assert snap.backend_tokenizer.to_str() == full, folder


def test_merges_of_pieces_holding_a_space_stay_pairs() -> None:
    from tokenizers import Tokenizer, models

    from sftdata.tokenizer import compact_merges

    vocab = {"x": 0, "y z": 1, "xy z": 2}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("x", "y z")]))
    text = tok.to_str()
    assert compact_merges(text) == text  # "x y z" would not say where the pair splits
    assert Tokenizer.from_str(compact_merges(text)).to_str() == text
