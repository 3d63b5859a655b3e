"""Load tokenizers from local files only, and identify them by content.

``load_tokenizer`` accepts ``"tiny"`` (the project's own byte-level BPE in ``fixtures/tiny``), a
local Hugging Face tokenizer folder (``tokenizer.json``, or a ``tokenizer.model`` that transformers
converts) or a bare SentencePiece ``.model`` file. It always returns a *fast* tokenizer, because the
label masks are computed from the Rust tokenizer's character offsets. Nothing is ever fetched from a
model hub and no remote code runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftdata.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TINY_DIR: Path = Path(__file__).resolve().parents[1] / "fixtures" / "tiny"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _resolve(spec: str | Path) -> Path:
    if str(spec) == "tiny":
        return TINY_DIR
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"{path}: tokenizer path does not exist")
    return path


def _missing_packages() -> list[str]:
    missing = []
    for module, package in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(package)
    return missing


def _conversion_error(shown: Path, e: Exception, *, tmp: Path | None = None) -> ConfigError:
    msg = str(e)
    if tmp is not None:
        msg = msg.replace(str(tmp / "tokenizer.model"), str(shown)).replace(str(tmp), str(shown))
    # transformers 5.23 without protobuf falls back to a tiktoken reader and reports
    # "tiktoken is required", which sends users the wrong way (DESIGN §7).
    missing = _missing_packages()
    if missing and (isinstance(e, ImportError) or "tiktoken" in msg.lower()):
        return ConfigError(
            f"{shown}: cannot convert this SentencePiece tokenizer: it needs the 'sentencepiece' "
            f"and 'protobuf' packages ({', '.join(missing)} missing: pip install {' '.join(missing)})"
        )
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    return ConfigError(
        f"{shown}: not a usable tokenizer ({lines[0] if lines else type(e).__name__})"
    )


def _load_folder(path: Path, *, shown: Path | None = None) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as tf_logging

    shown = shown or path
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(
            f"{path}: not a tokenizer folder (no tokenizer.json, tokenizer.model or "
            "tokenizer_config.json)"
        )
    converted = (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file()
    previous = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()  # its fallback warnings would precede our one-line error
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False, use_fast=True
        )
        if converted:
            _restore_dummy_prefix(tok, path / "tokenizer.model")
        return tok
    except Exception as e:  # transformers raises OSError/ValueError/ImportError/... here
        raise _conversion_error(shown, e, tmp=None if shown == path else path) from None
    finally:
        tf_logging.set_verbosity(previous)


def _restore_dummy_prefix(tok: Any, model_file: Path) -> None:
    """Give a converted SentencePiece tokenizer back its dummy "▁" prefix, per text chunk.

    transformers 5.23 converts a bare Llama-2 ``tokenizer.model`` (no tokenizer.json/config) with
    no dummy prefix at all: "<s>[INST]" encodes as '[' (29961), and "</s>USER:" as 'USER' pieces
    without '▁'. SentencePiece (add_dummy_prefix=true), Meta's reference code, FastChat and
    MindFormers (which encode each turn separately) and the hub's Llama-2 tokenizer.json all put
    '▁' at the start of every chunk of text, i.e. also right after a special token: '▁[' (518).
    Measured on ../shared/tokenizers/llama2: with the Prepend below our ids equal
    ``sentencepiece.encode`` of each chunk.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import decoders, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if not proto.normalizer_spec.add_dummy_prefix:
        return
    backend = tok.backend_tokenizer
    state = json.loads(backend.to_str())
    described = json.dumps([state.get("normalizer"), state.get("pre_tokenizer")])
    if "Prepend" in described or "Metaspace" in described:
        return  # the conversion already handles the prefix
    prepend = normalizers.Prepend("\u2581")
    backend.normalizer = (
        prepend
        if backend.normalizer is None
        else normalizers.Sequence([prepend, backend.normalizer])
    )
    # ... and decoding drops that one leading space again, as SentencePiece's decode does.
    strip = decoders.Strip(content=" ", left=1, right=0)
    backend.decoder = (
        strip if backend.decoder is None else decoders.Sequence([backend.decoder, strip])
    )


def _load_sentencepiece_file(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the tokenizer file ({e.strerror})") from None
    if head[:1] != b"\n":  # a serialized SentencePiece ModelProto starts with field 1 (pieces)
        raise ConfigError(f"{path}: not a SentencePiece model file")
    # Load it exactly as a folder holding it would load (same conversion, same class), so the
    # content hash is the same whichever way the user points at it.
    with tempfile.TemporaryDirectory(prefix="sftdata-spm-") as tmp:
        (Path(tmp) / "tokenizer.model").symlink_to(path.resolve())
        tok = _load_folder(Path(tmp), shown=path)
    tok.name_or_path = str(path)
    return tok


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from ``"tiny"``, a local HF folder or a SentencePiece ``.model`` file.

    Raises:
        ConfigError: one line naming the path: it does not exist, is not a tokenizer, needs
            missing packages, or only a slow (offset-less) tokenizer could be built.
    """
    path = _resolve(spec)
    if path.is_dir():
        tok = _load_folder(path)
    elif path.suffix == ".model":
        tok = _load_sentencepiece_file(path)
    elif path.name == "tokenizer.json" or path.name == "tokenizer_config.json":
        tok = _load_folder(path.parent)
    else:
        raise ConfigError(
            f"{path}: not a tokenizer (expected a folder with tokenizer.json or tokenizer.model, "
            "or a SentencePiece .model file)"
        )
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise ConfigError(
            f"{path}: only a slow tokenizer could be built ({type(tok).__name__}); label masks "
            "need a fast tokenizer with character offsets"
        )
    return tok


def _pad_token_id(tok: Any) -> int | None:
    for tid in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if tid is not None:
            return int(tid)
    return None


def tokenizer_identity(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    """A path-independent identity: name, class, vocab size, content sha256 and special ids.

    The hash covers the serialized Rust tokenizer (vocabulary, merges, normalizer, pre-tokenizer,
    added tokens), the special-token map and the chat template, so the same tokenizer loaded from
    two places hashes the same and any change that alters encodings changes it.
    """
    backend = json.loads(tok.backend_tokenizer.to_str())
    specials = {k: str(v) for k, v in sorted(tok.special_tokens_map.items()) if isinstance(v, str)}
    payload = {
        "backend": backend,
        "special_tokens": specials,
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    where = Path(str(getattr(tok, "name_or_path", "") or ""))
    # "llama2/tokenizer.model" and "llama2/" both name the tokenizer "llama2".
    name = where.parent.name if where.stem == "tokenizer" else where.name
    return {
        "name": name or type(tok).__name__,
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": _pad_token_id(tok),
    }
