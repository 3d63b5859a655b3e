"""``sftdata convert``: raw files of any supported shape → one canonical conversations JSONL.

Records stream from the adapters straight into an atomic output file: nothing is held in memory
but the current record (plus, with ``--dedup``, a 16-byte digest per distinct record, and an
8-byte hash per record that carries its own id). Every record passes the same structural rules
as ``sftdata validate``, so the output always validates clean.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sftdata.atomic import atomic_file
from sftdata.conversation import Conversation
from sftdata.errors import ConversionError, RecordError
from sftdata.inputs import refuse_overwriting
from sftdata.sources import IdAllocator, detect_format, iter_records
from sftdata.sources.base import set_system
from sftdata.sources.registry import RegistryEntry
from sftdata.text import counted
from sftdata.validate import structure_problems

#: At most this many skipped-record messages are kept in the report (the counts are complete).
MAX_EXAMPLES = 20


@dataclass
class InputReport:
    """What happened to one input file."""

    path: str
    format: str
    """The format used (given with --from, or detected)."""
    reason: str
    """Why that format: "given with --from" or the detection's explanation."""
    records_in: int = 0
    """Raw records read (a seed task with k instances counts k)."""
    records_out: int = 0
    """Conversations written from this file."""


@dataclass
class ConvertReport:
    """The summary of a conversion: records in/out and dropped records by reason."""

    output: str
    inputs: list[InputReport] = field(default_factory=list)
    """Per input file, in order."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Dropped records by reason ("duplicate", "empty answer", "invalid JSON", ...)."""
    examples: list[str] = field(default_factory=list)
    """The first skipped records' one-line messages."""

    @property
    def records_in(self) -> int:
        """Raw records read over all inputs."""
        return sum(i.records_in for i in self.inputs)

    @property
    def records_out(self) -> int:
        """Canonical records written over all inputs."""
        return sum(i.records_out for i in self.inputs)

    def to_dict(self) -> dict:
        """The report as JSON-able values (``sftdata convert --json``)."""
        return {
            "output": self.output,
            "records_in": self.records_in,
            "records_out": self.records_out,
            "dropped": dict(self.dropped),
            "inputs": [dataclasses.asdict(i) for i in self.inputs],
        }

    def summary_lines(self) -> list[str]:
        """Human summary, one line each (the CLI prints these on stderr)."""
        lines = [
            f"{i.path}: {counted(i.records_in, 'record')} in, {i.records_out:,} out ({i.format})"
            for i in self.inputs
        ]
        dropped = sum(self.dropped.values())
        by_reason = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items()))
        lines.append(
            f"wrote {counted(self.records_out, 'record')} to {self.output} "
            f"({self.records_in} in, {dropped} dropped{': ' + by_reason if dropped else ''})"
        )
        return lines


def _digest(conv: Conversation) -> bytes:
    return hashlib.blake2b(conv.content_key().encode(), digest_size=16).digest()


def convert(
    inputs: Sequence[str | Path | RegistryEntry],
    output: str | Path,
    *,
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    sheet: str | None = None,
    encoding: str | None = None,
    system: str | None = None,
    dedup: bool = False,
    skip_invalid: bool = False,
    log: Callable[[str], None] | None = None,
) -> ConvertReport:
    """Convert ``inputs`` (concatenated, in order) into canonical JSONL at ``output``.

    Args:
        inputs: raw files, or LLaMA-Factory registry entries (``sftdata.sources.registry``).
        output: the JSONL to write (atomically: nothing is left behind on failure).
        fmt: ``"auto"`` or a format from :data:`sftdata.sources.FORMATS`.
        mapping: raw field/column → canonical field (``--map``).
        sheet: worksheet of ``.xlsx`` inputs (default: first sheet).
        encoding: encoding of CSV/TSV/JSON inputs (default UTF-8).
        system: system prompt to add, or to replace each record's own with.
        dedup: drop records whose messages and tools equal an earlier record's.
        skip_invalid: count and skip bad records instead of failing on the first.
        log: called with one line per input saying which format is used and why.

    Raises:
        ConversionError: naming file and line/row for the first bad record (unless
            ``skip_invalid``), any unreadable input, or when no record is left to write.
    """
    output = Path(output)
    _check_arguments(inputs, output, system)
    report = ConvertReport(output=str(output))
    keep = _RecordFilter(report, system=system, dedup=dedup, skip_invalid=skip_invalid)
    ids = IdAllocator()
    with atomic_file(output) as out:
        for raw in inputs:
            # A LLaMA-Factory registry entry (from --dataset-info) brings its own format,
            # column mapping and role tags.
            entry = raw if isinstance(raw, RegistryEntry) else None
            path = Path(entry.path if entry else raw)
            used, reason = _format_of(path, entry, fmt=fmt, mapping=mapping, encoding=encoding)
            if log and entry is None and fmt == "auto":
                log(f"{path}: detected {used} ({reason}); use --from to override")
            item_report = InputReport(path=str(path), format=used, reason=reason)
            report.inputs.append(item_report)
            for item in iter_records(
                path, fmt=used, mapping=(entry.mapping or None) if entry else mapping,
                sheet=sheet if used == "xlsx" else None, encoding=encoding, ids=ids,
                role_tags=entry.role_tags if entry else None,
            ):  # fmt: skip
                item_report.records_in += 1
                conv = keep(item)
                if conv is not None:
                    out.write(conv.to_json())
                    out.write("\n")
                    item_report.records_out += 1
        if sheet is not None and not any(i.format == "xlsx" for i in report.inputs):
            raise ConversionError(f"--sheet {sheet!r}: none of the inputs is an .xlsx workbook")
        if report.records_out == 0:
            dropped = sum(report.dropped.values())
            raise ConversionError(
                f"{report.inputs[-1].path}: no records to write ({report.records_in} read, {dropped} dropped)"
            )
    return report


def _check_arguments(
    inputs: Sequence[str | Path | RegistryEntry], output: Path, system: str | None
) -> None:
    if not inputs:
        raise ConversionError("no input files given")
    if system is not None and not system.strip():
        raise ConversionError("--system: the system prompt is empty")
    if output.is_dir():
        raise ConversionError(f"{output}: is a folder; -o needs a file name such as data.jsonl")
    if not output.parent.exists():
        raise ConversionError(f"{output.parent}: output folder does not exist")
    refuse_overwriting([p.path if isinstance(p, RegistryEntry) else p for p in inputs], output)


def _format_of(
    path: Path, entry: RegistryEntry | None, *, fmt: str, mapping: dict[str, str] | None,
    encoding: str | None,
) -> tuple[str, str]:  # fmt: skip
    """The format an input is read as, and why."""
    if entry:
        return entry.fmt, f"dataset_info.json entry {entry.name!r}"
    if fmt == "auto":
        return detect_format(path, mapping=mapping, encoding=encoding)
    return fmt, "given with --from"


class _RecordFilter:
    """What becomes of each record the adapters yield: the system prompt set, refused (bad
    structure, or an adapter's RecordError) or counted and skipped with ``skip_invalid``, dropped
    as a duplicate with ``dedup``; else returned to be written."""

    def __init__(
        self, report: ConvertReport, *, system: str | None, dedup: bool, skip_invalid: bool
    ) -> None:
        self.report, self.system, self.dedup, self.skip_invalid = (
            report,
            system,
            dedup,
            skip_invalid,
        )
        self.seen: set[bytes] = set()

    def _drop(self, reason: str, message: str) -> None:
        self.report.dropped[reason] += 1
        if len(self.report.examples) < MAX_EXAMPLES:
            self.report.examples.append(message)

    def __call__(self, item: Conversation | RecordError) -> Conversation | None:
        if isinstance(item, RecordError):
            if not self.skip_invalid:
                raise item
            self._drop(item.reason, str(item))
            return None
        if self.system is not None:
            item.messages = set_system(item.messages, self.system)
        problems = structure_problems([m.to_dict() for m in item.messages])
        if problems:
            message = f"{item.source}: {problems[0]}"
            if not self.skip_invalid:
                raise ConversionError(message)
            self._drop("bad structure", message)
            return None
        if self.dedup:
            key = _digest(item)
            if key in self.seen:
                self.report.dropped["duplicate"] += 1
                return None
            self.seen.add(key)
        return item
