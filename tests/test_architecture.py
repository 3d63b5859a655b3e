"""The import rules of the layout (README "Architecture"), read from the source with ``ast``:
no import cycles (function-level imports included), the data package never imports the
trainer, the trainer reads data only as shards, and only the CLI layer talks to the terminal."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sftdata", "sfttrain")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Our modules that ``path`` imports anywhere (``from pkg import submodule`` names the
    submodule, not the package)."""
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            deps.update(subs) if all(s in MODULES for s in subs) else deps.add(node.module)
    return {d for d in deps if d in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_packages() -> None:
    # the rules below would hold vacuously over an empty graph
    assert len(MODULES) > 40 and "sfttrain.train" in GRAPH["sfttrain.commands.run"]


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_the_data_package_never_imports_the_trainer() -> None:
    bad = [(a, b) for a, deps in GRAPH.items() if a.startswith("sftdata") for b in deps
           if b.startswith("sfttrain")]  # fmt: skip
    assert bad == []


# What the trainer may use of sftdata: shards, the tokenizer/templates (generate renders
# prompts), errors and small shared utilities. Never the raw readers, the packer or exports.
TRAINER_MAY_USE = {
    "sftdata", "sftdata.atomic", "sftdata.clickutil", "sftdata.conversation", "sftdata.errors",
    "sftdata.extras", "sftdata.inputs", "sftdata.jsonfile", "sftdata.remote", "sftdata.shards",
    "sftdata.templates",
    "sftdata.text", "sftdata.tokenizer", "sftdata.yamlfile",
}  # fmt: skip


# `sfttrain run -c` with a data section wires convert and pack, through this one module.
RUN_COMMAND_MAY_ALSO_USE = {"sftdata.recipe"}


def test_the_trainer_reads_data_only_as_shards() -> None:
    def used(cli: bool) -> set[str]:
        return {b for a, deps in GRAPH.items() if a.startswith("sfttrain") and _is_cli(a) == cli
                for b in deps if b.startswith("sftdata")}  # fmt: skip

    assert used(cli=False) <= TRAINER_MAY_USE
    assert used(cli=True) <= TRAINER_MAY_USE | RUN_COMMAND_MAY_ALSO_USE
    assert GRAPH["sfttrain.commands.run"] >= RUN_COMMAND_MAY_ALSO_USE


def _is_cli(name: str) -> bool:
    return ".commands" in name or name.endswith(".cli") or name == "sftdata.clickutil"


def test_only_the_cli_layer_talks_to_the_terminal() -> None:
    # library code raises; the commands print and exit (pure core, thin shell)
    loud = re.compile(r"^\s*(import click|from click)|\bprint\(|sys\.exit\(", re.M)
    bad = [n for n, p in MODULES.items() if not _is_cli(n) and loud.search(p.read_text("utf-8"))]
    assert bad == []


def test_commands_are_imported_only_by_their_cli() -> None:
    for name, deps in GRAPH.items():
        if not _is_cli(name):
            assert not [d for d in deps if ".commands" in d], name


def test_every_error_class_lives_in_errors() -> None:
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append((name, node.name))
    # bounds.py's is internal: raised inside a render and reported as a TemplateError
    allowed = {"sftdata.errors", "sftdata.templates.bounds"}
    assert [f for f in found if f[0] not in allowed] == []


BASE = {
    "sftdata", "sftdata.errors", "sftdata.inputs", "sftdata.atomic", "sftdata.jsonfile",
    "sftdata.yamlfile", "sftdata.text", "sftdata.extras", "sftdata.cache", "sftdata.bounded",
}  # fmt: skip
"""The ground floor (README, "Architecture"): small utilities every stage may use, which use
nothing but each other."""


def test_the_shared_base_stands_on_itself() -> None:
    assert {m: GRAPH[m] - BASE for m in BASE if GRAPH[m] - BASE} == {}
    # and it is used: every stage of both packages stands on it
    assert all(
        GRAPH[m] & BASE for m in ("sftdata.convert", "sftdata.pack.pipeline", "sfttrain.train")
    )


def test_pack_options_are_declared_once() -> None:
    # PackOptions is their one declaration (type, default, help): a command that builds one makes
    # its options from its fields (sftdata.commands.pack.pack_option), never spells them again
    import dataclasses

    from sftdata.pack import PackOptions

    knobs = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(PackOptions)}
    spelled = {}
    for name, path in MODULES.items():
        text = path.read_text("utf-8")
        if _is_cli(name) and "PackOptions" in text:
            spelled[name] = set(re.findall(r'click\.option\(\s*"(--[a-z-]+)"', text)) & knobs
    assert {"sftdata.commands.pack", "sftdata.commands.audit"} <= set(spelled)
    assert {n: s for n, s in spelled.items() if s} == {}


def _declared_all(path: Path) -> set[str] | None:
    for node in ast.parse(path.read_text("utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", "") == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    return None


def test_a_module_that_declares_all_is_used_through_it() -> None:
    # __all__ is a module's face: where one is declared, other modules import only what it lists
    faces = {n: a for n, p in MODULES.items() if (a := _declared_all(p)) is not None}
    assert len(faces) > 40
    behind = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in faces:
                behind += [(name, node.module, a.name) for a in node.names
                           if a.name not in faces[node.module] and not a.name.startswith("_")
                           and f"{node.module}.{a.name}" not in MODULES]  # fmt: skip
    assert behind == []


def test_comments_point_at_the_readme_not_at_design_notes_or_issues() -> None:
    # a user reads the README; DESIGN.md paragraphs and issue numbers are the team's, and go stale
    stale = re.compile(r"DESIGN §|DESIGN\.md|\bissues? \d+")
    found = [n for n, p in MODULES.items() if stale.search(p.read_text("utf-8"))]
    assert found == []


MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 90
LONG_ON_PURPOSE: set[tuple[str, str]] = set()
"""(module, function) allowed past MAX_FUNCTION_LINES, each with its reason; none today (the
training loop, the longest, fits since the run's set-up and end left it)."""


def test_modules_hold_one_concept_and_stay_short() -> None:
    long = {n: c for n, p in MODULES.items() if (c := len(p.read_text("utf-8").splitlines())) >
            MAX_MODULE_LINES}  # fmt: skip
    assert long == {}


def test_functions_fit_a_screen_or_two() -> None:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (name, node.name) not in LONG_ON_PURPOSE:
                    long.append((name, node.name, lines))
    assert long == []
    # the exception still exists (else the allowance would hide nothing and should go)
    assert all(
        any(isinstance(n, ast.FunctionDef) and n.name == fn
            for n in ast.walk(ast.parse(MODULES[mod].read_text("utf-8"))))
        for mod, fn in LONG_ON_PURPOSE
    )  # fmt: skip


def _tested_module(test_file: Path) -> str | None:
    """The module a test file is named after: ``tests/sftdata/pack/test_rows.py`` ->
    ``sftdata.pack.rows``; ``test_convert_real_data.py`` -> ``sftdata.convert`` (one aspect of
    it); ``tests/sftdata/sources/test_sources.py`` -> the package ``sftdata.sources``."""
    rel = test_file.relative_to(ROOT / "tests").with_suffix("")
    folder, words = list(rel.parts[:-1]), rel.name.removeprefix("test_").split("_")
    for n in range(len(words), 0, -1):
        stem = "_".join(words[:n])
        for name in (".".join([*folder, stem]), ".".join(folder) if stem == folder[-1] else ""):
            if name in MODULES:
                return name
    return None


def test_test_files_mirror_the_packages() -> None:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / "tests" / pkg).rglob("test_*.py"))]
    assert len(files) > 20
    assert [str(p.relative_to(ROOT)) for p in files if _tested_module(p) not in MODULES] == []
