"""`sfttrain`: train, evaluate, sample and export; its commands (one module each in ``sfttrain.commands``)."""

from __future__ import annotations

import click

from sftdata import __version__
from sftdata.clickutil import SftGroup
from sfttrain.commands import chat, eval, export, generate, run


@click.group(cls=SftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sfttrain")
def main() -> None:
    """Fine-tune causal LMs on packed sftdata shards (full, LoRA, QLoRA; one or many GPUs)."""


# Every command (--help lists them by name); each module only wires library calls together.
for _module in (run, eval, generate, chat, export):
    main.add_command(_module.command)
