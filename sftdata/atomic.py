"""Write files and folders so that a failure never leaves a partial result behind."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from sftdata.errors import OutputError
from sftdata.inputs import is_special


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(
    path: str | os.PathLike[str], *, folder: bool = False, umask: int | None = None
) -> None:
    """Give a file (0666) or folder (0777) made by mkstemp/mkdtemp (0600/0700) the mode ``open``
    or ``mkdir`` would give it under the current umask (or ``umask``, read once by a caller
    fixing many paths), so teammates and serving containers running as other users can read
    outputs as they read any other file."""
    mask = current_umask() if umask is None else umask
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], *, mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO]:
    """Open a temp file beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temp file lives in the target folder so the final ``os.replace`` is atomic (same
    filesystem). On any exception (including KeyboardInterrupt) the temp file is removed.

    Raises:
        OutputError: naming ``path`` when its folder cannot take a new file (missing, not a
            folder, no permission).
    """
    if is_special(path):
        # "-" or a device/FIFO (/dev/stdout, /dev/null): written only once everything
        # succeeded, and into the device, never replacing the device's own link
        with _into_special(path, mode=mode, encoding=encoding) as f:
            yield f
        return
    with _temp_beside(path) as (fd, _):
        if "b" in mode:
            f = os.fdopen(fd, mode)
        else:
            f = os.fdopen(fd, mode, encoding=encoding, newline="")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp file path beside ``path`` for a writer that opens files itself (the ``gguf``
    writer); renamed onto ``path`` only if the block succeeds, removed otherwise."""
    with _temp_beside(path) as (fd, tmp):
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


@contextlib.contextmanager
def _temp_beside(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """(open descriptor, name) of a new temp file in ``path``'s folder (so the final
    ``os.replace`` is atomic: same filesystem); once the block succeeds it gets the umask's mode
    and replaces ``path``, on any exception it is removed. The block closes the descriptor."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()  # write the file the link names; the link stays a link
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write here ({e.strerror})") from None
    try:
        yield fd, tmp
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _into_special(path: str | os.PathLike[str], *, mode: str, encoding: str | None) -> Iterator[IO]:
    """A private temp file, copied into standard output (``-``) or the device at the end."""
    import sys

    if os.fspath(path) == "-" and sys.stdout is None:
        raise OutputError("-: standard output is closed; give -o FILE")
    with tempfile.TemporaryFile("w+b") as raw:
        f = raw if "b" in mode else io.TextIOWrapper(raw, encoding=encoding, newline="")
        yield f
        f.flush()
        raw.seek(0)
        if os.fspath(path) == "-":
            shutil.copyfileobj(raw, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
        else:
            try:
                # append: /dev/stdout may be a redirected regular file, which "wb" would truncate
                with open(path, "ab") as dst:
                    shutil.copyfileobj(raw, dst, 1 << 20)
            except OSError as e:
                raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
        if f is not raw:
            f.detach()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (removed first if
    present), with the folder and everything in it given the umask's modes (``follow_umask``)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        # What libraries write inside may be private too (safetensors writes 0600 files).
        mask = current_umask()
        for p in [tmp, *tmp.rglob("*")]:
            if not p.is_symlink():
                follow_umask(p, folder=p.is_dir(), umask=mask)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, path: Path) -> None:
    """Move the finished folder ``src`` onto ``path``, replacing a folder already there.

    The old folder is moved aside first (into a temp folder this call creates) and removed
    only after ``src`` is in place, so ``path`` is never half-written, and nothing but what the
    call made itself is deleted.
    """
    if not path.exists():
        os.replace(src, path)
        return
    # a fresh name of our own: a folder the user keeps beside the output is never touched
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, old / path.name)
    os.replace(src, path)
    shutil.rmtree(old, ignore_errors=True)


LOCK_ATTEMPTS = 100
"""Times :func:`exclusive` re-opens a lock file that was removed under it before giving up."""


@contextlib.contextmanager
def exclusive(output: str | os.PathLike[str], *, writer: str) -> Iterator[None]:
    """Hold an exclusive lock beside the folder ``output`` while ``writer`` (a command, for the
    message) writes it: a second writer fails at once with one line instead of destroying the
    first one's work. The lock is ``.NAME.lock`` in the parent (the folder itself may be
    replaced whole); the parent is made if missing.

    Raises:
        OutputError: another process holds the lock, or the parent cannot be written.
    """
    import fcntl

    out = Path(output)
    lock = out.with_name(f".{out.name}.lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"{e.filename or out}: cannot create the output ({e.strerror or e})"
        ) from None
    # The holder unlinks the lock file as it finishes, so a file opened just before that unlink
    # can be locked afterwards while a third writer locks a new file under the same name: a lock
    # counts only while the name still points at the locked file (else open it again).
    for _ in range(LOCK_ATTEMPTS):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
        except OSError as e:
            raise OutputError(
                f"{e.filename or out}: cannot create the output ({e.strerror or e})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"{out}: another {writer} is writing this folder (lock {lock}); wait for it or "
                "write elsewhere"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(lock), os.fstat(fd)):
                break
        os.close(fd)  # a stale file: its holder had finished and removed it
    else:
        raise OutputError(f"{out}: the lock {lock} keeps changing hands; try again")
    try:
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still held, so no other writer holds it then
    finally:
        os.close(fd)
