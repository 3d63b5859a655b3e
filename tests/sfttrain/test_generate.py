"""`sfttrain generate`: the training chat template plus a generation prompt; greedy is deterministic."""

from __future__ import annotations

from click.testing import CliRunner

from sftdata.tokenizer import load_tokenizer
from sfttrain.cli import main
from sfttrain.generate import render_prompt
from tests.sfttrain_helpers import small_model_dir


def test_prompt_uses_the_chat_template_with_a_generation_prompt() -> None:
    tok = load_tokenizer("tiny")
    text = render_prompt(tok, [{"role": "user", "content": "Hi?"}])
    assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    alpaca = render_prompt(tok, [{"role": "user", "content": "Hi?"}], template="alpaca")
    assert alpaca != text and alpaca.rstrip().endswith("### Response:")
    assert (
        render_prompt(tok, [{"role": "user", "content": "Hi?"}], template="llama2")
        .rstrip()
        .endswith("[/INST]")
    )


def test_greedy_generation_is_deterministic(tmp_path) -> None:
    model = small_model_dir(tmp_path / "m")
    args = [
        "generate",
        "--model",
        str(model),
        "--prompt",
        "What is 2 plus 2?",
        "--max-new-tokens",
        "8",
    ]
    a, b = CliRunner().invoke(main, args), CliRunner().invoke(main, args)
    assert a.exit_code == 0, a.output
    assert a.output == b.output and a.output.strip()
    bad = CliRunner().invoke(main, [*args, "--template", "nope"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and bad.output.count("\n") == 1
