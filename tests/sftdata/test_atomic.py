"""sftdata.atomic: outputs appear whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftdata.atomic import atomic_dir, atomic_file
from sftdata.errors import OutputError


def test_atomic_dir_replaces_a_folder_and_keeps_it_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "c").write_text("3")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or .old left


def test_atomic_file_failure_leaves_nothing_and_bad_folder_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "f.txt"
    with pytest.raises(RuntimeError), atomic_file(out) as f:
        f.write("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    out.write_text("x")
    msg = r"f\.txt/g\.txt: cannot write here \(Not a directory\)"
    with pytest.raises(OutputError, match=msg), atomic_file(out / "g.txt"):
        pass


def test_atomic_path_appears_whole_or_not_at_all(tmp_path) -> None:
    from sftdata.atomic import atomic_path

    out = tmp_path / "model.gguf"
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        tmp.write_bytes(b"GGUF" + b"\0" * 8)
        assert not out.exists()
    assert out.read_bytes()[:4] == b"GGUF"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert out.read_bytes()[:4] == b"GGUF"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_a_lock_file_removed_under_a_writer_is_not_a_lock(tmp_path, monkeypatch) -> None:
    """A writer that opened the lock file just before its holder finished (and removed it) must
    not count the stale file as held while a third writer holds the new one."""
    import os

    from sftdata import atomic

    out = tmp_path / "shards"
    lock = tmp_path / ".shards.lock"
    lock.write_text("")
    stale = os.open(lock, os.O_RDWR)  # opened while the first writer still held it
    lock.unlink()  # ... which then finished
    real_open, calls = os.open, []

    def open_stale_first(path, flags, mode=0o777):
        calls.append(path)
        return os.dup(stale) if len(calls) == 1 else real_open(path, flags, mode)

    with atomic.exclusive(out, writer="test"):  # the third writer, on a new lock file
        monkeypatch.setattr(atomic.os, "open", open_stale_first)
        with (
            pytest.raises(OutputError, match="another second is writing"),
            atomic.exclusive(out, writer="second"),
        ):
            pass
        monkeypatch.setattr(atomic.os, "open", real_open)
    os.close(stale)
    assert len(calls) == 2  # the stale file was let go and the lock opened again
    with atomic.exclusive(out, writer="test"):  # free again once the holder is done
        assert lock.exists()
    assert not lock.exists()
