"""Every ``--help`` page a user reads: an example that runs the command, one metavar per kind of
value, and ``--json`` wherever a summary is printed."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from sftdata.cli import main as sftdata_main
from sfttrain.cli import main as sfttrain_main

COMMANDS = [
    (prog, group, name)
    for prog, group in (("sftdata", sftdata_main), ("sfttrain", sfttrain_main))
    for name in group.commands
]
FREE_TEXT = {"system", "prompts"}
"""Options whose value is prose: TEXT is their metavar."""
CLICK_DEFAULTS = {"INTEGER", "INTEGER RANGE", "FLOAT", "FLOAT RANGE", "TEXT", "DIRECTORY", "FILE"}
PRINTS_A_SUMMARY = {("sftdata", n) for n in ("convert", "validate", "pack", "stats", "export")} | {
    ("sfttrain", n) for n in ("run", "eval", "export")
}


@pytest.mark.parametrize(
    ("prog", "group", "name"), COMMANDS, ids=[f"{p} {n}" for p, _, n in COMMANDS]
)
def test_help_has_a_runnable_example_and_consistent_metavars(
    prog: str, group: click.Group, name: str
) -> None:
    r = CliRunner().invoke(group, [name, "--help"], terminal_width=100)
    assert r.exit_code == 0, r.output
    examples = r.output.split("Examples:", 1)
    assert len(examples) == 2, f"{prog} {name} --help has no Examples section"
    lines = examples[1].split("Options:", 1)[0].strip().splitlines()
    assert lines and all(line.strip().startswith(f"{prog} {name}") for line in lines), lines
    cmd = group.commands[name]
    for line in lines:  # every option an example uses exists
        for opt in re.findall(r"(?<=\s)--[a-z][a-z0-9-]*", line.split("#")[0]):
            assert any(opt in p.opts or opt in p.secondary_opts for p in cmd.params), (line, opt)
    ctx = click.Context(cmd, info_name=name)
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.is_flag or p.name in FREE_TEXT:
            continue
        metavar = p.make_metavar(ctx)
        assert metavar not in CLICK_DEFAULTS, f"{prog} {name} --{p.name}: metavar {metavar}"
        if p.type.name in {"integer", "integer range"}:
            assert metavar == "N", (p.name, metavar)
        if p.type.name in {"float", "float range"}:
            assert metavar == "X", (p.name, metavar)
        if p.name in {"output", "output_dir", "config_path", "model_spec", "adapter", "tokenizer"}:
            assert metavar == "PATH", (p.name, metavar)
    if (prog, name) in PRINTS_A_SUMMARY:
        assert any("--json" in p.opts for p in cmd.params), f"{prog} {name} has no --json"
