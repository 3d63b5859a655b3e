"""The audit report as text: the terminal table, GitHub annotations and JUnit XML (each check a
test case, for CI test reports). Pure functions: the command prints or writes what they return."""

from __future__ import annotations

import re
from xml.etree import ElementTree as ET

from sftdata.audit import AuditReport
from sftdata.audit.checks import CHECKS

_WHERE = re.compile(r"^(?P<file>.+?):(?P<line>\d+)$")


def table(report: AuditReport) -> str:
    """One line per check (count, share, verdict), then the first records of each finding."""
    width = max(len(n) for n in CHECKS)
    lines = [f"{'check':<{width}}  {'count':>8}  {'share':>7}  verdict"]
    for c in report.checks.values():
        share = f"{100 * c.share:.2f}%" if c.total else "-"
        note = f"  ({c.note})" if c.note else ""
        lines.append(f"{c.name:<{width}}  {c.count:>8,}  {share:>7}  {c.verdict}{note}")
    for c in report.checks.values():
        if c.findings and c.verdict == "fail":
            lines.append(f"\n{c.name}: {CHECKS[c.name]}")
            lines += [f"  {f.where}: {f.id!r}: {f.detail}" for f in c.findings[:10]]
            if c.count > 10:
                lines.append(f"  ... {c.count - 10:,} more (--json or --html lists them)")
    ln = report.lengths
    lines.append(
        f"\n{report.records:,} records; tokens per record p50 {ln['p50']:,}, p90 {ln['p90']:,}, "
        f"p99 {ln['p99']:,} (a --seq-len that fits 99%), max {ln['max']:,}; "
        f"{report.seconds:.1f} s"
    )
    return "\n".join(lines)


def _escape(text: str) -> str:
    # GitHub workflow commands: %, CR and LF in the message must be escaped
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github(report: AuditReport) -> list[str]:
    """``::error``/``::warning`` workflow commands, one per listed record of a failing or warning
    check, pointing at its file and line."""
    out = []
    for c in report.checks.values():
        level = "error" if c.fails else "warning"
        for f in c.findings if c.verdict != "ok" else ():
            m = _WHERE.match(f.where)
            place = f"file={m['file']},line={m['line']}," if m else ""
            out.append(f"::{level} {place}title=audit {c.name}::{_escape(f'{f.id}: {f.detail}')}")
    return out


def junit(report: AuditReport) -> str:
    """JUnit XML: one ``testsuite`` ``sftdata-audit``, a ``testcase`` per check, failing checks
    with a ``failure`` listing their records."""
    failures = sum(c.fails for c in report.checks.values())
    suites = ET.Element("testsuites", name="sftdata audit", tests=str(len(report.checks)),
                        failures=str(failures), errors="0", time=f"{report.seconds:.3f}")  # fmt: skip
    suite = ET.SubElement(
        suites, "testsuite", name="sftdata-audit", tests=str(len(report.checks)),
        failures=str(failures), errors="0", skipped="0", time=f"{report.seconds:.3f}",
    )  # fmt: skip
    for c in report.checks.values():
        case = ET.SubElement(suite, "testcase", classname="sftdata.audit", name=c.name, time="0")
        summary = f"{c.count:,} of {c.total:,} ({100 * c.share:.2f}%): {CHECKS[c.name]}"
        if c.fails:
            failure = ET.SubElement(case, "failure", message=summary, type=c.name)
            failure.text = "\n".join(f"{f.where}: {f.id}: {f.detail}" for f in c.findings)
        elif c.count:
            ET.SubElement(case, "system-out").text = summary
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode")


__all__ = ["github", "junit", "table"]
