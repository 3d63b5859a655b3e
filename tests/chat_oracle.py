"""An oracle for C2 written independently of ``sftdata.render``: transformers'
``apply_chat_template`` renders of conversation prefixes, mapped through the offsets of ONE
tokenization of each sample's text.

For each trained assistant turn ``i`` of the messages a template sees:

- its start is the end of ``apply_chat_template(messages[:i], add_generation_prompt=True)``;
- ``apply_chat_template(messages[:i+1])`` is what the turn renders as when it is the last; the turn
  ends through the first stop token after its start (tokenizer EOS, the generation config's EOS
  ids, the template's end-of-turn: the special token it writes right after a reply), or, when the
  template writes none inside the turn, through a stop token that opens the next turn;
- where the whole conversation's render holds the turn exactly so, it is trained there; otherwise
  the turn is a sample of its own (the prefix through the turn).

Tokenizers for real families are built here from the Llama-2 SentencePiece model plus the family's
special tokens (``family_tokenizer``), and the real templates are read from the installed ``trl``
package (``trl_templates``); nothing is copied into the project.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

DATE = datetime(2024, 1, 1)  # sftdata's default --template-date

# bos, eos, generation_config eos tokens, extra specials: as the real models of each family set
# them (tokenizer_config.json / generation_config.json of their Hub folders).
FAMILIES: dict[str, tuple[str | None, str, list[str], list[str]]] = {
    "cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", ["<|END_OF_TURN_TOKEN|>"], []),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ["<｜end▁of▁sentence｜>"], []),
    "diffusion_gemma": ("<bos>", "<eos>", ["<eos>", "<turn|>"], []),
    "gemma4": ("<bos>", "<eos>", ["<eos>", "<turn|>"], []),
    "gemma": ("<bos>", "<eos>", ["<eos>", "<end_of_turn>"], []),
    "glm4": (
        None,
        "<|endoftext|>",
        ["<|endoftext|>", "<|user|>", "<|observation|>"],
        ["[gMASK]", "<sop>"],
    ),
    "gptoss": (
        "<|startoftext|>",
        "<|return|>",
        ["<|return|>", "<|endoftext|>", "<|call|>"],
        ["<|endoftext|>"],
    ),
    "idefics3": ("<|begin_of_text|>", "<end_of_utterance>", ["<end_of_utterance>"], []),
    "lfm2": ("<|startoftext|>", "<|im_end|>", ["<|im_end|>"], []),
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        ["<|end_of_text|>", "<|eom_id|>"],
    ),
    "llava": ("<s>", "</s>", ["</s>"], []),
    "muse": (None, "<|eot|>", ["<|eot|>", "<|eom|>"], []),
    "nemotron": ("<s>", "<|im_end|>", ["<|im_end|>"], []),
    "phi3": (
        "<s>",
        "<|endoftext|>",
        ["<|endoftext|>", "<|assistant|>", "<|end|>"],
        ["<|endoftext|>"],
    ),
    "qwen": (None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"], ["<|endoftext|>"]),
    "smolvlm": ("<|im_start|>", "<end_of_utterance>", ["<end_of_utterance>"], []),
}
SPECIAL_RE = re.compile(
    r"<\|[A-Za-z0-9_]+\|>|<｜[^｜]+｜>|<[a-z_]+_of_[a-z_]+>|<\|[a-z_]+>|<[a-z_]+\|>|"
    r"\[/?[A-Z_]+\]|</?think>|</?tool_call>|</?tool_response>"
)


def family_of(name: str) -> tuple[str | None, str, list[str], list[str]]:
    for prefix, spec in FAMILIES.items():
        if name.startswith(prefix):
            return spec
    raise KeyError(f"no tokenizer family for template {name}")


def trl_templates() -> dict[str, str]:
    """Every chat template trl ships as a data file, by file stem."""
    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.jinja"))}


def family_tokenizer(
    base: Any, folder: Path, template: str, family: tuple[str | None, str, list[str], list[str]]
) -> Path:
    """Save Llama-2 + the family's specials + ``template`` as a model folder; return it."""
    import copy

    bos, eos, gen_eos, extra = family
    tok = copy.deepcopy(base)
    specials = sorted(
        {*SPECIAL_RE.findall(template), *extra, eos, *gen_eos, *([bos] if bos else [])}
    )
    specials = [s for s in specials if s not in ("<s>", "</s>", "<unk>")]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token = bos
    tok.eos_token = eos
    tok.pad_token = eos
    tok.chat_template = template
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    ids = [tok.convert_tokens_to_ids(t) for t in gen_eos]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return folder


class _PinnedDatetime(datetime):
    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        return DATE


def _render(tok: Any, msgs: list[dict[str, Any]], tools: Any, gen: bool) -> str:
    import transformers.utils.chat_template_utils as ctu

    # transformers' strftime_now reads datetime.now(): pinned to sftdata's default date.
    ctu.datetime = _PinnedDatetime  # type: ignore[misc]
    return tok.apply_chat_template(
        msgs,
        tools=tools,
        tokenize=False,
        add_generation_prompt=gen,
        date_string=DATE.strftime("%d %b %Y"),
    )


def stop_strings(tok: Any, folder: Path) -> list[str]:
    """EOS, the generation config's EOS ids, and the special token after a probe reply."""
    stops = [tok.eos_token]
    cfg = json.loads((folder / "generation_config.json").read_text())
    stops += [tok.convert_ids_to_tokens(i) for i in cfg["eos_token_id"]]
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "xyzzy"}]
    try:
        text = _render(tok, probe, None, False)
    except Exception:
        text = ""
    if "xyzzy" not in text:
        text = _render(
            tok,
            [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in probe],
            None,
            False,
        )
    rest = text[text.index("xyzzy") + 5 :].lstrip()
    for t in sorted(tok.all_special_tokens, key=len, reverse=True):
        if t and rest.startswith(t):
            stops.append(t)
            break
    return [s for s in dict.fromkeys(stops) if s]


def _first_stop(text: str, start: int, end: int, stops: list[str]) -> int | None:
    best = None
    for s in stops:
        k = text.find(s, start, end)
        if k >= 0 and (best is None or k < best[0] or (k == best[0] and len(s) > best[1])):
            best = (k, len(s))
    return None if best is None else best[0] + best[1]


def expected_samples(
    tok: Any,
    msgs: list[dict[str, Any]],
    tools: Any,
    trained: list[bool],
    stops: list[str],
) -> tuple[list[tuple[str, list[tuple[int, int]]]], bool]:
    """(text, trained character spans) of each sample the record must give, whole record first,
    and whether a turn's generation prompt is not a prefix of its own render (DeepSeek-R1's
    prompt opens ``<think>`` that its render of the turn drops): such a turn is trained from where
    its render departs from the prompt."""
    full = _render(tok, msgs, tools, False)
    spans: list[tuple[int, int]] = []
    own: list[tuple[str, list[tuple[int, int]]]] = []
    located = False
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not trained[i]:
            continue
        prompt = _render(tok, msgs[:i], tools, True) if i else ""
        turn = _render(tok, msgs[: i + 1], tools, False)
        s = len(prompt)
        if not turn.startswith(prompt):
            located = True  # trained from where the turn's render departs from its prompt
            pairs = zip(prompt, turn, strict=False)
            s = next((k for k, (x, y) in enumerate(pairs) if x != y), min(len(prompt), len(turn)))
        e = _first_stop(turn, s, len(turn), stops)
        if e is None and full.startswith(turn):
            j = len(turn)
            while j < len(full) and full[j].isspace():
                j += 1
            e = next((j + len(x) for x in stops if full.startswith(x, j)), None)
        if e is None:
            e = max(len(turn.rstrip()), s)
        if full.startswith(turn[:e]) and (not spans or s >= spans[-1][1]):
            spans.append((s, e))
        else:
            own.append((turn[:e], [(s, e)]))
    return [(full, spans), *own], located


def text_of(m: dict[str, Any]) -> str:
    """A template message's text (string content or the text of its parts)."""
    c = m.get("content")
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c or ""


def rendered_texts(tok: Any, msgs: list[dict[str, Any]], tools: Any) -> list[str]:
    """The whole render and each render ending on an assistant turn (what training can see)."""
    out = [_render(tok, msgs, tools, False)]
    out += [
        _render(tok, msgs[: i + 1], tools, False)
        for i, m in enumerate(msgs)
        if m["role"] == "assistant"
    ]
    return out


def token_mask(tok: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], np.ndarray]:
    """Ids of one tokenization of ``text`` and the tokens overlapping a span."""
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    mask = np.zeros(len(enc.ids), dtype=bool)
    for k, (a, b) in enumerate(enc.offsets):
        b = max(b, a + 1)
        mask[k] = any(a < e and s < b for s, e in spans)
    return enc.ids, mask
