"""Bounds on the work one template render may do, so a hostile template cannot hang or exhaust
memory: ``{% set s = 'x' * 3000000000 %}`` or nested ``range(100000)`` loops.

The bounds are counts, not a clock, so a render's verdict is the same on every machine (a
time limit would make the packed output depend on the machine's speed):

- every loop item and every call a sandboxed template makes spends one step of a per-render
  budget (:data:`MAX_STEPS`); a macro that recurses with fan-out is calls too; ``range()`` is
  at most that long;
- ``*``, ``**``, ``+`` and ``%`` on strings, lists and numbers, the filters and the ``str``
  methods that widen text (``center``, ``ljust``, ``replace``, ``join``, ``format``...) are
  checked before they run against :data:`MAX_CHARS` / :data:`MAX_ITEMS`;
- what a render outputs is counted as it is produced (``JinjaTemplate``) against :data:`MAX_CHARS`.

Under the counts lies a floor the operating system keeps (:func:`cpu_floor`): a render that
escapes them (a C-level string method no count covers, say) is stopped after
:data:`MAX_RENDER_CPU_S` seconds of CPU time. That bound is a clock, so it is set far above
anything a counted render takes: it decides only renders no count would have let finish.

Templates from files and tokenizer configs run in Jinja's sandbox with all of these. Our own
built-in files skip the sandbox for speed (templates/__init__.py) and keep the loop, ``~``,
range and output bounds: what they do grows only with the record's messages and tools.
"""

from __future__ import annotations

import _signal
import copy
import math
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

MAX_STEPS = 250_000
"""``range()`` items plus calls in one render (the real templates take a few per message and
tool; a test measures them on the shared data)."""
MAX_CHARS = 1 << 25
"""Characters of any string a template builds or outputs (32 Mi: far past any record that fits
a context window)."""
MAX_ITEMS = 1 << 20
"""Items of any list or tuple a template builds with ``*``/``+``."""
MAX_RENDER_CPU_S = 20.0
"""CPU seconds the renders of one record may take (the floor under the counts; real renders
take milliseconds)."""
_WIDE_NUMBER = re.compile(r"\d{8,}")
"""A width/precision of eight digits or more in a format string (10**7 characters and up)."""


class TemplateBoundError(Exception):
    """A template went past one of this module's bounds (reported as a template error)."""


class _Budget(threading.local):
    steps = MAX_STEPS


_BUDGET = _Budget()


class cpu_floor:
    """Context: the renders inside are stopped with :class:`TemplateBoundError` once this
    process has spent :data:`MAX_RENDER_CPU_S` CPU seconds in them (``ITIMER_PROF``; the
    ``SIGPROF`` handler is installed once per process). The renderer arms it once around all the
    renders of a record; nested, only the outermost counts. Only in the main thread (where Python
    runs signal handlers) and while the timer is nobody else's; elsewhere the counted bounds
    stand alone."""

    _active = False
    _installed = False

    def __enter__(self) -> cpu_floor:
        import signal

        # Entered around every render and armed once per record (nested entries return at
        # once), so arming is kept cheap: ``signal.getsignal`` converts a Python handler through
        # the Handlers enum by a caught ValueError, a third of a short render's time (measured);
        # ``_signal.getsignal``, which it wraps, returns the handler as it is.
        self._armed = False
        if cpu_floor._active or threading.current_thread() is not threading.main_thread():
            return self
        if not cpu_floor._installed:
            if signal.getsignal(signal.SIGPROF) not in (signal.SIG_DFL, None):
                return self  # a profiler's handler: leave it be
            signal.signal(signal.SIGPROF, _over_cpu)
            cpu_floor._installed = True
        elif _signal.getsignal(signal.SIGPROF) is not _over_cpu:
            return self
        cpu_floor._active = self._armed = True
        signal.setitimer(signal.ITIMER_PROF, render_cpu_s())
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._armed:
            cpu_floor._active = False
            signal.setitimer(signal.ITIMER_PROF, 0)


def render_cpu_s() -> float:
    """:data:`MAX_RENDER_CPU_S`, or ``SFTPIPE_RENDER_CPU_S`` where set (a positive number)."""
    import os

    text = os.environ.get("SFTPIPE_RENDER_CPU_S")
    if not text:  # the usual case, without the cost of a caught ValueError per render
        return MAX_RENDER_CPU_S
    try:
        value = float(text)
    except ValueError:
        return MAX_RENDER_CPU_S
    return value if value > 0 else MAX_RENDER_CPU_S


def _over_cpu(signum: int, frame: Any) -> None:
    if cpu_floor._active:
        cpu_floor._active = False
        raise TemplateBoundError(
            f"the template took more than {render_cpu_s():g} CPU seconds for one record "
            "(SFTPIPE_RENDER_CPU_S raises it)"
        )


def reset() -> None:
    """Start a render with a full step budget (this thread's)."""
    _BUDGET.steps = MAX_STEPS


def spend(n: int = 1) -> None:
    _BUDGET.steps -= n
    if _BUDGET.steps < 0:
        raise TemplateBoundError(
            f"the template took more than {MAX_STEPS:,} loop iterations and calls for one record"
        )


class BoundedRange(Sequence):
    """``range()`` of at most :data:`MAX_STEPS` items (a sequence like range)."""

    def __init__(self, *args: int) -> None:
        self._r = range(*args)
        if len(self._r) > MAX_STEPS:
            raise TemplateBoundError(f"range() of more than {MAX_STEPS:,} items")

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i: Any) -> Any:
        return self._r[i]

    def __iter__(self) -> Iterator[int]:
        return iter(self._r)  # a sandboxed loop spends per item (counted_iter)

    def __repr__(self) -> str:
        return repr(self._r)


def check_chars(n: int, what: str) -> None:
    if n > MAX_CHARS:
        raise TemplateBoundError(
            f"{what} would make a string of {n:,} characters (limit {MAX_CHARS:,})"
        )


def _check_items(n: int, what: str) -> None:
    if n > MAX_ITEMS:
        raise TemplateBoundError(f"{what} would make a list of {n:,} items (limit {MAX_ITEMS:,})")


def _text_len(x: Any) -> int:
    """An upper estimate of ``len(str(x))`` (and of ``x``'s JSON), found by walking containers
    — a list shared a hundred times over is walked a hundred times, as ``str`` would — with at
    most :data:`MAX_ITEMS` visits: past them, past :data:`MAX_CHARS`."""
    total, visits, stack = 0, 0, [x]
    while stack:
        v = stack.pop()
        visits += 1
        if visits > MAX_ITEMS or total > MAX_CHARS:
            return MAX_CHARS + 1
        if isinstance(v, (str, bytes)):
            total += 4 * len(v) + 2  # escapes of bytes and JSON at most quadruple a character
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        else:
            total += 64  # a number or an object's short repr
    return total


def _check_text(x: Any, what: str) -> None:
    """``str(x)`` (or its JSON) refused before it is made when it would pass the bound."""
    if not isinstance(x, (str, int, float)) or (isinstance(x, int) and x.bit_length() > 4096):
        check_chars(_text_len(x), what)


def _size(x: Any) -> tuple[str, int] | None:
    if isinstance(x, (str, bytes)):
        return "str", len(x)
    if isinstance(x, (list, tuple)):
        return "list", len(x)
    return None


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``left OP right`` before it runs when its result would pass a bound."""
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            # each squaring doubles the digits: the product's bits, before it is made
            if left.bit_length() + right.bit_length() > 4096:
                raise TemplateBoundError("'*' would make a number of over 4,096 bits")
            return
        for seq, n in ((left, right), (right, left)):
            size = _size(seq)
            if size is not None and isinstance(n, int) and n > 0:
                kind, length = size
                (check_chars if kind == "str" else _check_items)(length * n, "'*'")
    elif operator == "+":
        a, b = _size(left), _size(right)
        if a is not None and b is not None and a[0] == b[0]:
            (check_chars if a[0] == "str" else _check_items)(a[1] + b[1], "'+'")
    elif operator == "**":
        ints = isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0
        if ints and right * math.log2(abs(left)) > 4 * MAX_CHARS:  # bits of the result
            raise TemplateBoundError(f"'**' would make a number of over {4 * MAX_CHARS:,} bits")
    elif operator == "%" and isinstance(left, str):
        _check_format(left, "'%'")
        values = right if isinstance(right, tuple) else (right,)
        if isinstance(right, dict):
            values = tuple(right.values())
        widest = max((_text_len(v) for v in values), default=0)
        check_chars(len(left) + left.count("%") * widest, "'%'")


def _check_format(fmt: str, what: str) -> None:
    if _WIDE_NUMBER.search(fmt):
        raise TemplateBoundError(f"{what}: a format width of 10,000,000 characters or more")


def _int_args(args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and a > MAX_CHARS:
            raise TemplateBoundError(f"{what}: a width or count of {a:,} (limit {MAX_CHARS:,})")


def _check_replace(s: Any, args: tuple[Any, ...], what: str) -> None:
    if (
        isinstance(s, str)
        and len(args) >= 2
        and isinstance(args[0], str)
        and isinstance(args[1], str)
    ):
        hits = s.count(args[0]) if args[0] else len(s) + 1
        check_chars(len(s) + hits * (len(args[1]) - len(args[0])), what)


def _check_join(sep: Any, items: Any, what: str) -> None:
    if isinstance(sep, str) and isinstance(items, (list, tuple)):
        total = sum(len(x) for x in items if isinstance(x, str)) + len(sep) * max(len(items) - 1, 0)
        check_chars(total, what)


_STR_WIDENERS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map", "replace", "join"}
)


def check_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Spend a step for a sandboxed call; refuse ``str`` methods that would widen past a bound."""
    spend()
    # the sandbox hands templates str.format wrapped (functools.update_wrapper keeps __wrapped__)
    owner = getattr(getattr(obj, "__wrapped__", obj), "__self__", None)
    name = getattr(obj, "__name__", "")
    if name == "strftime" and args and isinstance(args[0], str):  # strftime_now('%900000000Y')
        _check_format(args[0], "strftime_now()")
    if obj is str or obj is repr:
        for a in args:
            _check_text(a, f"{name}()")
    if isinstance(owner, (str, bytes)) and name in _STR_WIDENERS:
        what = f"str.{name}()"
        _int_args(args, kwargs, what)
        if name in ("format", "format_map") and isinstance(owner, str):
            _check_format(owner, what)
            values = (*args, *kwargs.values())
            if name == "format_map" and args and isinstance(args[0], dict):
                values = tuple(args[0].values())
            widest = max((_text_len(v) for v in values), default=0)
            check_chars(len(owner) + owner.count("{") * widest, what)
        elif name == "expandtabs":
            size = next((a for a in (*args, *kwargs.values()) if isinstance(a, int)), 8)
            tabs = owner.count("\t" if isinstance(owner, str) else b"\t")
            check_chars(len(owner) + tabs * max(size, 0), what)
        elif name == "replace":
            _check_replace(owner, args, what)
        elif name == "join" and args:
            _check_join(owner, args[0], what)


def bounded_filter(name: str, fn: Any) -> Any:
    """``fn`` (a Jinja filter) with its width/count arguments and its result checked."""
    import functools

    from jinja2.utils import _PassArg

    # pass_context / pass_environment filters take that first; keep the marker on the wrapper
    marker = _PassArg.from_obj(fn)
    skip = 0 if marker is None else 1

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        value, rest = (args[skip], args[skip + 1 :]) if len(args) > skip else (None, ())
        what = f"filter {name!r}"
        _int_args(rest, kwargs, what)
        if name in (
            "string",
            "tojson",
            "pprint",
            "safe",
            "e",
            "escape",
            "forceescape",
            "urlencode",
        ):
            _check_text(value, what)  # str() or JSON of a structure shared many times over
        if name == "format" and isinstance(value, str):
            _check_format(value, what)
        elif name == "replace":
            _check_replace(value, rest, what)
        elif name == "join":
            _check_join(rest[0] if rest and isinstance(rest[0], str) else "", value, what)
        out = fn(*args, **kwargs)
        if isinstance(out, str):
            check_chars(len(out), what)
        elif isinstance(out, (list, tuple)):
            _check_items(len(out), what)
        return out

    return wrapped


def counted_iter(iterable: Any) -> Any:
    """A ``{% for %}``'s items, each spending a step: a sized iterable (a list, a string, a
    range) spends its length up front and is returned as it is, so Jinja's ``loop.last`` and
    ``loop.length`` stay cheap (a generator would make every ``loop.last`` peek ahead); anything
    else spends per item."""
    try:
        n = len(iterable)
    except TypeError:
        return _counted(iterable)
    spend(n)
    return iterable


def _counted(iterable: Any) -> Iterator[Any]:
    for x in iterable:
        spend()
        yield x


def checked_concat(items: tuple[Any, ...]) -> str:
    """Jinja's ``a ~ b`` (``str_join``), refused past :data:`MAX_CHARS` before joining."""
    for x in items:
        _check_text(x, "'~'")
    parts = [str(x) for x in items]
    check_chars(sum(map(len, parts)), "'~'")
    return "".join(parts)


def sandbox_generator() -> type:
    """The sandbox's code generator: ``~`` goes through :func:`checked_concat` (Jinja compiles it
    to a plain join, which no operator hook sees)."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator, optimizeconst

    class BoundedConcat(CodeGenerator):
        @optimizeconst
        def visit_Add(self, node: Any, frame: Any) -> None:
            # '+' is most of the operators a chat template runs (Qwen2's own: six per message,
            # in every prefix render): it calls the environment's two-argument ``plus`` rather
            # than the sandbox's ``call_binop(context, '+', left, right)``, which the template
            # then ran through one more call and a compare per '+' (measured: a fifth of a
            # sandboxed render). Constants fold as Jinja's own visitor folds them (none: the
            # sandbox intercepts '+'). Our own templates (not sandboxed) keep a plain '+'.
            if not self.environment.sandboxed:
                return super().visit_Add(node, frame)
            self.write("environment.plus(")
            self.visit(node.left, frame)
            self.write(", ")
            self.visit(node.right, frame)
            self.write(")")
            return None

        def visit_For(self, node: Any, frame: Any) -> None:
            # every item of every loop spends a step (a loop over a long string nests too)
            if not node.recursive:
                node = copy.copy(node)
                node.iter = nodes.Call(
                    nodes.EnvironmentAttribute("counted_iter"), [node.iter], [], None, None
                )
            super().visit_For(node, frame)

        def visit_Call(self, node: Any, frame: Any, forward_caller: bool = False) -> None:
            # visit_For's own wrapper is called directly, not through the sandbox's checks of
            # a template's calls (a template cannot name an environment attribute)
            if (
                isinstance(node.node, nodes.EnvironmentAttribute)
                and node.node.name == "counted_iter"
            ):
                self.write("environment.counted_iter(")
                self.visit(node.args[0], frame)
                self.write(")")
                return None
            return super().visit_Call(node, frame, forward_caller=forward_caller)

        def visit_Concat(self, node: Any, frame: Any) -> None:
            if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
                return super().visit_Concat(node, frame)
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")
            return None

    return BoundedConcat
