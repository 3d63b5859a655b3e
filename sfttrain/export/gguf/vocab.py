"""The tokenizer as GGUF keys: vocabulary, token types, merges or scores, special ids, template.

Two tokenizer kinds are written, the two llama.cpp tokenizes natively:

- byte-level BPE (GPT-2, Qwen2, Llama 3 style; ``tokenizer.ggml.model = gpt2``): tokens and merges
  as ``tokenizer.json`` holds them, plus the pre-tokenizer by the name llama.cpp knows its split
  rule under (``tokenizer.ggml.pre``). The name is read off the ``pre_tokenizer`` section; a rule
  llama.cpp has no name for is refused, since a wrong name silently changes every tokenization.
- SentencePiece BPE with byte fallback (Llama 2, Mistral; ``tokenizer.ggml.model = llama``):
  llama.cpp merges the highest-scoring adjacent pair first, which is what the HF merge list
  encodes by rank, so each token's score is minus the rank of the merge that makes it.

Rows past the tokenizer's last id (embeddings padded to a round size) are written as unused
``[PAD{i}]`` tokens so the vocabulary has one entry per embedding row, as llama.cpp requires.
"""

from __future__ import annotations

import json
from typing import Any

from sftdata.errors import ModelError

# The split rules llama.cpp implements, by its name for each (src/llama-vocab.cpp). Only the
# regex tells two byte-level BPE tokenizers apart: Llama 3 groups digits by three, Qwen2 by one.
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_RULES = {
    _LETTERS + r"\p{N}{1,3}|" + _REST: "llama-bpe",
    _LETTERS + r"\p{N}|" + _REST: "qwen2",
}


def _kind(backend: dict[str, Any], *, where: str) -> str:
    model = backend.get("model") or {}
    decoder = (backend.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        return "bpe"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "spm"
    raise ModelError(
        f"{where}: a {model.get('type')} tokenizer cannot be written to GGUF; supported: "
        "byte-level BPE (GPT-2/Qwen2/Llama 3) and SentencePiece BPE with byte fallback (Llama 2/Mistral)"
    )


def bpe_pre(backend: dict[str, Any], *, where: str) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's split rule."""
    pre = backend.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise ModelError(
                f"{where}: a ByteLevel pre-tokenizer with add_prefix_space is not supported"
            )
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (
        isinstance(steps, list)
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
    ):
        rule = (steps[0].get("pattern") or {}).get("Regex")
        if rule in SPLIT_RULES:
            return SPLIT_RULES[rule]
    raise ModelError(
        f"{where}: tokenizer.json's pre_tokenizer is not a split rule llama.cpp knows by name "
        f"(supported: gpt-2, {', '.join(sorted(SPLIT_RULES.values()))})"
    )


def _merges(backend: dict[str, Any]) -> list[str]:
    merges = backend["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def vocab_entries(tok: Any, rows: int, *, where: str) -> dict[str, Any]:
    """Everything GGUF says about the tokenizer, as plain values (tested without a writer).

    Keys: model, pre, tokens, types, scores (spm) or merges (bpe), and the special ids.
    """
    from gguf import TokenType

    backend = json.loads(tok.backend_tokenizer.to_str())
    kind = _kind(backend, where=where)
    size = len(tok)
    if size > rows:
        raise ModelError(
            f"{where}: the tokenizer has {size} tokens but the model only {rows} embedding rows"
        )
    added = tok.added_tokens_decoder
    engine = tok.backend_tokenizer
    tokens: list[str] = []
    types: list[int] = []
    for i in range(rows):
        text = engine.id_to_token(i) if i < size else None
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif kind == "spm" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(TokenType.NORMAL)
    out: dict[str, Any] = {"tokens": tokens, "types": types}
    merges = _merges(backend)
    if kind == "bpe":
        out.update(model="gpt2", pre=bpe_pre(backend, where=where), merges=merges)
    else:
        out.update(model="llama", pre="default", scores=_scores(tokens, merges))
        if tok.unk_token_id is not None:
            types[tok.unk_token_id] = TokenType.UNKNOWN
    out.update(_special_ids(tok))
    return out


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Minus the rank of the merge that makes each token; tokens no merge makes score below all."""
    rank = {a + b: r for r, (a, _, b) in enumerate(m.partition(" ") for m in merges)}
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def _special_ids(tok: Any) -> dict[str, Any]:
    from sftdata.tokenizer import stop_tokens

    probe_plain = tok("a", add_special_tokens=False)["input_ids"]
    probe = tok("a")["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    out: dict[str, Any] = {
        "bos": bos,
        "eos": eos,
        "unk": tok.unk_token_id,
        "pad": tok.pad_token_id,
        "add_bos": bos is not None and probe[:1] == [bos] and probe_plain[:1] != [bos],
        "add_eos": eos is not None and probe[-1:] == [eos] and probe_plain[-1:] != [eos],
    }
    # A second stop token (generation_config's eos list: Llama 3's <|eot_id|>, ...) is the
    # end-of-turn one; llama.cpp stops on eos and eot both.
    others = [tok.convert_tokens_to_ids(t) for t in stop_tokens(tok) if t != tok.eos_token]
    out["eot"] = others[0] if others else None
    template = tok.chat_template
    out["chat_template"] = template if isinstance(template, str) else None
    return out


def write_vocab(writer: Any, entries: dict[str, Any]) -> None:
    """Add ``vocab_entries``' values to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(entries["model"])
    writer.add_tokenizer_pre(entries["pre"])
    writer.add_token_list(entries["tokens"])
    writer.add_token_types(entries["types"])
    if "scores" in entries:
        writer.add_token_scores(entries["scores"])
    if entries.get("merges"):
        writer.add_token_merges(entries["merges"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
        ("eot", writer.add_eot_token_id),
    ):
        if entries.get(key) is not None:
            add(entries[key])
    writer.add_add_bos_token(entries["add_bos"])
    writer.add_add_eos_token(entries["add_eos"])
    if entries.get("chat_template"):
        writer.add_chat_template(entries["chat_template"])


__all__ = ["SPLIT_RULES", "bpe_pre", "vocab_entries", "write_vocab"]
