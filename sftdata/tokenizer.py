"""Load tokenizers from local files only, and identify them by content.

``load_tokenizer`` accepts ``"tiny"`` (the project's own byte-level BPE in ``sftdata/tiny``), a
local Hugging Face tokenizer folder (``tokenizer.json``, or a ``tokenizer.model`` that transformers
converts) or a bare SentencePiece ``.model`` file. It always returns a *fast* tokenizer, because the
label masks are computed from the Rust tokenizer's character offsets. Nothing is ever fetched from a
model hub and no remote code runs.

``sftdata.tokenizer_cache.load_snapshot`` gives what rendering and packing need and caches it, so that
only the first pack with a tokenizer pays for importing ``transformers`` and converting a
SentencePiece model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftdata import TINY_DIR
from sftdata.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def resolve_spec(spec: str | Path) -> Path:
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
    # "tiktoken is required", which sends users the wrong way (README, "Set-up").
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


def _import_transformers(cls: str | None = None) -> Any:
    """``transformers.AutoTokenizer``, or the tokenizer class ``cls`` names
    (:func:`tokenizer_class`), imported without transformers' advisory that PyTorch is missing
    (the data half never needs it: ``pip install sftpipe`` has no torch)."""
    quiet = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
    before = os.environ.get(quiet)
    os.environ[quiet] = "1"
    try:
        if cls is not None:
            return _named_class(cls)
        from transformers import AutoTokenizer
    finally:
        if before is None:
            os.environ.pop(quiet, None)
        else:
            os.environ[quiet] = before
    return AutoTokenizer


def tokenizer_class(tok: Any) -> str:
    """``module:qualname`` of a transformers tokenizer's class (for :func:`load_tokenizer`'s
    ``cls``)."""
    return f"{type(tok).__module__}:{type(tok).__qualname__}"


def _named_class(name: str) -> Any:
    """The transformers tokenizer class :func:`tokenizer_class` named (a name outside
    transformers is refused before anything is imported)."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    module, _, qualname = name.partition(":")
    found = None
    if module == "transformers" or module.startswith("transformers."):
        with contextlib.suppress(ImportError, AttributeError):
            found = getattr(importlib.import_module(module), qualname)
    if not (isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase)):
        raise ConfigError(f"{name}: not a transformers tokenizer class")
    return found


def _load_folder(path: Path, *, shown: Path | None = None, cls: str | None = None) -> Any:
    # The class AutoTokenizer would pick, when known, is loaded directly: AutoTokenizer's model
    # registry imports torch, most of the time a load takes.
    loader = _import_transformers(cls)
    from transformers.utils import logging as tf_logging

    shown = shown or path
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{path}: not a tokenizer folder (no tokenizer.json, tokenizer.model or "
            "tokenizer_config.json)"
        )
    converted = (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file()
    previous = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()  # its fallback warnings would precede our one-line error
    try:
        if cls is None:
            tok = loader.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False, use_fast=True
            )
        else:  # the call AutoTokenizer makes once it has picked the class
            tok = loader.from_pretrained(str(path), local_files_only=True)
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


def _load_sentencepiece_file(path: Path, cls: str | None = None) -> Any:
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
        tok = _load_folder(Path(tmp), shown=path, cls=cls)
    tok.name_or_path = str(path)
    return tok


def load_tokenizer(spec: str | Path, *, cls: str | None = None) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from ``"tiny"``, a local HF folder or a SentencePiece ``.model`` file.

    ``cls``: the class ``AutoTokenizer`` picks for it (:func:`tokenizer_class` of an earlier
    load, e.g. :attr:`TokenizerSnapshot.tokenizer_class`), loaded directly: the same tokenizer,
    without importing torch.

    Raises:
        ConfigError: one line naming the path: it does not exist, is not a tokenizer, needs
            missing packages, or only a slow (offset-less) tokenizer could be built.
    """
    path = resolve_spec(spec)
    if path.is_dir():
        tok = _load_folder(path, cls=cls)
    elif path.suffix == ".model":
        tok = _load_sentencepiece_file(path, cls)
    elif path.name == "tokenizer.json" or path.name == "tokenizer_config.json":
        tok = _load_folder(path.parent, cls=cls)
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
    name = _folder_name(tok)
    if isinstance(tok, TokenizerSnapshot):
        return {"name": name or tok.identity["class"], **tok.identity}
    backend = json.loads(tok.backend_tokenizer.to_str())
    specials = {k: str(v) for k, v in sorted(tok.special_tokens_map.items()) if isinstance(v, str)}
    payload = {
        "backend": backend,
        "special_tokens": specials,
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return {
        "name": name or type(tok).__name__,
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": _pad_token_id(tok),
    }


def _folder_name(tok: Any) -> str:
    where = Path(str(getattr(tok, "name_or_path", "") or ""))
    # "llama2/tokenizer.model" and "llama2/" both name the tokenizer "llama2".
    return where.parent.name if where.stem == "tokenizer" else where.name


def tokenizer_name(tok: Any) -> str:
    """How messages name a tokenizer: its folder's (or file's) name."""
    return _folder_name(tok) or "the tokenizer"


STOP_SOURCES = ("eos", "generation_config", "template")
"""Where a stop token comes from: the tokenizer's EOS, an ``eos_token_id`` of the model folder's
``generation_config.json``, or the template's own end of turn (``sftdata.render``)."""


def stop_sources(tok: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The token strings that end a generation, each with where it comes from: the tokenizer's
    EOS (``eos``) and every ``eos_token_id`` of the model folder's ``generation_config.json``
    (``generation_config``; a list for Llama 3, Qwen, GLM, Phi-3, gpt-oss...), EOS first.

    A snapshot answers from what it stored; an unreadable or malformed generation config adds
    nothing (the tokenizer's EOS still stops).
    """
    if isinstance(tok, TokenizerSnapshot):
        return tok.stop_sources
    found: dict[str, list[str]] = {}
    if tok.eos_token:
        found[tok.eos_token] = ["eos"]
    where = Path(str(getattr(tok, "name_or_path", "") or ""))
    config = where / "generation_config.json"
    ids: Any = None
    with contextlib.suppress(OSError, ValueError, RecursionError, AttributeError):
        if config.is_file():
            ids = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    for i in ids if isinstance(ids, list) else []:
        ok = isinstance(i, int) and not isinstance(i, bool)
        text = tok.backend_tokenizer.id_to_token(i) if ok else None
        if text and "generation_config" not in found.setdefault(text, []):
            found[text].append("generation_config")
    return tuple((t, tuple(s)) for t, s in found.items())


def stop_tokens(tok: Any) -> tuple[str, ...]:
    """The token strings of :func:`stop_sources`: EOS plus the generation config's EOS ids."""
    return tuple(t for t, _ in stop_sources(tok))


_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


def max_length(tok: Any) -> int | None:
    """The longest sequence the tokenizer's model takes: the smaller of the tokenizer's
    ``model_max_length`` and ``max_position_embeddings`` in the folder's ``config.json``, where
    either is stated (transformers fills an unstated ``model_max_length`` with ~1e30)."""
    found = []
    n = getattr(tok, "model_max_length", None)
    if isinstance(n, int) and 0 < n < 1 << 40:
        found.append(n)
    config = Path(str(getattr(tok, "name_or_path", "") or "")) / "config.json"
    with contextlib.suppress(OSError, ValueError, AttributeError, RecursionError):
        if config.is_file():
            n = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                found.append(n)
    return min(found) if found else None


def compact_merges(backend_json: str) -> str:
    """A serialized ``tokenizers.Tokenizer`` with its BPE merges as ``"a b"`` strings rather than
    ``["a", "b"]`` pairs where no merged piece holds a space (where one does, only the pairs say
    where it splits): the same tokenizer (it serializes back to the same JSON), which
    ``Tokenizer.from_str`` builds faster (measured: a quarter less for Llama 3's 280k merges), a
    time every pack spends before its workers start."""
    d = json.loads(backend_json)
    model = d.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(isinstance(m, list) for m in merges):
        return backend_json
    if any(" " in a or " " in b for a, b in merges):
        return backend_json
    model["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(d, ensure_ascii=False)


@dataclass(frozen=True)
class TokenizerSnapshot:
    """What rendering, masking and packing need from a tokenizer, without ``transformers``.

    It answers the attributes :class:`sftdata.render.Renderer` and :func:`tokenizer_identity` use
    (``backend_tokenizer``, ``bos_token`` ..., ``chat_template``, ``name_or_path``) exactly as the
    full tokenizer it was taken from does.
    """

    backend_json: str
    """The Rust tokenizer serialized (``backend_tokenizer.to_str()``, :func:`compact_merges`)."""
    specials: dict[str, str | None]
    """bos/eos/unk/pad token strings (None where the tokenizer has none)."""
    chat_template: str | None
    """The tokenizer's own chat template, if any."""
    identity: dict[str, Any]
    """``tokenizer_identity`` of the full tokenizer, less its path-dependent ``name``."""
    stop_sources: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """:func:`stop_sources` of the full tokenizer (EOS and the generation config's EOS ids)."""
    name_or_path: str = ""
    """Where it was loaded from this time (names the tokenizer in the identity)."""
    max_length: int | None = None
    """:func:`max_length` of the full tokenizer (None: not stated)."""
    tokenizer_class: str = ""
    """:func:`tokenizer_class` of the full tokenizer: the class ``AutoTokenizer`` picked."""

    @classmethod
    def of(cls, tok: Any) -> TokenizerSnapshot:
        """Snapshot a full tokenizer from :func:`load_tokenizer`."""
        ident = tokenizer_identity(tok)
        ident.pop("name")
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        return cls(
            backend_json=compact_merges(tok.backend_tokenizer.to_str()),
            specials={k: getattr(tok, k) for k in _SPECIALS},
            chat_template=template,
            identity=ident,
            stop_sources=stop_sources(tok),
            name_or_path=str(getattr(tok, "name_or_path", "") or ""),
            max_length=max_length(tok),
            tokenizer_class=tokenizer_class(tok),
        )

    @cached_property
    def backend_tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` (built once, on first use)."""
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.backend_json)

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token string (None where the tokenizer has none)."""
        return self.specials.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token string (None where the tokenizer has none)."""
        return self.specials.get("eos_token")

    @property
    def unk_token(self) -> str | None:
        """The unknown token string (None where the tokenizer has none)."""
        return self.specials.get("unk_token")

    @property
    def pad_token(self) -> str | None:
        """The padding token string (None where the tokenizer has none)."""
        return self.specials.get("pad_token")
