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


def test_help_config_lists_every_key_of_the_config_and_of_its_data_section() -> None:
    """A user writing a config from --help-config alone finds every key, the data section's and
    its inputs' too, each with a default and a meaning."""
    import dataclasses

    from sftdata.recipe import SECTION_KEYS, DataInput
    from sfttrain.cli import main as sfttrain_main
    from sfttrain.config import TrainConfig

    r = CliRunner().invoke(sfttrain_main, ["run", "--help-config"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    data_at = lines.index(next(x for x in lines if x.startswith("data: ")))
    top = {x.split(" (")[0] for x in lines[:data_at] if x}
    assert top == {f.name for f in dataclasses.fields(TrainConfig)}
    nested = [x.strip() for x in lines[data_at + 1 :] if x.startswith("  ")]
    keys = [x.split(" (")[0] for x in nested]
    want = list(SECTION_KEYS)  # every key parse_data_section accepts
    want += ["from" if f.name == "fmt" else f.name for f in dataclasses.fields(DataInput)]
    assert keys == want
    assert all(x.split("): ", 1)[1].strip() for x in nested)  # every key says what it does
