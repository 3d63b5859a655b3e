"""A data section (``data:`` in a ``sfttrain run`` config, or a LLaMA-Factory YAML's data keys):
raw inputs, how to mix them, and the pack options — turned into a shard folder by the same
``convert`` and ``pack`` the ``sftdata`` commands run, so the shards (and their fingerprint) are
the ones the two-step path would write.

Stages, in a work folder of their own (``cache_dir``; by default under the sftpipe cache, keyed
by the section's inputs and tokenizer):

1. each input is converted to ``inputs/NN.jsonl`` (a registry dataset may bring several files);
2. ``data.jsonl`` takes from input k its first ``max_samples`` records, ``weight`` times over
   (``2`` repeats every record, ``0.5`` keeps a seeded half), ids kept unique;
3. ``pack`` writes ``shards/``; when nothing changed it is a no-op, and when the data changed
   since the shards there were packed it rebuilds them (``Prepared.repacked`` says so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftdata.atomic import atomic_file, exclusive
from sftdata.cache import cache_dir as sftpipe_cache
from sftdata.convert import ConvertReport, convert
from sftdata.errors import ConfigError
from sftdata.pack import PackOptions, PackReport, pack
from sftdata.pack.options import knob_problem
from sftdata.pack.output import existing_index
from sftdata.sources import FORMATS
from sftdata.sources.base import parse_mapping
from sftdata.sources.registry import RegistryEntry, registry_inputs
from sftdata.templates import template_problem
from sftdata.text import field_docs


@dataclass(frozen=True)
class DataInput:
    """One input of a data section: a file (or folder), or a dataset of ``dataset_info``."""

    path: str | None = None
    """A raw file (any ``sftdata convert`` format) or an HF ``save_to_disk`` folder."""
    dataset: str | None = None
    """A ``dataset_info.json`` entry name instead of ``path``."""
    fmt: str = "auto"
    """The raw format (``from:``), or ``auto`` to detect it."""
    map: dict[str, str] | None = None
    """Raw field/column -> canonical field, as ``--map``."""
    sheet: str | None = None
    """Worksheet of an ``.xlsx`` input."""
    weight: float = 1.0
    """How many times over its records go into the mix (fractions sample, seeded)."""
    max_samples: int | None = None
    """Take only its first N records (before the weight), as LLaMA-Factory's ``max_samples``."""


SECTION_PACK_KEYS = ("template", "seq_len", "train_on", "overflow", "special_text",
                     "missing_stop", "val_fraction", "val_count", "seed", "num_proc")  # fmt: skip
"""The pack options a data section sets: :class:`PackOptions` fields, typed, documented and
checked there (``data.seq_len`` is ``--seq-len``)."""
SECTION_DEFAULTS = {"seq_len": 2048}
"""A section's defaults where PackOptions has none."""


@dataclass(frozen=True)
class DataSection:
    """Everything that decides the shards a run trains on."""

    inputs: tuple[DataInput, ...]
    """The raw inputs, in order."""
    dataset_info: str | None = None
    """LLaMA-Factory ``dataset_info.json`` (or its folder) for ``dataset:`` inputs."""
    tokenizer: str | None = None
    """Tokenizer to pack with; default the run's model."""
    max_samples: int | None = None
    """Default ``max_samples`` of every input."""
    cache_dir: str | None = None
    """Work folder (converted inputs, ``data.jsonl``, ``shards/``); default under the cache."""
    predict_inputs: tuple[DataInput, ...] = ()
    """Inputs of the predict step (``do_predict``; LLaMA-Factory's ``eval_dataset``), packed as
    shards of their own with the same options; none: the validation split is predicted."""
    options: dict[str, Any] = field(default_factory=dict)
    """The pack options the section gives (keys of ``SECTION_PACK_KEYS``)."""

    def pack_options(self, tokenizer: str) -> PackOptions:
        """The options its shards are packed with (PackOptions' defaults for those not given)."""
        return PackOptions(tokenizer=tokenizer, **{**SECTION_DEFAULTS, **self.options})


_INPUT_KEYS = {"path", "dataset", "from", "map", "sheet", "weight", "max_samples"}
SECTION_KEYS = (
    *(f.name for f in dataclasses.fields(DataSection) if f.name != "options"),
    *SECTION_PACK_KEYS,
)
"""Every key of a ``data:`` section, in the order ``--help-config`` lists them."""


def section_help() -> list[tuple[str, Any, str]]:
    """(key, default or ``dataclasses.MISSING``, what it does) of every ``data:`` key."""
    docs = {**field_docs(PackOptions), **field_docs(DataSection)}
    fields = (*dataclasses.fields(PackOptions), *dataclasses.fields(DataSection))
    defaults = {f.name: f.default for f in fields} | SECTION_DEFAULTS
    return [(key, defaults[key], docs[key]) for key in SECTION_KEYS]


def parse_data_section(d: Any, *, where: str = "data") -> DataSection:
    """A ``data:`` mapping -> :class:`DataSection`; errors name the key (``data.inputs[1].weight``).

    Raises:
        ConfigError: an unknown key, a wrong type, a weight <= 0, an unknown format, train_on
            or overflow, no inputs, a file that does not exist, a dataset without dataset_info.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be a mapping (inputs:, template:, seq_len: ...)")
    _refuse_unknown(d, set(SECTION_KEYS), where)
    raw_inputs = d.get("inputs")
    if isinstance(raw_inputs, (str, dict)):
        raw_inputs = [raw_inputs]
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ConfigError(f"{where}.inputs: give at least one input (a path, or dataset: NAME)")
    inputs = tuple(_parse_input(x, f"{where}.inputs[{k}]") for k, x in enumerate(raw_inputs))
    raw_predict = d.get("predict_inputs") or []
    if isinstance(raw_predict, (str, dict)):
        raw_predict = [raw_predict]
    if not isinstance(raw_predict, list):
        raise ConfigError(
            f"{where}.predict_inputs: give a list of inputs (paths, or dataset: NAME)"
        )
    predict = tuple(
        _parse_input(x, f"{where}.predict_inputs[{k}]") for k, x in enumerate(raw_predict)
    )
    given = {k: v for k, v in d.items() if v is not None}
    options = {k: given.pop(k) for k in SECTION_PACK_KEYS if k in given}
    for key, value in options.items():
        problem = knob_problem(key, value)
        if problem is not None:
            raise ConfigError(f"{where}.{key}: {problem}")
    for key in ("dataset_info", "tokenizer", "cache_dir"):
        if key in given and not isinstance(given[key], str):
            raise ConfigError(f"{where}.{key}: must be a string, not {given[key]!r}")
    n = given.get("max_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{where}.max_samples: must be a positive integer, not {n!r}")
    section = DataSection(
        inputs=inputs, predict_inputs=predict, options=options,
        **{k: v for k, v in given.items() if k not in ("inputs", "predict_inputs")},
    )  # fmt: skip
    _check_section(section, where)
    return section


def _refuse_unknown(d: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")


def _parse_input(x: Any, where: str) -> DataInput:
    if isinstance(x, str):
        x = {"path": x}
    if not isinstance(x, dict):
        raise ConfigError(f"{where}: must be a path or a mapping (path: or dataset:)")
    _refuse_unknown(x, _INPUT_KEYS, where)
    if (x.get("path") is None) == (x.get("dataset") is None):
        raise ConfigError(f"{where}: give exactly one of path: and dataset:")
    for key in ("path", "dataset", "from", "sheet"):
        if x.get(key) is not None and not isinstance(x[key], str):
            raise ConfigError(f"{where}.{key}: must be a string, not {x[key]!r}")
    fmt = x.get("from") or "auto"
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"{where}.from: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    mapping = x.get("map")
    if isinstance(mapping, str):
        mapping = parse_mapping(mapping)
    elif mapping is not None:
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ConfigError(f"{where}.map: must map raw fields to canonical ones")
        mapping = parse_mapping(",".join(f"{k}={v}" for k, v in mapping.items()))
    weight = x.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ConfigError(f"{where}.weight: must be a number > 0, not {weight!r}")
    if not math.isfinite(weight):
        raise ConfigError(f"{where}.weight: must be finite")
    n = x.get("max_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{where}.max_samples: must be a positive integer, not {n!r}")
    if x.get("dataset") is not None and (fmt != "auto" or mapping):
        raise ConfigError(
            f"{where}: from:/map: do not apply to a dataset (its registry entry gives them)"
        )
    if x.get("path") is not None and not Path(x["path"]).expanduser().exists():
        raise ConfigError(f"{where}.path: {x['path']} does not exist")
    return DataInput(
        path=x.get("path"), dataset=x.get("dataset"), fmt=fmt, map=mapping, sheet=x.get("sheet"),
        weight=float(weight), max_samples=n,
    )  # fmt: skip


def _check_section(s: DataSection, where: str) -> None:
    if any(i.dataset for i in (*s.inputs, *s.predict_inputs)):
        if not s.dataset_info:
            raise ConfigError(
                f"{where}.dataset_info: dataset: inputs need the dataset_info.json path"
            )
        info = Path(s.dataset_info).expanduser()
        if info.is_dir() or not info.suffix:
            info = info / "dataset_info.json"
        if not info.is_file():
            raise ConfigError(
                f"{where}.dataset_info: {info} does not exist (relative to {Path.cwd()}; "
                "LLaMA-Factory's dataset_dir): run from the folder that holds it, or give its path"
            )
    problem = template_problem(s.options.get("template", "auto"))
    if problem:
        raise ConfigError(f"{where}.template: {problem}")
    if s.options.get("val_fraction") is not None and s.options.get("val_count") is not None:
        raise ConfigError(f"{where}: give at most one of val_fraction and val_count")


# ----------------------------------------------------------------------------- preparing


@dataclass
class Prepared:
    """What preparing a data section did."""

    shards: Path
    """The shard folder to train on."""
    work: Path
    """The work folder (converted inputs, ``data.jsonl``, ``shards/``)."""
    converted: list[ConvertReport] = field(default_factory=list)
    """One conversion report per input."""
    mixed: list[int] = field(default_factory=list)
    """Records each input put into ``data.jsonl`` (after max_samples and weight)."""
    pack: PackReport | None = None
    """The pack's report (``noop`` when the cached shards were reused)."""
    repacked: bool = False
    """The work folder held shards of other data or options, which were rebuilt."""


def section_key(section: DataSection, tokenizer: str) -> str:
    """What names a section's default work folder: its inputs (resolved paths, registry) and the
    tokenizer. Options are not part of it: changing one rebuilds the shards in place (and
    ``Prepared.repacked`` says so) instead of leaving a folder per experiment in the cache."""
    d = {
        "inputs": [
            [str(Path(i.path).expanduser().resolve()) if i.path else None, i.dataset]
            for i in section.inputs
        ],
        "dataset_info": str(Path(section.dataset_info).resolve()) if section.dataset_info else None,
        "tokenizer": tokenizer
        if tokenizer == "tiny"
        else str(Path(tokenizer).expanduser().resolve()),
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(section: DataSection, model_spec: str) -> Path:
    """The section's work folder: ``cache_dir``, or one under the cache named by its key."""
    if section.cache_dir:
        return Path(section.cache_dir)
    return sftpipe_cache() / "data" / section_key(section, section.tokenizer or model_spec)


def prepare(
    section: DataSection, *, model_spec: str, log: Callable[[str], None] | None = None
) -> Prepared:
    """Convert, mix and pack ``section`` (see the module doc); the shards to train on.

    Raises:
        ConversionError, ValidationError, TemplateError, ConfigError: as ``convert``/``pack``.
    """
    opts = section.pack_options(section.tokenizer or model_spec)
    work = work_dir(section, model_spec)
    work.mkdir(parents=True, exist_ok=True)
    out = Prepared(shards=work / "shards", work=work)
    with exclusive(work, writer="a data section's preparation"):
        parts = []
        for k, inp in enumerate(section.inputs):
            target = work / "inputs" / f"{k:02d}.jsonl"
            target.parent.mkdir(exist_ok=True)
            out.converted.append(_convert_input(inp, section, target, log))
            parts.append(target)
        data = work / "data.jsonl"
        out.mixed = mix(
            parts, section.inputs, data, default_max=section.max_samples, seed=opts.seed
        )
        old = existing_index(out.shards)
        out.pack = pack([data], out.shards, opts)
        out.repacked = old is not None and not out.pack.noop
    return out


def _convert_input(
    inp: DataInput, section: DataSection, target: Path, log: Callable[[str], None] | None
) -> ConvertReport:
    sources: list[str | Path | RegistryEntry]
    if inp.dataset is not None:
        sources = list(registry_inputs(section.dataset_info, [inp.dataset], log=log))
        return convert(sources, target, log=log)
    return convert([inp.path], target, fmt=inp.fmt, mapping=inp.map, sheet=inp.sheet, log=log)


def predict_section(section: DataSection, model_spec: str) -> DataSection | None:
    """The section whose shards the predict step generates from: the ``predict_inputs`` with the
    same template, tokenizer and options, nothing held out, in ``predict/`` of the section's work
    folder (never the training shards, even for the same inputs); None without them."""
    if not section.predict_inputs:
        return None
    return dataclasses.replace(
        section, inputs=section.predict_inputs, predict_inputs=(),
        options={**section.options, "val_fraction": None, "val_count": None},
        cache_dir=str(work_dir(section, model_spec) / "predict"),
    )  # fmt: skip


def mix_counts(n: int, weight: float, max_samples: int | None) -> tuple[int, int]:
    """(records available after max_samples, records it contributes: round(weight x that))."""
    avail = n if max_samples is None else min(n, max_samples)
    return avail, round(weight * avail)


def mix(
    parts: list[Path], inputs: tuple[DataInput, ...], target: Path, *, default_max: int | None,
    seed: int,
) -> list[int]:  # fmt: skip
    """Write ``target`` from the converted ``parts``: per input its first ``max_samples``
    records, every one ``floor(weight)`` times, plus a seeded sample for the fraction; repeated
    records get ``#2``, ``#3`` ... ids and ids stay unique across inputs. Streams every part
    (a pass per whole copy); returns the records taken per input."""
    taken = []
    seen: set[bytes] = set()
    with atomic_file(target) as out:
        for k, (part, inp) in enumerate(zip(parts, inputs, strict=True)):
            with part.open("rb") as f:
                n = sum(1 for _ in f)
            avail, want = mix_counts(n, inp.weight, inp.max_samples or default_max)
            full, rest = divmod(want, avail) if avail else (0, 0)
            rng = np.random.default_rng([seed, k])
            extra = set(rng.choice(avail, size=rest, replace=False).tolist()) if rest else set()
            count = 0
            for copy in range(full + (1 if extra else 0)):
                with part.open(encoding="utf-8") as f:
                    for i, line in enumerate(f):
                        if i >= avail:
                            break
                        if copy == full and i not in extra:
                            continue
                        out.write(_unique_id(line, copy, seen))
                        count += 1
            taken.append(count)
    if not sum(taken):
        raise ConfigError("data: no records left to pack after max_samples and weights")
    return taken


def _unique_id(line: str, copy: int, seen: set[bytes]) -> str:
    """The record of ``line`` with an id no earlier record of the mix has."""
    rec = json.loads(line)
    rid = str(rec["id"]) if copy == 0 else f"{rec['id']}#{copy + 1}"
    while (key := hashlib.blake2b(rid.encode(), digest_size=8).digest()) in seen:
        rid += "'"  # two inputs whose records share ids (files of the same name)
    seen.add(key)
    if rid == rec["id"]:
        return line if line.endswith("\n") else line + "\n"
    rec["id"] = rid
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


__all__ = [
    "SECTION_KEYS",
    "SECTION_PACK_KEYS",
    "DataInput",
    "DataSection",
    "Prepared",
    "mix",
    "mix_counts",
    "parse_data_section",
    "predict_section",
    "prepare",
    "section_help",
    "section_key",
    "work_dir",
]
