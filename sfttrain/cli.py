"""`sfttrain`: train, evaluate, sample and export; its commands (one module each in ``sfttrain.commands``)."""

from __future__ import annotations

import click

from sftdata import __version__
from sftdata.clickutil import SftGroup
from sfttrain.commands import chat, eval, export, generate, run


class TrainGroup(SftGroup):
    """``pip install sftpipe`` is the data half: without the ``train`` extra every command
    stops in one line naming it, before it reads anything (``--help`` pages still show)."""

    def invoke(self, ctx: click.Context):
        # the command line before click consumes it (click < 8.2 names it protected_args)
        args = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        if args and not {"-h", "--help"} & set(args):
            from sftdata.errors import SftError
            from sftdata.extras import require

            try:
                require("train", f"sfttrain {args[0]}")
            except SftError as e:
                raise click.ClickException(str(e)) from None
        return super().invoke(ctx)


@click.group(cls=TrainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sfttrain")
def main() -> None:
    """Fine-tune causal LMs on packed sftdata shards (full, LoRA, QLoRA; one or many GPUs)."""


# Every command (--help lists them by name); each module only wires library calls together.
for _module in (run, eval, generate, chat, export):
    main.add_command(_module.command)
