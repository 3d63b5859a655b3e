"""Inputs and outputs that are not plain files: ``-``, pipes, FIFOs, ``<(...)``, devices; and
outputs that would overwrite an input.

Readers sniff a file's head, then open it again to stream it (format detection, hashing for
the shard fingerprint, a second pass for formulas). A stream can be read only once: read twice,
the first bytes are lost; a FIFO opened twice hangs. So every input that is not a regular file
is copied ONCE into a private temporary file (streamed in blocks, memory flat), and the rest
of the pipeline reads that; errors and record sources still name what the user gave (the
temporary path is mapped back to it by :func:`shown`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from sftdata.errors import ConfigError, SftError

STDIN = "-"
_SHOWN: dict[str, str] = {}
"""Temporary copy (as a string) -> what the user named (``<stdin>``, ``/dev/fd/63``)."""


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` as the user named it (a spooled stream's original name)."""
    text = os.fspath(path)
    return _SHOWN.get(text, text)


def unspool_message(message: str) -> str:
    """An error message with every temporary copy's path replaced by what the user named."""
    for tmp, name in _SHOWN.items():
        message = message.replace(tmp, name)
    return message


_DEV_FILESYSTEMS = ("/dev/shm/",)
"""A filesystem mounted under /dev (tmpfs): its regular files are files like any other."""


def is_special(path: str | os.PathLike[str]) -> bool:
    """``-``, anything under /dev (but /dev/shm) or /proc (``/dev/stdout`` links to whatever
    file descriptor 1 is, a regular file when output is redirected: renaming onto it would
    replace the link), or
    an existing path that is neither a regular file nor a folder (a pipe, a FIFO, a device,
    ``<(...)``). Such a path is read once (:func:`readable`) and written into, never replaced
    (``sftdata.atomic.atomic_file``)."""
    text = os.fspath(path)
    absolute = os.path.abspath(text)
    if text == STDIN or (
        absolute.startswith(("/dev/", "/proc/")) and not absolute.startswith(_DEV_FILESYSTEMS)
    ):
        return True
    try:
        mode = os.stat(text).st_mode
    except OSError:
        return False  # missing: the reader or writer names it
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def inside(folder: Path, name: object) -> bool:
    """Whether the relative path ``name`` (from a file a user handed us) stays inside
    ``folder``, links resolved."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        return False
    root = folder.resolve()
    return (root / name).resolve().is_relative_to(root)


@contextlib.contextmanager
def readable(paths: Sequence[str]) -> Iterator[list[str]]:
    """``paths`` with each stream replaced by a temporary regular copy of everything it held.

    ``-`` is standard input (at most once). The copies are removed on exit.

    Raises:
        ConfigError: ``-`` given twice, or a stream that cannot be read.
    """
    if sum(p == STDIN for p in paths) > 1:
        raise ConfigError("'-' (standard input) can be given once")
    if not any(is_special(p) for p in paths):
        yield list(paths)
        return
    folder = tempfile.mkdtemp(prefix="sftpipe-input-")
    try:
        out = []
        for k, p in enumerate(paths):
            if not is_special(p):
                out.append(p)
                continue
            name = "<stdin>" if p == STDIN else p
            # keep a recognisable extension (format detection by name: data.csv via <(...))
            suffix = "".join(Path(p).suffixes[-2:]) if p != STDIN else ""
            tmp = os.path.join(folder, f"input-{k}{suffix}")
            if p == STDIN and sys.stdin is None:
                raise ConfigError("-: standard input is closed; nothing to read")
            try:
                with contextlib.ExitStack() as stack:
                    src = sys.stdin.buffer if p == STDIN else stack.enter_context(open(p, "rb"))
                    with open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
            except OSError as e:
                raise ConfigError(f"{name}: cannot read ({e.strerror or e})") from None
            _SHOWN[tmp] = name  # kept: the CLI maps an error raised after the block too
            out.append(tmp)
        yield out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


SMALL_FILE_BYTES = 64 << 20
"""The most a file we read whole (a config, an index, a marker, a template) may hold: such files
are kilobytes; ``-c /dev/zero`` or a huge file must not be read into memory."""


def read_small(
    path: str | os.PathLike[str],
    *,
    error: type[SftError],
    what: str = "",
    limit: int = SMALL_FILE_BYTES,
) -> str:
    """The UTF-8 text of a file that is read whole, at most ``limit`` bytes (a device or a pipe
    too, read up to the limit).

    Raises:
        error: missing, unreadable, larger than ``limit``, or not UTF-8, naming the file.
    """
    label = f" ({what})" if what else ""
    try:
        with open(path, "rb") as f:
            # in pieces: read(limit + 1) would allocate the whole limit up front for a file of
            # a few bytes
            pieces, size = [], 0
            while size <= limit and (piece := f.read(min(1 << 20, limit + 1 - size))):
                pieces.append(piece)
                size += len(piece)
            data = b"".join(pieces)
    except FileNotFoundError:
        raise error(f"{path}: no such file{label}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e}){label}") from None
    if len(data) > limit:
        raise error(f"{path}: larger than {limit >> 20} MB{label}; not a file of this kind")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}){label}") from None


def _identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names, links followed; None where nothing is there."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _ancestors(path: Path) -> list[tuple[int, int]]:
    """Identities of the existing folders ``path`` lies in (links resolved), innermost first."""
    out = []
    for parent in Path(os.path.abspath(path)).resolve().parents:
        ident = _identity(parent)
        if ident is not None:
            out.append(ident)
    return out


def refuse_overwriting(
    inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str]
) -> None:
    """Refuse an output that is one of the inputs, a folder holding one, or a path inside an
    input folder, compared by what they are (device and inode, links and ``/proc/self/cwd``
    alike followed), not by their names.

    Raises:
        ConfigError: naming the output and the input it would destroy.
    """
    if os.fspath(output) == STDIN:
        return
    out = Path(output)
    out_id = _identity(out)
    out_in = _ancestors(out)
    for inp in inputs:
        if os.fspath(inp) == STDIN:
            continue
        in_id = _identity(inp)
        if in_id is None:
            continue
        same = out_id == in_id
        holds_input = out_id is not None and out.is_dir() and out_id in _ancestors(Path(inp))
        inside_input = Path(inp).is_dir() and in_id in out_in  # e.g. into a shard folder
        if same or holds_input or inside_input:
            raise ConfigError(
                f"{output}: the output would overwrite the input {shown(inp)}; write it elsewhere"
            )
