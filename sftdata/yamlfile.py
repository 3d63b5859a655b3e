"""YAML for configs a user hands us: safe tags only, bounded aliases, no duplicate keys.

PyYAML's ``safe_load`` already refuses ``!!python`` tags, but it accepts two things that hurt:

- alias bombs: nine anchors of nine references each are a 300-byte file whose value is a
  billion-element tree once anything walks it (a config coercion, ``str()``, ``json.dumps``).
  The composed document is measured with shared nodes counted as often as they are referenced,
  and refused past :data:`MAX_NODES`.
- duplicate keys, where the last value wins silently (``lr: 1e-4`` ... ``lr: 1e-3``).

Nesting deep enough to exhaust the parser's recursion is reported as such, not as a traceback.
"""

from __future__ import annotations

from typing import Any

from sftdata.errors import ConfigError

MAX_NODES = 100_000
"""Most scalars, lists and mappings a config may hold with aliases expanded (a long
LLaMA-Factory YAML has a few hundred)."""


def load_yaml(text: str, *, where: str) -> Any:
    """Parse one YAML document; ``where`` (a path, ``--set key``) starts every error.

    Raises:
        ConfigError: ``WHERE:LINE: what is wrong`` for bad syntax, unsafe tags, a duplicate key,
            an alias expansion past :data:`MAX_NODES` or nesting too deep.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_document(self) -> Any:
            node = super().compose_document()
            if _expanded_size(node) > MAX_NODES:
                raise _Refused(
                    node.start_mark,
                    f"expands to more than {MAX_NODES:,} values through aliases (an alias bomb?)",
                )
            return node

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # '<<' merges are meant to be overridden by later keys
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node)
                    except TypeError:
                        continue  # an unhashable key: the constructor reports it
                    if first is not key_node:
                        raise _Refused(
                            key_node.start_mark,
                            f"key {key!r} appears twice (first on line {first.start_mark.line + 1})",
                        )
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=Loader)
    except _Refused as e:
        raise ConfigError(f"{where}:{e.mark.line + 1}: {e.why}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ConfigError(f"{where}{line}: not valid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None


class _Refused(Exception):
    def __init__(self, mark: Any, why: str) -> None:
        super().__init__(why)
        self.mark, self.why = mark, why


def _expanded_size(root: Any) -> int:
    """Nodes under ``root`` counting a shared (aliased) node once per reference; memoised, so a
    bomb is measured in time linear in its text."""
    import yaml

    sizes: dict[int, int] = {}
    open_: set[int] = set()  # nodes whose children are being measured
    # post-order without recursion (the parser's own depth limit is the only one that applies)
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            sizes[id(node)] = 1
            continue
        if done:
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_NODES + 1)
            open_.discard(id(node))
            continue
        if id(node) in open_:
            raise _Refused(node.start_mark, "an alias refers to the value that contains it")
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]
