"""`sftdata`: the data half of sftpipe; its commands (one module each in ``sftdata.commands``)."""

from __future__ import annotations

import click

from sftdata import __version__
from sftdata.clickutil import SftGroup
from sftdata.commands import audit, convert, export, inspect, pack, stats, validate


@click.group(cls=SftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sftdata")
def main() -> None:
    """Convert, validate, pack, inspect and export supervised fine-tuning data."""


# Every command (--help lists them by name); each module only wires library calls together.
for _module in (convert, validate, pack, inspect, stats, export, audit):
    main.add_command(_module.command)
