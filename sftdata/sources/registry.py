"""LLaMA-Factory's ``dataset_info.json`` registry, read by ``sftdata convert --dataset-info PATH
--dataset NAME``.

An entry names a local file (``file_name``, relative to the registry's folder), its
``formatting`` (alpaca, sharegpt; openai is LLaMA-Factory's sharegpt with OpenAI tags),
``columns`` (raw column -> role in the record) and, for sharegpt, ``tags`` (role/content keys and
role values). Semantics follow LLaMA-Factory's ``src/llamafactory/data/parser.py``
(``DatasetAttr``): defaults ``formatting: alpaca``, alpaca columns ``prompt=instruction,
query=input, response=output``, sharegpt ``messages=conversations``. Entries that live on a hub
(``hf_hub_url``, ``ms_hub_url``, ``script_url``) are refused: only local files are read, nothing
is downloaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftdata.conversation import Conversation
from sftdata.errors import ConversionError
from sftdata.inputs import inside
from sftdata.jsonfile import read_json

HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
ALPACA_COLUMNS = {  # LLaMA-Factory column role -> our canonical Alpaca field
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "system": "system",
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
TAG_KEYS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
)
# LLaMA-Factory's ``formatting: openai`` is sharegpt with these tags (its converter.py).
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function",
    "system_tag": "system",
}
# Columns/flags of non-SFT or multimodal data: refused, since ignoring them would silently
# train on something else than the user registered.
_REFUSED_COLUMNS = ("images", "videos", "audios", "chosen", "rejected", "kto_tag")


@dataclass(frozen=True)
class RegistryEntry:
    """One ``dataset_info.json`` entry, resolved to what ``read_conversations`` needs."""

    name: str
    """The entry's name in the registry."""
    path: Path
    """The local file (or folder) it names, resolved against the registry's folder."""
    fmt: str
    """Our source format: ``alpaca`` or ``sharegpt``."""
    mapping: dict[str, str]
    """Raw column -> canonical field (``--map``)."""
    role_tags: dict[str, str] | None
    """LLaMA-Factory sharegpt ``tags`` (role_tag, content_tag, user_tag...)."""
    notes: list[str] = field(default_factory=list)
    """Things the user should know (e.g. ignored keys)."""


def load_registry(path: str | Path) -> dict[str, Any]:
    """Parse a ``dataset_info.json``; ConversionError naming the file for anything unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset_info.json"
    if not path.exists():
        raise ConversionError(f"{path}: no such file (--dataset-info)")
    data = read_json(path, error=ConversionError)
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object of dataset entries")
    return data


def resolve_entry(info_path: str | Path, name: str) -> RegistryEntry:
    """Resolve registry entry ``name`` of ``info_path`` to a local file plus format/mapping/tags.

    Raises:
        ConversionError: one line naming the registry and entry: unknown name, hub entries
            (only local files are supported), missing file, unsupported formatting/columns/tags.
    """
    info_path = Path(info_path)
    if info_path.is_dir():
        info_path = info_path / "dataset_info.json"
    registry = load_registry(info_path)
    where = f"{info_path}: dataset {name!r}"
    if name not in registry:
        local = sorted(k for k, v in registry.items() if isinstance(v, dict) and "file_name" in v)
        shown = ", ".join(local[:12]) + (" ..." if len(local) > 12 else "")
        raise ConversionError(f"{where} is not in the registry (local entries: {shown or 'none'})")
    entry = registry[name]
    if not isinstance(entry, dict):
        raise ConversionError(f"{where}: entry must be an object")
    hub = [k for k in HUB_KEYS if k in entry]
    if hub:
        raise ConversionError(
            f"{where} points at {hub[0]}={entry[hub[0]]!r}; only local files are supported "
            "(download it and register it with file_name)"
        )
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise ConversionError(f"{where}: has no 'file_name'")
    if entry.get("ranking"):
        raise ConversionError(
            f"{where}: ranking (preference) data is not supervised fine-tuning data"
        )
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise ConversionError(
            f"{where}: formatting {formatting!r} is not alpaca, sharegpt or openai"
        )
    mapping = _column_mapping(entry.get("columns") or {}, formatting, where)
    role_tags = _role_tags(entry.get("tags") or {}, formatting, where)
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ConversionError(f"{where}: num_samples must be a positive integer")
    if not inside(info_path.parent, file_name):
        raise ConversionError(
            f"{where}: file_name {file_name!r} is not inside the dataset_dir {info_path.parent} "
            "(absolute paths, '..' and links out of it are refused)"
        )
    path = (info_path.parent / file_name).resolve()
    if not path.exists():
        raise ConversionError(f"{where}: file_name {file_name!r} does not exist ({path})")
    notes = []
    if num_samples is not None:
        # LLaMA-Factory draws num_samples records at random with its own RNG: not reproducible
        # here, and silently taking some other subset would be worse than saying so.
        notes.append(
            f"{info_path}: dataset {name!r}: num_samples={num_samples} is not applied "
            "(all records are converted)"
        )
    return RegistryEntry(
        name=name,
        path=path,
        fmt="sharegpt" if formatting in ("sharegpt", "openai") else "alpaca",
        mapping=mapping,
        role_tags=role_tags,
        notes=notes,
    )


def _column_mapping(columns: Any, formatting: str, where: str) -> dict[str, str]:
    """An entry's ``columns`` as a ``--map`` (raw column -> canonical field)."""
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise ConversionError(f"{where}: 'columns' must map column roles to column names")
    refused = [c for c in _REFUSED_COLUMNS if c in columns]
    if refused:
        raise ConversionError(
            f"{where}: column {refused[0]!r} is not supported (text-only supervised fine-tuning)"
        )
    allowed = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    # LLaMA-Factory reads "system"/"tools" for every formatting but only these for alpaca/sharegpt.
    allowed = {**allowed, "system": "system", "tools": "tools"}
    mapping: dict[str, str] = {}
    for role, column in columns.items():
        if role not in allowed:
            raise ConversionError(
                f"{where}: column role {role!r} is not one of {', '.join(allowed)} for {formatting}"
            )
        if formatting == "alpaca" and role == "tools":
            raise ConversionError(f"{where}: tools need formatting: sharegpt")
        if column != allowed[role]:
            mapping[column] = allowed[role]
    return mapping


def _role_tags(tags: Any, formatting: str, where: str) -> dict[str, str] | None:
    """An entry's ``tags`` (ShareGPT role and key names), over OpenAI's for ``openai``."""
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise ConversionError(f"{where}: 'tags' must map tag names to strings")
    if formatting not in ("sharegpt", "openai"):
        if tags:
            raise ConversionError(f"{where}: 'tags' only apply to formatting: sharegpt")
        return None
    unknown = [t for t in tags if t not in TAG_KEYS]
    if unknown:
        raise ConversionError(f"{where}: tag {unknown[0]!r} is not one of {', '.join(TAG_KEYS)}")
    base = OPENAI_TAGS if formatting == "openai" else {}
    return {**base, **tags} or None


def _file_format(entry: RegistryEntry, path: Path) -> str:
    """Our source format for one data file of an entry (LLaMA-Factory picks its loader by extension)."""
    from sftdata.sources.hf import is_saved_dataset

    ext = path.suffix.lower()
    if is_saved_dataset(path):
        return "hf"
    if ext == ".parquet":
        return "parquet"
    if ext == ".csv":
        return "csv"
    if ext in (".json", ".jsonl"):
        return entry.fmt
    raise ConversionError(
        f"{path}: {ext or 'extensionless'} files of dataset {entry.name!r} are not supported "
        "(json, jsonl, csv, parquet or a save_to_disk folder)"
    )


def registry_inputs(
    info_path: str | None,
    names: Sequence[str],
    *,
    fmt: str = "auto",
    mapping: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[RegistryEntry]:
    """``convert --dataset-info PATH --dataset A,B``: one resolved entry per data file, in order.

    Raises:
        ConversionError: a missing half of the option pair, ``--from``/``--map`` given too (the
            registry decides both), or any :func:`resolve_entry` refusal.
    """
    if not info_path:
        raise ConversionError("--dataset needs --dataset-info PATH/dataset_info.json")
    wanted = [n.strip() for item in names for n in item.split(",") if n.strip()]
    if not wanted:
        raise ConversionError("--dataset-info needs --dataset NAME (comma-separated for several)")
    if fmt != "auto" or mapping:
        raise ConversionError(
            "--from/--map do not apply to --dataset-info entries: the registry gives their "
            "formatting and columns"
        )
    out: list[RegistryEntry] = []
    for name in wanted:
        entry = resolve_entry(info_path, name)
        for note in entry.notes:
            if log:
                log(note)
        for path in entry_files(entry):
            out.append(dataclasses.replace(entry, path=path, fmt=_file_format(entry, path)))
    return out


def entry_files(entry: RegistryEntry) -> list[Path]:
    """The data files of an entry: the file, or a folder's visible files in name order.

    LLaMA-Factory loads every file of a folder ``file_name``; a folder written by
    ``datasets.save_to_disk`` is one dataset and is returned as is.
    """
    p = entry.path
    if p.is_dir() and not (p / "state.json").is_file() and not (p / "dataset_dict.json").is_file():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        for f in files:
            if not inside(p, f.name):
                raise ConversionError(
                    f"{f}: a link out of the folder of dataset {entry.name!r} is refused"
                )
        if not files:
            raise ConversionError(f"{p}: folder of dataset {entry.name!r} has no files")
        return files
    return [p]


def read_registered(info_path: str | Path, name: str) -> Iterator[Conversation]:
    """Stream the canonical conversations of registry entry ``name`` (see :func:`resolve_entry`)."""
    from sftdata.sources import read_conversations

    for entry in registry_inputs(str(info_path), [name]):
        yield from read_conversations(
            entry.path, fmt=entry.fmt, mapping=entry.mapping or None, role_tags=entry.role_tags
        )
