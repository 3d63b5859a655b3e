"""`sfttrain chat`: driven through a pseudo-terminal as a person would type, and the history
rules of ``Chat`` with a scripted engine."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from sfttrain.chat import Chat, Sampling, pick
from sfttrain.generate import generate
from tests.sfttrain_helpers import subprocess_env

PROMPT = ">>> "


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _spawn(*args: str, timeout: float = 120, preexec_fn=None) -> pexpect.spawn:
    exe = str(Path(sys.executable).parent / "sfttrain")
    child = pexpect.spawn(
        exe, ["chat", *args], env=subprocess_env(), encoding="utf-8", timeout=timeout,
        preexec_fn=preexec_fn,
    )  # fmt: skip
    child.expect_exact(PROMPT)
    return child


def _reply(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect_exact(text)  # the terminal echoes what was typed
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n").strip()


def test_a_multi_turn_chat_in_a_terminal() -> None:
    """Greedy replies equal `generate`'s for the same history; /system and /reset change it."""
    child = _spawn("--model", "tiny", "--max-new-tokens", "12")
    first = _reply(child, "What is the capital of France?")
    assert (
        first == generate("tiny", prompts=["What is the capital of France?"], max_new_tokens=12)[0]
    )
    # the second turn sees the first: its reply differs from the question asked alone
    second = _reply(child, "And of Italy?")
    alone = generate("tiny", prompts=["And of Italy?"], max_new_tokens=12)[0]
    assert second != alone
    assert "conversation cleared" in _reply(child, "/reset")
    assert _reply(child, "And of Italy?") == alone
    assert "system message set" in _reply(child, "/system You are terse.")
    with_system = generate("tiny", prompts=["Hi"], system="You are terse.", max_new_tokens=12)[0]
    assert _reply(child, "Hi") == with_system
    assert "unknown command /nope" in _reply(child, "/nope")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def _endless_model(folder: Path) -> Path:
    """A small model whose only stop token is one it cannot produce: its tokenizer's EOS is a
    token past the model's output vocabulary (and the generation config names only it), so a
    reply never ends by itself."""
    import json

    from sftdata.tokenizer import load_tokenizer
    from tests.sfttrain_helpers import small_model_dir

    small_model_dir(folder, max_positions=1 << 16)
    tok = load_tokenizer(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    tok.add_special_tokens({"eos_token": "<|never|>"})
    assert tok.eos_token_id >= vocab
    tok.save_pretrained(folder)
    config = folder / "generation_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "eos_token_id": tok.eos_token_id})
    )
    return folder


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(tmp_path: Path, inherited: str) -> None:
    # "ignored": started with SIGINT ignored (inherited across exec, as from a test runner's
    # worker or a shell's background job), Ctrl-C must still stop the reply
    model = _endless_model(tmp_path / "endless")
    child = _spawn(
        "--model", str(model), "--max-new-tokens", "100000", "--temperature", "1.0",
        preexec_fn=_ignore_sigint if inherited == "ignored" else _default_sigint,
    )  # fmt: skip
    child.sendline("Tell me everything.")
    child.expect_exact("Tell me everything.")
    child.expect(r"\S{8}")  # some of the reply has streamed out
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_d_leaves_and_bad_options_are_one_line(tmp_path) -> None:
    child = _spawn("--model", "tiny")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    from tests.sfttrain_helpers import run_cli

    for args, words in (
        ((), "one of --model PATH or --gguf FILE"),
        (("--model", "tiny", "--gguf", "x.gguf"), "one of --model PATH or --gguf FILE"),
        (("--gguf", str(tmp_path / "none.gguf")), "no such .gguf file"),
    ):
        r = run_cli("chat", *args)
        assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr


class Scripted:
    """An engine that says the given words one piece at a time and records what it was shown."""

    def __init__(self, *replies: list[str]) -> None:
        self.replies = list(replies)
        self.seen: list[list[dict]] = []

    def stream(self, messages, sampling):
        self.seen.append([dict(m) for m in messages])
        yield from self.replies.pop(0)


def test_history_keeps_the_part_of_a_reply_that_was_shown() -> None:
    engine = Scripted(["Par", "is"], ["Ro", "me", " and more"], [])
    chat = Chat(engine, sampling=Sampling(), system="Be brief.")
    assert "".join(chat.send("France?")) == "Paris"
    stream = chat.send("Italy?")
    assert next(stream) + next(stream) == "Rome"
    stream.close()  # the reader stopped it (Ctrl-C)
    assert chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "Italy?"},
        {"role": "assistant", "content": "Rome"},
    ]
    assert list(chat.send("Spain?")) == []  # nothing said: the question is withdrawn
    assert len(chat.messages) == 5
    chat.set_system(None)
    assert chat.messages == []


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rng = torch.Generator().manual_seed(0)
    drawn = {pick(logits, Sampling(temperature=1.0, top_p=0.7), rng) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reach 0.7; the tail is never drawn
    drawn = {pick(logits, Sampling(temperature=1.0, top_p=1.0), rng) for _ in range(300)}
    assert drawn == {0, 1, 2, 3}
    assert pick(logits, Sampling(temperature=0.0), rng) == 0
    assert {pick(logits, Sampling(temperature=1.0, top_p=0.1), rng) for _ in range(50)} == {0}


def test_sampling_is_reproducible_for_a_seed() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))

    def draws(seed: int) -> list[int]:
        rng = torch.Generator().manual_seed(seed)
        return [pick(logits, Sampling(temperature=0.8, top_p=0.9), rng) for _ in range(20)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
