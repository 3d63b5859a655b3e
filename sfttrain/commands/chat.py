"""`sfttrain chat`: talk to a model in the terminal, several turns, replies streamed."""

from __future__ import annotations

import sys

import click

from sfttrain.commands import model_options, sampling_options, unverified_option

HELP = "/reset forgets the conversation, /system TEXT sets the system message, /exit leaves; Ctrl-C stops a reply."


@click.command("chat")
@model_options(template=True)
@click.option(
    "--gguf",
    "gguf_file",
    metavar="PATH",
    default=None,
    help="A .gguf file, run through llama.cpp (pip install 'sftpipe[gguf]').",
)
@click.option("--system", default=None, help="System message for the conversation.")
@sampling_options(max_new_tokens=512)
@unverified_option
def command(
    model_spec: str | None,
    adapter: str | None,
    gguf_file: str | None,
    system: str | None,
    template: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    allow_unverified: bool,
) -> None:
    """Chat with a model over several turns; each reply sees the whole conversation.

    \b
    Examples:
      sfttrain chat --model runs/r1/final
      sfttrain chat --gguf model-q8_0.gguf --temperature 0.7 --top-p 0.9
    """
    from sftdata.errors import ConfigError
    from sfttrain.chat import Chat, GGUFEngine, HFEngine, Sampling

    if (model_spec is None) == (gguf_file is None):
        raise ConfigError("give one of --model PATH or --gguf FILE")
    if gguf_file is not None and adapter is not None:
        raise ConfigError("--adapter applies to --model; merge it into the .gguf at export instead")
    if gguf_file is not None:
        engine = GGUFEngine(gguf_file)
        name = gguf_file
    else:
        from sfttrain.commands import quiet_libraries

        quiet_libraries()
        from sfttrain.checkpoint import verify_before_use
        from sfttrain.model import load_for_inference

        verify_before_use(model_spec, adapter, allow_unverified=allow_unverified)

        lm, tokenizer = load_for_inference(model_spec, adapter=adapter)
        engine = HFEngine(lm, tokenizer, template=template)
        name = model_spec
    sampling = Sampling(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
    )
    try:
        converse(Chat(engine, sampling=sampling, system=system), name)
    finally:
        if gguf_file is not None:
            engine.close()


def converse(chat, name: str) -> None:
    """The read-reply loop on the terminal."""
    import signal

    # Ctrl-C must stop a reply even where this process was started with SIGINT ignored (a
    # process inherits that across exec, and Python then installs no handler for it: seen
    # under a test runner's worker; shells do it for background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    click.echo(f"Chatting with {name}. {HELP}")
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\n(/exit or Ctrl-D leaves)")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return
        if line == "/reset":
            chat.reset()
            click.echo("(conversation cleared)")
            continue
        if line == "/system" or line.startswith("/system "):
            chat.set_system(line[len("/system") :].strip())
            click.echo(
                f"(system message {'set' if chat.system else 'removed'}; conversation cleared)"
            )
            continue
        if line.startswith("/"):
            click.echo(f"(unknown command {line.split()[0]}; {HELP})")
            continue
        reply = chat.send(line)
        try:
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        finally:
            reply.close()
        click.echo()
