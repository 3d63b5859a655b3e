"""Model folders on the real vocabularies of ../shared/tokenizers (Qwen2, Llama 3, Phi-3), as the
released models ship them: their chat template, EOS and ``generation_config.json``.

The shared folders are the vocabularies of the GGUF files llama.cpp keeps (see
../shared/data/README.md): Qwen2's has placeholders (``[PAD151657]``) where Qwen2.5 and Qwen3 name
their extra tokens, Llama 3's has ``<|reserved_special_token_N|>`` where Llama 3.1 names
``<|eom_id|>`` and ``<|python_tag|>``. The names below are those models' own (their
``tokenizer_config.json`` on the Hub), at the same ids, so the folders written here are those
models' tokenizers; every id of the vocabulary is the real model's. Nothing is copied into the
project: the folders are written under a test's temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

# id -> (name, special) as Qwen2.5-Instruct declares them; Qwen3 adds four more.
QWEN25 = {
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False),
    151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False),
    151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False),
    151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
}
QWEN3 = {
    **QWEN25,
    151665: ("<tool_response>", False),
    151666: ("</tool_response>", False),
    151667: ("<think>", False),
    151668: ("</think>", False),
}
LLAMA31 = {
    128004: ("<|finetune_right_pad_id|>", True),
    128008: ("<|eom_id|>", True),
    128010: ("<|python_tag|>", True),
}


def model_folder(
    shared_tokenizers: Path,
    root: Path,
    vocab: str,
    *,
    names: dict[int, tuple[str, bool]] | None = None,
    template: str | None = None,
    eos: str | None = None,
    generation_eos: list[int] | None = None,
) -> Path:
    """A tokenizer folder under ``root``: the shared ``vocab`` with its added tokens renamed by
    ``names`` (id -> (name, special)), ``template`` as its chat template (None: the folder's own,
    if any), ``eos`` as its EOS token (None: the folder's) and a ``generation_config.json`` with
    ``generation_eos`` (None: no such file)."""
    src = shared_tokenizers / vocab
    tag = json.dumps([vocab, sorted(names or {}), template, eos, generation_eos], sort_keys=True)
    folder = root / f"{vocab}-{hashlib.sha256(tag.encode()).hexdigest()[:12]}"
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    state = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab_map = state["model"]["vocab"]
    by_id = {v: k for k, v in vocab_map.items()}
    for t in state["added_tokens"]:
        if t["id"] in (names or {}):
            name, special = names[t["id"]]  # type: ignore[index]
            if by_id.get(t["id"]) == t["content"]:
                del vocab_map[t["content"]]
                vocab_map[name] = t["id"]
            t["content"], t["special"] = name, special
    (folder / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    if eos is not None:
        config["eos_token"] = eos
    own = src / "chat_template.jinja"
    if template is not None:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif own.is_file():
        shutil.copyfile(own, folder / "chat_template.jinja")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation_eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return folder
