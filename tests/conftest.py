"""Shared test fixtures: paths to the project's fixtures and to ../shared real data."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2"
SHARED_TOKENIZERS = SHARED / "tokenizers"


def pytest_configure(config: pytest.Config) -> None:
    # Tokenizer snapshots are cached (sftdata.cache.cache_dir): keep the tests' cache out of
    # the user's ~/.cache, shared by the tests of one process (and the CLIs they start).
    os.environ["SFTPIPE_CACHE"] = tempfile.mkdtemp(prefix="sftpipe-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop("SFTPIPE_CACHE", ""), ignore_errors=True)


def _absent(what: str) -> None:
    # CI always has ../shared beside the clone: there a missing folder is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing but CI=true: the real-data tests must run in CI")
    pytest.skip(f"{what} is not present (fresh clone without the shared folder)")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or a clean skip on a user's fresh clone (CI always has it)."""
    if not SHARED_DATA.is_dir():
        _absent("../shared/data")
    return SHARED_DATA


@pytest.fixture
def llama2_tokenizer_dir() -> Path:
    """../shared/tokenizers/llama2, or a clean skip where the shared folder is absent."""
    if not (LLAMA2_TOKENIZER / "tokenizer.model").is_file():
        _absent("../shared/tokenizers/llama2")
    return LLAMA2_TOKENIZER


@pytest.fixture
def shared_tokenizers() -> Path:
    """../shared/tokenizers with the real Qwen2, Llama 3 and Phi-3 vocabularies, or a clean skip
    where the shared folder is absent."""
    for name in ("qwen2", "llama3", "phi3"):
        if not (SHARED_TOKENIZERS / name / "tokenizer.json").is_file():
            _absent(f"../shared/tokenizers/{name}")
    return SHARED_TOKENIZERS


@pytest.fixture(autouse=True)
def _c8_on_every_shard_folder(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """After each test, C8's stop rule on every shard folder it wrote under its tmp_path
    (tests/c8.py); ``pytest.mark.trained_prompts`` marks tests whose records train messages that
    are not replies."""
    yield
    if request.node.get_closest_marker("trained_prompts") is None:
        from tests.c8 import check_stops, shard_folders

        for folder in shard_folders(tmp_path):
            check_stops(folder)


def extra_or_skip(module: str, extra: str) -> Any:
    """``module`` of an optional extra, or a clean skip where it is not installed; CI installs
    the extras whose tests must run there (.ci/run), so there a missing one is a failure."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"the {extra!r} extra is missing but CI=true: .ci/run installs it")
        pytest.skip(
            f"the {extra!r} extra is not installed (pip install 'sftpipe[{extra}]')",
            allow_module_level=True,
        )


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A real S3 API server (moto's standalone one) on 127.0.0.1 with bucket ``bkt``, and the
    environment that points at it (children started by the test inherit it): nothing leaves
    127.0.0.1."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    # moto keeps its buckets in the process, not in the server: an earlier module's server left
    # them there, so this one starts from moto's own reset
    import urllib.request

    urllib.request.urlopen(
        urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"), timeout=30
    ).close()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        type(fs).clear_instance_cache()  # instances made for an earlier server's endpoint
        fs.mkdir("bkt")
        yield env
        type(fs).clear_instance_cache()
    server.stop()
