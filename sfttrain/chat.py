"""A multi-turn chat with a model: the whole history rendered by the chat template each turn,
the reply streamed as it is generated.

Two engines, one interface (``stream(messages) -> pieces of text``): ``HFEngine`` runs a
transformers model (a checkpoint, a merged export, ``tiny``) with its KV cache, token by token;
``GGUFEngine`` runs a ``.gguf`` file through llama.cpp (``llama-cpp-python``), which renders the
chat template stored in the file. ``Chat`` keeps the history and the system message.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sftdata.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How each reply is sampled."""

    temperature: float = 0.0
    """0 = greedy (deterministic); above 0 samples from the softened distribution."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this."""
    max_new_tokens: int = 512
    """Longest reply, in tokens."""
    seed: int = 0
    """Seed of the sampler (replies are reproducible for the same history)."""


class Engine(Protocol):
    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]: ...


class HFEngine:
    """A transformers causal LM: prompt = template(messages) + generation prompt, then one token
    at a time through the KV cache until a stop token or ``max_new_tokens``."""

    def __init__(self, model: Any, tokenizer: Any, *, template: str = "auto") -> None:
        from sftdata.tokenizer import stop_tokens

        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        ids = {tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(tokenizer)}
        self.stop_ids = {i for i in ids if isinstance(i, int)}

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        import torch

        from sfttrain.generate import render_prompt

        text = render_prompt(self.tokenizer, messages, template=self.template)
        # Packing tokenizes rendered text without adding special tokens (the template holds them).
        step = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        rng = torch.Generator().manual_seed(sampling.seed)
        past = None
        made: list[int] = []
        shown = ""
        with torch.no_grad():
            for _ in range(sampling.max_new_tokens):
                out = self.model(input_ids=step, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = pick(out.logits[0, -1], sampling, rng)
                if token in self.stop_ids:
                    return
                made.append(token)
                now = self.tokenizer.decode(made, skip_special_tokens=True)
                if not now.endswith("\ufffd"):  # hold back half of a multi-byte character
                    yield now[len(shown) :]
                    shown = now
                step = torch.tensor([[token]])


def pick(logits: Any, sampling: Sampling, rng: Any) -> int:
    """The next token: argmax at temperature 0, else a draw from the top-p nucleus."""
    import torch

    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the tokens ranked above
        ordered[before >= sampling.top_p] = 0.0  # the top token always stays (before == 0)
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=rng))


class GGUFEngine:
    """A ``.gguf`` file through llama.cpp; the template is the one stored in the file."""

    def __init__(self, path: str | Path, *, n_ctx: int = 0) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ConfigError(
                "--gguf runs the file through llama.cpp's Python binding; install it with "
                "pip install 'sftpipe[gguf]'"
            ) from None
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such .gguf file")
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"{path}: llama.cpp cannot load it ({e})") from None

    def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        # Only temperature and top-p shape the choice, as in HFEngine: llama.cpp's other
        # samplers (top-k 40, min-p 0.05, repeat penalty) are switched off.
        chunks = self.llm.create_chat_completion(
            messages=messages,
            stream=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
        )
        for chunk in chunks:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def close(self) -> None:
        """Free llama.cpp's model now (its finaliser fails if left to interpreter exit)."""
        self.llm.close()


class Chat:
    """The conversation so far; ``send`` streams the reply and keeps it (or the part shown,
    when the reader stops it) in the history."""

    def __init__(self, engine: Engine, *, sampling: Sampling, system: str | None = None) -> None:
        self.engine = engine
        self.sampling = sampling
        self.system = system
        self.turns: list[dict[str, str]] = []

    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.turns = []

    def set_system(self, text: str | None) -> None:
        """A new system message starts a new conversation."""
        self.system = text or None
        self.reset()

    def send(self, text: str) -> Iterator[str]:
        """Pieces of the reply to ``text``; closing the iterator early keeps what was produced."""
        self.turns.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            for piece in self.engine.stream(self.messages, self.sampling):
                reply.append(piece)
                yield piece
        finally:
            if reply:
                self.turns.append({"role": "assistant", "content": "".join(reply).strip()})
            else:
                self.turns.pop()  # nothing was said: the question is withdrawn too


__all__ = ["Chat", "Engine", "GGUFEngine", "HFEngine", "Sampling", "pick"]
