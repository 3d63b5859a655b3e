"""One click command per module, each exposing `command`; cli.py lists them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def sampling_options(*, max_new_tokens: int) -> Callable[[Any], Any]:
    """``--max-new-tokens``, ``--temperature``, ``--top-p`` and ``--seed``, as ``generate`` and
    ``chat`` both take them (``sfttrain.chat.Sampling`` holds the same four)."""
    options = [
        click.option("--max-new-tokens", default=max_new_tokens, show_default=True, type=click.IntRange(min=1)),
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
                     help="0 = greedy (deterministic)."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0.0, max=1.0)),
        click.option("--seed", default=0, show_default=True, help="Seed for sampling (temperature > 0)."),
    ]  # fmt: skip

    def apply(command: Any) -> Any:
        for option in reversed(options):  # decorators apply bottom-up: keep the listed order
            command = option(command)
        return command

    return apply


def model_options(
    *, required: bool = False, template: bool = False, note: str = ""
) -> Callable[[Any], Any]:
    """``--model`` (into ``model_spec``) and ``--adapter``, and with ``template`` the chat
    ``--template``: the model a command loads for inference (``eval``, ``generate``, ``chat``),
    with one help text; ``note`` adds what the command does without ``--model``."""
    options = [
        click.option("--model", "model_spec", metavar="PATH", required=required, default=None,
                     help=f"'tiny', a local HF model folder, or a checkpoint/adapter folder{note}."),
        click.option("--adapter", metavar="PATH", default=None,
                     help="LoRA adapter folder to apply on top of --model."),
    ]  # fmt: skip
    if template:
        options.append(click.option(
            "--template", metavar="NAME", default="auto", show_default=True,
            help="Chat template for --model: auto (the tokenizer's chat_template), a built-in name "
            "(chatml, qwen2.5, llama3, ...), a LLaMA-Factory name, fastchat:NAME or FILE.jinja: "
            "the one you packed with.",
        ))  # fmt: skip

    def apply(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def unverified_option(command: Any) -> Any:
    """``--allow-unverified``: the one way to use a checkpoint whose completion marker records no
    checksums (written before they were recorded); every other checkpoint is verified first."""
    return click.option(
        "--allow-unverified",
        is_flag=True,
        help="Use a checkpoint whose marker records no checksums (an old format); every other "
        "checkpoint is verified before it is read.",
    )(command)


def quiet_libraries() -> None:
    """transformers/peft chatter (save progress bars, advisory warnings) would bury the progress bar."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
