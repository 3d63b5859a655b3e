"""`sfttrain generate`: render the chat template around a prompt and sample a reply."""

from __future__ import annotations

import click

from sfttrain.commands import model_options, sampling_options, unverified_option


@click.command("generate")
@model_options(required=True, template=True)
@click.option(
    "--prompt",
    "prompts",
    required=True,
    multiple=True,
    help="The user message (repeat for several; the model loads once).",
)
@click.option("--system", default=None, help="Optional system message.")
@sampling_options(max_new_tokens=64)
@unverified_option
def command(
    model_spec: str,
    adapter: str | None,
    prompts: tuple[str, ...],
    system: str | None,
    template: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    allow_unverified: bool,
) -> None:
    """Print MODEL's reply to each PROMPT, rendered with the same chat template as training.

    \b
    Examples:
      sfttrain generate --model runs/r1/final --prompt "What is the capital of France?"
    """
    from sfttrain.commands import quiet_libraries

    quiet_libraries()
    from sfttrain.checkpoint import verify_before_use
    from sfttrain.generate import generate

    verify_before_use(model_spec, adapter, allow_unverified=allow_unverified)

    replies = generate(
        model_spec,
        adapter=adapter,
        prompts=list(prompts),
        system=system,
        template=template,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    if len(prompts) == 1:
        click.echo(replies[0])
        return
    for prompt, reply in zip(prompts, replies, strict=True):
        click.echo(f"Q: {prompt}\nA: {reply}")
