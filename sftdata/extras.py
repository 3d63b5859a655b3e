"""Optional extras: which packages each needs, and the one line that names the extra to install
where one is missing (``pip install sftpipe`` is the data half; see pyproject.toml)."""

from __future__ import annotations

import importlib.util

from sftdata.errors import ConfigError

EXTRAS = {
    "train": ("torch", "peft", "safetensors", "matplotlib", "gguf"),
    "fastchat": ("fastchat",),
    "plot": ("matplotlib",),
    "gguf": ("llama_cpp",),
}
"""Extra -> the modules it provides (pyproject.toml's optional dependencies)."""


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    out = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(module)
    return out


def require(extra: str, what: str) -> None:
    """Raise the one line naming ``extra`` when a module of it is missing.

    Raises:
        ConfigError: ``WHAT needs the 'EXTRA' extra (MODULE missing): pip install 'sftpipe[EXTRA]'``.
    """
    gone = missing(extra)
    if gone:
        raise ConfigError(
            f"{what} needs the '{extra}' extra ({', '.join(gone)} missing): "
            f"pip install 'sftpipe[{extra}]'"
        )


__all__ = ["EXTRAS", "missing", "require"]
