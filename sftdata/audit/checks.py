"""The audit's checks, aggregated in the main process from the records' facts: one
:class:`Check` per check, each with its count, share and the records it lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sftdata.audit.facts import NUM_PERM, SCHEME, Facts
from sftdata.errors import ConfigError

CHECKS: dict[str, str] = {
    "masks": "trained tokens differ from the second renderer (transformers' apply_chat_template)",
    "no_stop": "trained replies that end without a stop token",
    "appended_stops": "replies the template ends with no stop token (pack inserts one)",
    "control_tokens": "records with control tokens inside message text",
    "refused": "records pack refuses (template errors, text the template leaves out)",
    "fold_ins": "records with fold-ins (parts the template cannot render natively)",
    "too_long": "records longer than --seq-len",
    "exact_duplicates": "records whose normalised text repeats an earlier record's",
    "near_duplicates": "records in a near-duplicate cluster (MinHash LSH), exact copies aside",
    "leakage": "validation records that duplicate or nearly duplicate a training record",
    "contamination": "records sharing a word n-gram with an evaluation item",
    "empty_reply": "records with an empty or whitespace-only trained reply",
    "echo_reply": "records with a reply equal to its prompt",
    "refusal_reply": "records with a refusal boilerplate reply",
    "mixed_script": "records whose replies are in another script than most of the set's",
}
"""Every check, by the name ``--fail-on`` uses, in report order."""
DEFAULT_FAIL_ON = "masks,no_stop,control_tokens"
"""What fails the audit unless ``--fail-on`` says otherwise."""


@dataclass
class Finding:
    """One listed record of a check."""

    id: str
    where: str
    """Where the record came from (its source)."""
    detail: str
    file: str = ""
    """The canonical JSONL file it is in."""
    line: int = 0
    """Its line there."""


@dataclass
class Check:
    """One check's outcome."""

    name: str
    count: int = 0
    """Records it found."""
    total: int = 0
    """What the count is a share of."""
    findings: list[Finding] = field(default_factory=list)
    """The first ``list_limit`` records found."""
    fails: bool = False
    """Past its ``--fail-on`` threshold."""
    note: str = ""
    """What it could not look at (e.g. records the second renderer did not check)."""

    @property
    def share(self) -> float:
        """``count / total`` (0 for an empty total)."""
        return self.count / self.total if self.total else 0.0

    @property
    def verdict(self) -> str:
        """``fail``, ``warn`` (found something, not failing) or ``ok``."""
        return "fail" if self.fails else "warn" if self.count else "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name, "title": CHECKS[self.name], "count": self.count,
            "total": self.total, "share": self.share, "verdict": self.verdict, "note": self.note,
            "findings": [f.__dict__ for f in self.findings],
        }  # fmt: skip


def parse_fail_on(spec: str) -> dict[str, float]:
    """``CHECK[>RATE],...`` -> {check: the share above which it fails}; RATE is a fraction or a
    percentage, 0 when left out (any finding fails).

    Raises:
        ConfigError: an unknown check or a rate that is not a number, naming it.
    """
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part or part == "none":
            continue
        name, _, rate = part.partition(">")
        name = name.strip()
        if name not in CHECKS:
            raise ConfigError(f"--fail-on: {name!r} is not a check (checks: {', '.join(CHECKS)})")
        try:
            value = float(rate.strip().rstrip("%") or 0) / (
                100 if rate.strip().endswith("%") else 1
            )
        except ValueError:
            raise ConfigError(f"--fail-on: {rate.strip()!r} is not a rate ({name}>RATE)") from None
        out[name] = value
    return out


class Collector:
    """Aggregates facts chunk by chunk, while the workers go on: n-gram hashes are matched and
    dropped, exact copies keyed, MinHash signatures inserted into the LSH index and dropped."""

    def __init__(
        self, *, seq_len: int | None, list_limit: int, eval_index: Any = None,
        validation_ids: frozenset[str] = frozenset(), threshold: float = 0.8,
    ):  # fmt: skip
        self.validation_ids = validation_ids
        """Records of the training inputs that a shard folder put in its validation split."""
        self.seq_len = seq_len
        self.list_limit = list_limit
        self.eval_index = eval_index
        self.threshold = threshold
        self.facts: list[Facts] = []
        self.checks = {name: Check(name) for name in CHECKS}
        self._first: dict[bytes, int] = {}
        """The first record of each exact key."""
        self._parent: list[int] = []
        """Union-find over records: exact copies and LSH candidates joined."""
        self._lsh: Any = None

    def _found(self, name: str, f: Facts, detail: str) -> None:
        c = self.checks[name]
        c.count += 1
        if len(c.findings) < self.list_limit:
            c.findings.append(Finding(f.id, f.where, detail, f.file, f.line))

    def _root(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def add(self, chunk: list[Facts]) -> None:
        """Take one task's facts."""
        hits: list[str | None] = [None] * len(chunk)
        if self.eval_index is not None:
            none = np.empty(0, np.uint64)
            hits = self.eval_index.match([none if f.ngrams is None else f.ngrams for f in chunk])
        for f, hit in zip(chunk, hits, strict=True):
            if f.id in self.validation_ids:
                f.split = "validation"
            self._record_checks(f)
            if hit:
                self._found("contamination", f, hit)
            f.ngrams = None
            self._cluster(f)
            self.facts.append(f)

    def _record_checks(self, f: Facts) -> None:
        if f.reason == "control_token":
            self._found("control_tokens", f, f.refusal or "")
        elif f.refusal is not None:
            self._found("refused", f, f.refusal)
        if f.mismatch is not None:
            self._found("masks", f, f.mismatch)
        if f.no_stop:
            self._found("no_stop", f, f"{f.no_stop} trained repl(ies) without a stop")
        if f.appended:
            self._found("appended_stops", f, f"stop inserted after {f.appended} repl(ies)")
        if f.fold_ins:
            self._found("fold_ins", f, ", ".join(f.fold_ins))
        if self.seq_len and f.tokens > self.seq_len:
            self._found("too_long", f, f"{f.tokens:,} tokens > --seq-len {self.seq_len:,}")
        for flag in f.flags:
            self._found(flag, f, CHECKS[flag].split(" with ")[-1])

    def _cluster(self, f: Facts) -> None:
        """An exact copy joins its first record's cluster (its signature is the same: no LSH
        work); any other record joins the clusters of the LSH candidates for its signature."""
        i = len(self._parent)
        self._parent.append(i)
        j = self._first.setdefault(f.key, i)
        if j != i:
            g = self.facts[j]
            self._found("exact_duplicates", f, f"same text as {g.id!r} ({g.where})")
            self._parent[i] = self._root(j)
        elif f.minhash is not None:
            from datasketch import LeanMinHash, MinHashLSH

            if self._lsh is None:
                self._lsh = MinHashLSH(threshold=self.threshold, num_perm=NUM_PERM)
            # LeanMinHash: the signature alone, no permutations built per record
            mh = LeanMinHash(seed=1, hashvalues=f.minhash, scheme=SCHEME)
            for k in self._lsh.query(mh):
                self._parent[self._root(k)] = self._root(i)
            self._lsh.insert(i, mh)
        f.minhash = None

    def finish(self, *, fail_on: dict[str, float]) -> dict[str, Check]:
        """Run the whole-set checks (near duplicates, leakage, script) and apply ``fail_on``."""
        n = len(self.facts)
        train = [f for f in self.facts if f.split == "train"]
        _clusters(self)
        _mixed_script(self, train)
        checked = sum(f.checked for f in self.facts)
        for c in self.checks.values():
            c.total = n
        self.checks["leakage"].total = n - len(train)
        self.checks["masks"].total = checked
        unchecked = n - checked - sum(f.refusal is not None for f in self.facts)
        if unchecked > 0:
            self.checks["masks"].note = f"{unchecked:,} records not checked (--sample)"
        for name, rate in fail_on.items():
            c = self.checks[name]
            c.fails = c.count > 0 and c.share > rate
        return self.checks


def _clusters(col: Collector) -> None:
    """Near duplicates: the members of a cluster (union-find over exact copies and LSH
    candidates) that are not exact copies of one already listed; leakage: validation records in
    a cluster with training ones."""
    clusters: dict[int, list[int]] = {}
    for i in range(len(col.facts)):
        clusters.setdefault(col._root(i), []).append(i)
    sizes = []
    for members in clusters.values():
        if len(members) == 1:
            continue
        head = col.facts[members[0]]
        if len({col.facts[i].key for i in members}) > 1:
            sizes.append(len(members))
            seen = {head.key}
            for i in members[1:]:
                f = col.facts[i]
                if f.key not in seen:
                    seen.add(f.key)
                    detail = f"near {head.id!r} ({head.where}); cluster of {len(members)}"
                    col._found("near_duplicates", f, detail)
        train = [col.facts[i] for i in members if col.facts[i].split == "train"]
        for i in members:
            f = col.facts[i]
            if f.split != "train" and train:
                detail = f"duplicates training record {train[0].id!r} ({train[0].where})"
                col._found("leakage", f, detail)
    col.checks["near_duplicates"].note = (
        f"{len(sizes):,} clusters, largest {max(sizes)}" if sizes else ""
    )


def _mixed_script(col: Collector, train: list[Facts]) -> None:
    scripts = [f.script for f in train if f.script]
    if not scripts:
        return
    names, counts = np.unique(scripts, return_counts=True)
    main = str(names[int(np.argmax(counts))])
    col.checks["mixed_script"].note = f"most replies are in {main} script"
    for f in train:
        if f.script and f.script != main:
            col._found("mixed_script", f, f"replies in {f.script} script")


__all__ = ["CHECKS", "DEFAULT_FAIL_ON", "Check", "Collector", "Finding", "parse_fail_on"]
