"""Shared click plumbing for both console scripts: the single SftError -> one-line mapping."""

from __future__ import annotations

import click

from sftdata.errors import SftError


class SftGroup(click.Group):
    """A click group that turns every SftError into one clean line and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SftError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None
        # The last line of defence for what no library code names (a full disk while torch or
        # pyarrow write, memory running out): still one line, never a traceback.
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except MemoryError:
            raise click.ClickException("out of memory") from None


def register_commands(group: click.Group, package: str) -> None:
    """Add the ``command`` object of every module in ``package`` to ``group``.

    One module per command keeps the CLI files a table of contents; command modules import
    heavy libraries (torch, transformers, pyarrow) inside their functions so ``--help`` is fast.
    """
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{mod.name}")
        cmd = getattr(module, "command", None)
        if isinstance(cmd, click.Command):
            group.add_command(cmd)
