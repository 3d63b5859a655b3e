"""`sfttrain`: train, evaluate, sample and export. Commands live one per module in ``sfttrain.commands``."""

from __future__ import annotations

import click

from sftdata import __version__
from sftdata.clickutil import SftGroup, register_commands


@click.group(cls=SftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sfttrain")
def main() -> None:
    """Fine-tune causal LMs on packed sftdata shards (full, LoRA, QLoRA; one or many GPUs)."""


register_commands(main, "sfttrain.commands")
