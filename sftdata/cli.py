"""`sftdata`: the data half of sftpipe. Commands live one per module in ``sftdata.commands``."""

from __future__ import annotations

import click

from sftdata import __version__
from sftdata.clickutil import SftGroup, register_commands


@click.group(cls=SftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sftdata")
def main() -> None:
    """Convert, validate, pack, inspect and export supervised fine-tuning data."""


register_commands(main, "sftdata.commands")
