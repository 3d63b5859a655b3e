"""Sample a reply: the prompt rendered with the training chat template plus the generation prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sfttrain.model import load_for_inference


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], *, template: str = "auto") -> str:
    """The chat-template text of ``messages`` followed by the assistant's generation prompt.

    Resolves ``template`` exactly as ``sftdata pack`` does (``sftdata.templates.load_template``:
    auto, chatml, llama2, alpaca, fastchat:NAME, FILE.jinja), so generation sees the layout the
    model trained on.
    """
    from sftdata.templates import load_template

    specials = {
        k: getattr(tokenizer, k, None) or ""
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    _, _, backend = load_template(str(template), tokenizer, specials=specials)
    return backend.render(messages, None, True)


def generate(
    model: str | Path,
    *,
    prompts: list[str],
    adapter: str | Path | None = None,
    system: str | None = None,
    template: str = "auto",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """The model's reply to each prompt (greedy when ``temperature`` is 0, so deterministic).

    The model is loaded once; prompts run one by one (no padding, so no attention-mask subtleties).
    """
    import torch

    lm, tokenizer = load_for_inference(model, adapter=adapter)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    replies = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        text = render_prompt(tokenizer, messages, template=template)
        # Packing tokenizes rendered text without adding special tokens (the template holds them).
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        torch.manual_seed(seed)
        with torch.no_grad():
            out = lm.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
                **kwargs,
            )
        replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return replies


__all__ = ["generate", "render_prompt"]
