"""Shard folders in object storage (``s3://``, ``gs://``, ``az://``, any fsspec URL) and over
HTTP(S), read-only: written by uploading a finished local folder with ``index.json`` last, read
through a node-local cache (``$SFTPIPE_CACHE/remote/``) whose every file is checked against the
index's sha256 before it is used.

Credentials come the libraries' usual way (environment, config files, instance roles); none is
ever written to our files. A reader never sees a half-written folder: without its ``index.json`` a
prefix is not a shard folder, and the index is uploaded only after every shard is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftdata import sha256_file
from sftdata.errors import ConfigError, ShardError, first_line

URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
          "abfss": "azure", "http": "http", "https": "http"}  # fmt: skip
"""The extra that installs each scheme's filesystem."""
READ_ONLY = frozenset({"http", "https"})
INDEX = "index.json"
INDEX_LIMIT = 64 << 20
"""Bytes an index may have (a real one has a few kilobytes per shard)."""
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_url(spec: Any) -> bool:
    """``spec`` names a remote location (a URL whose scheme is not ``file``)."""
    m = URL.match(str(spec))
    return m is not None and m["scheme"].lower() != "file"


def local_path(spec: str | os.PathLike[str]) -> Path:
    """A ``file://`` URL as a path; any other spec as given."""
    s = str(spec)
    return Path(s[len("file://") :]) if s.lower().startswith("file://") else Path(s)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of ``url``.

    Raises:
        ConfigError: no filesystem is installed for its scheme (naming the extra to install).
    """
    import fsspec

    scheme = URL.match(url)["scheme"].lower()  # type: ignore[index]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError:
        extra = EXTRAS.get(scheme)
        hint = f"pip install 'sftpipe[{extra}]'" if extra else "install its fsspec filesystem"
        raise ConfigError(f"{url}: no filesystem for {scheme}:// is installed ({hint})") from None
    except ValueError as e:  # an unknown protocol
        raise ConfigError(f"{url}: {scheme}:// is not a filesystem fsspec knows ({e})") from None
    return fs, str(path).rstrip("/")


def _io_error(url: str, e: BaseException) -> ShardError:
    why = first_line(e)
    if isinstance(e, FileNotFoundError):
        why = "not found (no such bucket or prefix)"
    elif isinstance(e, PermissionError) or "credential" in why.lower() or "AccessDenied" in why:
        why = f"access denied or no credentials ({why})"
    return ShardError(f"{url}: {why}")


def read_remote_index(url: str) -> dict[str, Any] | None:
    """The shard index at ``url`` (parsed and checked as a local one), or None where there is
    none yet.

    Raises:
        ShardError: it cannot be read, is too large, or is not a valid index.
    """
    found = _remote_index(url)
    return None if found is None else found[0]


def _remote_index(url: str) -> tuple[dict[str, Any], bytes] | None:
    from sftdata.shards.format import validate_index

    fs, root = filesystem(url)
    try:
        if not fs.exists(f"{root}/{INDEX}"):
            return None
        with fs.open(f"{root}/{INDEX}", "rb") as f:
            data = f.read(INDEX_LIMIT + 1)
    except Exception as e:  # botocore, aiohttp, ...: whatever the filesystem raises
        raise _io_error(url, e) from None
    if len(data) > INDEX_LIMIT:
        raise ShardError(f"{url}/{INDEX}: larger than {INDEX_LIMIT >> 20} MB")
    try:
        index = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ShardError(f"{url}/{INDEX}: not a shard index ({e})") from None
    if not isinstance(index, dict):
        raise ShardError(f"{url}/{INDEX}: not a shard index")
    validate_index(index, where=f"{url}/{INDEX}")
    for name in shard_names(index):
        if not SHARD_NAME.match(name):
            raise ShardError(f"{url}/{INDEX}: shard name {name!r} leaves the prefix")
    return index, data


def shard_names(index: dict[str, Any]) -> list[str]:
    """Every shard file an index lists, split by split in order."""
    return [e["file"] for s in index["splits"].values() for e in s["shards"]]


def upload(folder: Path, url: str) -> None:
    """Upload a finished shard folder: every file but the index, then the index last.

    Raises:
        ConfigError: the URL's scheme is read-only or has no filesystem installed.
        ShardError: an upload failed (the remote index is then not written).
    """
    scheme = URL.match(url)["scheme"].lower()  # type: ignore[index]
    if scheme in READ_ONLY:
        raise ConfigError(f"{url}: {scheme}:// is read-only (write to object storage or a folder)")
    fs, root = filesystem(url)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != INDEX)
    try:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(f"{root}/{INDEX}")  # an older folder here stops being one before it changes
        for p in files:
            fs.put_file(str(p), f"{root}/{p.name}")
        fs.put_file(str(folder / INDEX), f"{root}/{INDEX}")
    except Exception as e:  # whatever the filesystem raises: one line, no index written
        raise _io_error(url, e) from None


def staging_folder(url: str) -> Path:
    """Where ``pack -o URL`` builds the folder it uploads (kept: a later pack of other inputs
    rebuilds it, an unchanged one is up to date by the remote index)."""
    from sftdata.cache import cache_dir

    return cache_dir() / "uploads" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]


def up_to_date(url: str, fingerprint: str, *, overwrite: bool) -> dict[str, Any] | None:
    """The remote index at ``url`` if a pack with ``fingerprint`` would not change it, else
    None (after checking that the prefix may be written: see :func:`check_remote_empty`)."""
    index = read_remote_index(url)
    if index is not None and index.get("fingerprint") == fingerprint:
        return index
    if index is None and not overwrite:
        check_remote_empty(url)
    return None


def check_remote_empty(url: str) -> None:
    """Refuse to write shards where other files are (a prefix that is not a shard folder).

    Raises:
        ConfigError: the prefix holds files and no index, naming it.
    """
    fs, root = filesystem(url)
    try:
        found = fs.exists(root) and bool(fs.ls(root, detail=False))
    except FileNotFoundError:
        return
    except Exception as e:
        raise _io_error(url, e) from None
    if found:
        raise ConfigError(
            f"{url}: holds other files (not an sftdata shard folder); use --overwrite to write "
            "the shards beside them"
        )


def cache_folder(url: str) -> Path:
    """The node-local cache of the shard folder at ``url``."""
    from sftdata.cache import cache_dir

    return cache_dir() / "remote" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock shared by the processes of this node (the ranks of a node share the
    cache: one downloads a file, the others wait and then find it there)."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fetch_one(fs: Any, root: str, url: str, entry: dict[str, Any], dest: Path) -> None:
    """Download one shard into the cache, verified; a bad copy is fetched again once."""
    path = dest / entry["file"]
    if (
        path.is_file()
        and path.stat().st_size == entry["bytes"]
        and sha256_file(path) == entry["sha256"]
    ):
        return
    for attempt in (1, 2):
        tmp = dest / f".{entry['file']}.part"
        try:
            fs.get_file(f"{root}/{entry['file']}", str(tmp))
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise _io_error(f"{url}/{entry['file']}", e) from None
        if tmp.stat().st_size == entry["bytes"] and sha256_file(tmp) == entry["sha256"]:
            os.replace(tmp, path)
            return
        tmp.unlink(missing_ok=True)
        if attempt == 2:
            raise ShardError(
                f"{url}/{entry['file']}: fetched twice, and neither copy matches the index's "
                "size and sha256 (damaged on the server or in transit)"
            )


class RemoteFolder:
    """A remote shard folder opened for reading: its index in the node-local cache at once, each
    shard fetched into the same folder when :meth:`fetch` asks for it (a reader's ``fetch``).

    Raises (at open):
        ShardError: no index at the URL, an unreadable index, a name leaving the prefix.
        ConfigError: no filesystem for the URL's scheme.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        found = _remote_index(self.url)
        if found is None:
            raise ShardError(
                f"{self.url}: no {INDEX} (not a shard folder, or its upload did not finish)"
            )
        self.index, raw = found
        self._fs, self._root = filesystem(self.url)
        self._entries = {e["file"]: e for s in self.index["splits"].values() for e in s["shards"]}
        self.path = cache_folder(self.url)
        """The node-local folder: the index now, the shards as they are fetched."""
        with _locked(self.path / ".lock"):
            keep = {INDEX, ".lock"}
            for name in self._entries:  # a shard, its download, its lock
                keep |= {name, f".{name}.part", f".{name}.lock"}
            for old in self.path.iterdir():  # shards of an earlier version of the folder
                if old.name not in keep and old.is_file():
                    old.unlink()
            tmp = self.path / f".{INDEX}.part"
            tmp.write_bytes(raw)  # the same bytes: a run's record of its data hashes them
            os.replace(tmp, self.path / INDEX)

    def fetch(self, name: str) -> Path:
        """Shard ``name`` in the cache, checked against the index's size and sha256 (downloaded
        at most twice; a copy already there that matches is kept; another process of this node
        fetching it is waited for).

        Raises:
            ShardError: the download failed, or neither of two copies matches the index.
        """
        with _locked(self.path / f".{name}.lock"):
            _fetch_one(self._fs, self._root, self.url, self._entries[name], self.path)
        return self.path / name

    def fetch_all(self) -> Path:
        """The whole folder in the cache (every shard fetched and checked)."""
        for name in self._entries:
            self.fetch(name)
        return self.path


def localize(url: str) -> Path:
    """The shard folder at ``url`` in the node-local cache, every shard fetched and checked
    against the index's sha256 (kept from an earlier fetch where they match).

    Raises:
        ShardError: no index at the URL, an unreadable or damaged file, a name leaving the prefix.
        ConfigError: no filesystem for the URL's scheme.
    """
    return RemoteFolder(url).fetch_all()


__all__ = [
    "RemoteFolder",
    "cache_folder",
    "check_remote_empty",
    "filesystem",
    "is_url",
    "local_path",
    "localize",
    "read_remote_index",
    "shard_names",
    "staging_folder",
    "up_to_date",
    "upload",
]
