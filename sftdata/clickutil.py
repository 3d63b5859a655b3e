"""Shared click plumbing for both console scripts: the single SftError -> one-line mapping."""

from __future__ import annotations

from typing import Any

import click

from sftdata.errors import SftError

TYPE_METAVARS = {
    "integer": "N",
    "integer range": "N",
    "float": "X",
    "float range": "X",
    "path": "PATH",
}
"""The metavar of an option that names none, by click type: the same word on every --help page
(click's own INTEGER RANGE / FLOAT / TEXT mix read differently from command to command)."""


def field_option(cls: type, name: str, *decls: str, **overrides: Any):
    """A click option made from field ``name`` of the dataclass ``cls``: ``--kebab-name``, its
    type (a ``Literal`` gives the choices, a bool a flag: ``--name/--no-name`` where it is on by
    default), its default and its
    docstring as the help; ``overrides`` replace any of these (a command that reads the value
    elsewhere first, e.g. ``required=False``)."""
    import dataclasses
    import types
    import typing

    from sftdata.text import field_docs

    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = typing.get_type_hints(cls)[name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    flag = f"--{name.replace('_', '-')}"
    kw: dict[str, Any] = {"help": field_docs(cls)[name]}
    if f.default is dataclasses.MISSING:
        kw["required"] = True
    else:
        kw["default"], kw["show_default"] = f.default, f.default is not None
    if typing.get_origin(kind) is typing.Literal:
        kw["type"] = click.Choice(typing.get_args(kind))
    elif kind is bool and f.default is True:  # on unless turned off
        decls = decls or (f"{flag}/--no-{flag[2:]}",)
    elif kind is bool:
        kw["is_flag"], kw["show_default"] = True, False
    elif kind in (int, float):
        kw["type"] = kind
    return click.option(*(decls or (flag,)), name, **{**kw, **overrides})


def format_option(help: str):
    """``--format text|github`` (into ``fmt``): plain lines, or GitHub Actions annotations."""
    return click.option(
        "--format", "fmt", type=click.Choice(["text", "github"]), default="text",
        show_default=True, help=help,
    )  # fmt: skip


class SftGroup(click.Group):
    """A click group that turns every SftError into one clean line and a non-zero exit, and
    gives every option without a metavar the one its type has in :data:`TYPE_METAVARS`."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        for p in cmd.params:
            if isinstance(p, click.Option) and p.metavar is None and not p.is_flag:
                p.metavar = TYPE_METAVARS.get(p.type.name, p.metavar)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        _exit_on_sigterm()
        try:
            return super().invoke(ctx)
        except SftError as e:
            from sftdata.inputs import unspool_message

            raise click.ClickException(unspool_message(str(e))) from None
        except KeyboardInterrupt:
            raise click.Abort() from None
        # The last line of defence for what no library code names (a full disk while torch or
        # pyarrow write, memory running out): still one line, never a traceback.
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except MemoryError:
            raise click.ClickException("out of memory") from None


def _exit_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's stop) unwinds like Ctrl-C: every ``atomic_file`` /
    ``atomic_dir`` / work folder is removed on the way out instead of left half-written.
    ``sfttrain run`` installs its own handler for the training loop (save, then stop)."""
    import signal
    import threading

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
