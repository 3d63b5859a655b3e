"""A config file for ``sfttrain``: YAML (safe, bounded) plus ``--set key=value`` overrides,
validated into a ``TrainConfig``. A LLaMA-Factory SFT YAML is recognised and translated
(``lf_config``) here, so ``config.py`` itself knows only its own keys; the ``data:`` section is
handed back unparsed for ``sftdata.recipe``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sftdata.errors import ConfigError
from sftdata.inputs import read_small
from sftdata.yamlfile import load_yaml
from sfttrain.config import TrainConfig, build_config
from sfttrain.lf_config import is_llamafactory_config, translate_for_load


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict with YAML-typed values (``--set bf16=true``, ``--set lora_rank=16``)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            out[key] = load_yaml(raw, where=f"--set {key}") if raw.strip() else ""
        except ConfigError:
            out[key] = raw  # not YAML: the text itself (``--set template=x:{y``)
    return out


def load_run_config(
    path: str | Path | None, overrides: list[str] | None = None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(the config, its ``data:`` section): a YAML config read (optional), ``key=value``
    overrides applied, validated, errors naming the key; the data section (a LLaMA-Factory
    YAML's data keys become one) unparsed: ``sftdata.recipe.parse_data_section`` reads it."""
    values: dict[str, Any] = {}
    where = ""
    if path is not None:
        p = Path(path)
        where = f"{p}: "
        text = read_small(p, error=ConfigError, what="config")
        loaded = load_yaml(text, where=str(p))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of key: value at the top level")
        if is_llamafactory_config(loaded):  # a LLaMA-Factory SFT YAML (stage:, dataset:, ...)
            ours = frozenset(f.name for f in dataclasses.fields(TrainConfig))
            loaded = translate_for_load(loaded, ours, where=where)
        values.update(loaded)
    data = values.pop("data", None)
    over = parse_overrides(list(overrides or []))
    values.update(over)
    # Name --set in errors about a key that came from the command line.
    try:
        return build_config(values, where=where), data
    except ConfigError as e:
        msg = str(e)
        for key in over:
            if msg.startswith(f"{where}{key}:"):
                raise ConfigError(f"--set {msg[len(where) :]}") from None
        raise


__all__ = ["load_run_config", "parse_overrides"]
