"""Shard folders in object storage and over HTTP, against a real S3 API server on 127.0.0.1
(moto's standalone server, started here) and a local HTTP server: pack to it, read and train from
it (the same rows and losses as the local folder), a corrupt shard refused, an interrupted upload
leaving no index, read-only HTTP, and bad URLs as one line each. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sftdata.errors import ShardError

BIN = Path(sys.executable).parent
RECORDS = [
    {"schema_version": 2, "id": f"r{i}", "messages": [
        {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}." + " Indeed." * (i % 5)}]}
    for i in range(60)
]  # fmt: skip
PACK = ["--tokenizer", "tiny", "--seq-len", "256", "--shard-size", "1"]  # a shard per row
TRAIN = ["--model", "tiny", "--no-progress", "--set", "max_steps=3", "--set", "report_to=none",
         "--set", "per_device_train_batch_size=2", "--set", "logging_steps=1", "--set", "save_steps=1"]  # fmt: skip


def _fs() -> Any:
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def _run(cwd: Path, *argv: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"SFTPIPE_CACHE": str(cache)} if cache else {})}
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)  # fmt: skip


def _data(folder: Path) -> str:
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return "data.jsonl"


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_pack_to_s3_read_and_train_from_it(s3: dict[str, str], tmp_path: Path) -> None:
    data = _data(tmp_path)
    url = "s3://bkt/sft/shards"
    r = _run(tmp_path, "sftdata", "pack", data, "-o", url, *PACK)
    assert r.returncode == 0, r.stderr
    names = sorted(p.rsplit("/", 1)[1] for p in _fs().ls("bkt/sft/shards"))
    local = _run(tmp_path, "sftdata", "pack", data, "-o", "local", *PACK)
    assert local.returncode == 0, local.stderr
    assert names == sorted(p.name for p in (tmp_path / "local").iterdir())
    assert _fs().cat(f"{url}/index.json") == (tmp_path / "local" / "index.json").read_bytes()
    again = _run(tmp_path, "sftdata", "pack", data, "-o", url, *PACK)
    assert again.returncode == 0 and f"{url}: already up to date" in again.stderr, again.stderr
    # read through the node-local cache: the same rows as the local folder
    rows = [
        _run(tmp_path, "sftdata", "inspect", w, "--row", "3", "--plain") for w in (url, "local")
    ]
    assert rows[0].returncode == 0 and rows[0].stdout == rows[1].stdout, rows[0].stderr
    stats = [
        json.loads(_run(tmp_path, "sftdata", "stats", w, "--json").stdout) for w in (url, "local")
    ]
    assert stats[0] == stats[1]
    # training from the URL: the losses of the local folder, step for step
    cold = tmp_path / "train-cache"
    for where, out in ((url, "run-s3"), ("local", "run-local")):
        t = _run(tmp_path, "sfttrain", "run", where, "-o", out, *TRAIN, cache=cold)
        assert t.returncode == 0, t.stderr
    assert _losses(tmp_path / "run-s3") == _losses(tmp_path / "run-local")
    assert len(_losses(tmp_path / "run-s3")) == 3
    # fetched as read: 3 steps of 2 rows read at most 6 of the folder's one-row shards
    fetched = list((cold / "remote").glob("*/*.arrow"))
    assert 1 <= len(fetched) <= 6 < len(names) - 1, (len(fetched), len(names))
    # export reads the URL too (MindRecord: the extra CI installs)
    from tests.conftest import extra_or_skip

    extra_or_skip("mindspore.dataset", "mindrecord")
    out = []
    for where, name in ((url, "s3.mindrecord"), ("local", "local.mindrecord")):
        r = _run(
            tmp_path, "sftdata", "export", where, "--format", "mindrecord", "-o", name, "--json"
        )
        assert r.returncode == 0, r.stderr
        out.append({k: v for k, v in json.loads(r.stdout).items() if k != "output"})
    assert out[0] == out[1] and out[0]["rows"] > 0


def test_resume_from_a_cold_cache(s3: dict[str, str], tmp_path: Path) -> None:
    """A run from a URL that lost its last checkpoint (killed before it) resumes on a node whose
    cache is empty, and ends with the loss of the uninterrupted run."""
    data = _data(tmp_path)
    url = "s3://bkt/resume/shards"
    assert _run(tmp_path, "sftdata", "pack", data, "-o", url, *PACK).returncode == 0
    first = _run(tmp_path, "sfttrain", "run", url, "-o", "run", *TRAIN, cache=tmp_path / "cache-a")
    assert first.returncode == 0, first.stderr
    last = _losses(tmp_path / "run")[-1]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000003")
    shutil.rmtree(tmp_path / "run" / "final", ignore_errors=True)
    resumed = _run(tmp_path, "sfttrain", "run", url, "-o", "run", *TRAIN, "--resume", "auto",
                   cache=tmp_path / "cache-b")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stderr + resumed.stdout
    assert _losses(tmp_path / "run")[-1] == last


def test_a_shard_damaged_on_the_server_is_fetched_again_then_refused(
    s3: dict[str, str], tmp_path: Path
) -> None:
    data = _data(tmp_path)
    url = "s3://bkt/damaged/shards"
    assert _run(tmp_path, "sftdata", "pack", data, "-o", url, *PACK).returncode == 0
    index = json.loads(_fs().cat(f"{url}/index.json"))
    name = index["splits"]["train"]["shards"][1]["file"]
    blob = bytearray(_fs().cat(f"{url}/{name}"))
    blob[len(blob) // 2] ^= 0xFF  # same size, one byte flipped
    _fs().pipe(f"{url}/{name}", bytes(blob))
    want = [f"Error: {url}/{name}: fetched twice, and neither copy matches the index's size and "
            "sha256 (damaged on the server or in transit)"]  # fmt: skip
    # read whole (inspect), and fetched while training: one line, the run stopped
    for argv in (["sftdata", "inspect", url, "--row", "0"],
                 ["sfttrain", "run", url, "-o", "run", *TRAIN, "--set", "max_steps=40"]):  # fmt: skip
        r = _run(tmp_path, *argv, cache=tmp_path / argv[0])
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert [x for x in r.stderr.splitlines() if x.startswith("Error: ")] == want, r.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_an_interrupted_upload_leaves_no_index(
    s3: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sftdata import remote

    folder = tmp_path / "shards"
    assert _run(tmp_path, "sftdata", "pack", _data(tmp_path), "-o", "shards", *PACK).returncode == 0
    fs, _ = remote.filesystem("s3://bkt/cut/shards")
    real, calls = fs.put_file, []

    def cut(*args: Any, **kw: Any) -> Any:
        calls.append(args)
        if len(calls) == 3:
            raise ConnectionError("connection reset by peer")
        return real(*args, **kw)

    monkeypatch.setattr(fs, "put_file", cut)
    with pytest.raises(ShardError, match=r"^s3://bkt/cut/shards: connection reset by peer$"):
        remote.upload(folder, "s3://bkt/cut/shards")
    monkeypatch.undo()
    assert not _fs().exists("bkt/cut/shards/index.json")
    assert len(_fs().ls("bkt/cut/shards")) == 2  # what was uploaded stays, unread: no index
    r = _run(tmp_path, "sftdata", "inspect", "s3://bkt/cut/shards", "--row", "0")
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: s3://bkt/cut/shards: no index.json (not a shard folder, or its upload did not finish)"
    )


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_is_read_only(http_root: str, tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    data = _data(tmp_path)
    assert _run(tmp_path, "sftdata", "pack", data, "-o", "shards", *PACK).returncode == 0
    over_http = _run(tmp_path, "sftdata", "inspect", f"{http_root}/shards", "--row", "2", "--plain")
    assert over_http.returncode == 0, over_http.stderr
    assert (
        over_http.stdout
        == _run(tmp_path, "sftdata", "inspect", "shards", "--row", "2", "--plain").stdout
    )
    r = _run(tmp_path, "sftdata", "pack", data, "-o", f"{http_root}/new", *PACK)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        f"Error: {http_root}/new: http:// is read-only (write to object storage or a folder)"
    )


def test_bad_urls_are_one_line(s3: dict[str, str], tmp_path: Path) -> None:
    data = _data(tmp_path)
    cases = [
        (["sftdata", "pack", data, "-o", "nosuch://x/y", *PACK], r"nosuch://x/y: nosuch:// is not a filesystem fsspec knows"),
        (["sftdata", "inspect", "s3://no-such-bucket/shards", "--row", "0"], r"s3://no-such-bucket/shards: no index\.json"),
        (["sftdata", "inspect", "s3://bkt/escape", "--row", "0"], r"s3://bkt/escape/index\.json: shard name '\.\./x\.arrow' leaves the prefix"),
    ]  # fmt: skip
    assert _run(tmp_path, "sftdata", "pack", data, "-o", "shards", *PACK).returncode == 0
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["file"] = "../x.arrow"
    _fs().pipe("s3://bkt/escape/index.json", json.dumps(index).encode())
    import re

    for argv, expect in cases:
        r = _run(tmp_path, *argv)
        errors = [x for x in r.stderr.splitlines() if x.startswith("Error: ")]
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(errors) == 1 and re.search(expect, errors[0]), r.stderr
    assert not (tmp_path / "nosuch:").exists()


def test_a_missing_filesystem_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    from sftdata import remote
    from sftdata.errors import ConfigError

    def missing(*a: Any, **k: Any) -> Any:
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(
        ConfigError,
        match=r"^s3://bkt/x: no filesystem for s3:// is installed \(pip install 'sftpipe\[s3\]'\)$",
    ):
        remote.filesystem("s3://bkt/x")


def test_a_local_folder_and_file_urls_are_unchanged(tmp_path: Path) -> None:
    from sftdata import remote

    assert not remote.is_url("shards/") and not remote.is_url("file:///tmp/x")
    assert remote.is_url("s3://bkt/x") and remote.is_url("https://h/x")
    assert remote.local_path("file:///tmp/x") == Path("/tmp/x")
    # a file:// URL is the folder itself, for every command that takes one
    url = f"file://{tmp_path}/shards"
    assert _run(tmp_path, "sftdata", "pack", _data(tmp_path), "-o", url, *PACK).returncode == 0
    assert (tmp_path / "shards" / "index.json").is_file()
    for argv in (["inspect", "--row", "0", "--plain"], ["stats", "--json"]):
        by_url = _run(tmp_path, "sftdata", argv[0], url, *argv[1:])
        by_path = _run(tmp_path, "sftdata", argv[0], "shards", *argv[1:])
        assert by_url.returncode == 0 and by_url.stdout == by_path.stdout, by_url.stderr


def test_missing_credentials_are_one_line(s3: dict[str, str], tmp_path: Path) -> None:
    """No keys anywhere botocore looks (environment, files, instance metadata off), the endpoint
    still the local server: one line, nothing reached beyond 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3["AWS_ENDPOINT_URL"], AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull,
               AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    for url, argv in (("s3://bkt/x", ["inspect", "s3://bkt/x", "--row", "0"]),
                      ("s3://bkt/y", ["pack", _data(tmp_path), "-o", "s3://bkt/y", *PACK])):  # fmt: skip
        r = subprocess.run([str(BIN / "sftdata"), *argv], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env=env)  # fmt: skip
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"Error: {url}: access denied or no credentials (Unable to locate credentials)"
        ], r.stderr
