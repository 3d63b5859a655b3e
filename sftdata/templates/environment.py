"""The Jinja environment every chat template renders in: sandboxed for templates a user hands us
(with the loop, range, output and ``~`` bounds of ``bounds.py``), plain-call for our own files, with
the filters and globals HF's ``apply_chat_template`` provides (``tojson``, ``raise_exception``) and
the ``{% generation %}`` tag that marks what an assistant turn trains.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from sftdata.templates import bounds

MARKS = "__sftpipe_generation_marks__"
"""Context variable holding the list :meth:`JinjaTemplate.render_blocks` collects block edges in."""


class _GenerationTag:
    """Factory of a Jinja extension accepting HF's ``{% generation %}`` tag: its body is
    rendered as is, between two statements that note the block's edges (when
    :meth:`JinjaTemplate.render_blocks` asks for them; a plain render ignores them)."""

    @staticmethod
    def make() -> type:
        from jinja2 import nodes
        from jinja2.ext import Extension

        class GenerationTag(Extension):
            tags = frozenset({"generation"})

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                ctx = [nodes.ContextReference()]
                # Statements, not a {% call %} block: a CallBlock builds a macro per use, which
                # cost a third of rendering a tool-calling record (profiled).
                return [
                    nodes.ExprStmt(self.call_method("_mark", ctx)).set_lineno(lineno),
                    *body,
                    nodes.ExprStmt(self.call_method("_mark", ctx)).set_lineno(lineno),
                ]

            def _mark(self, context: Any) -> None:
                marks = context.get(MARKS)
                if marks is not None:
                    marks.append(None)

        return GenerationTag


_DICT_ATTRS = frozenset(dir(dict))
_LOOP_ATTRS = frozenset({"index", "index0", "first", "last", "length", "revindex", "revindex0",
                         "previtem", "nextitem", "depth", "depth0"})  # fmt: skip
"""LoopContext properties (values, not callables) read without the sandbox's checks."""


@lru_cache(maxsize=1)
def _direct_calls() -> type:
    """A Jinja code generator whose compiled calls are plain Python calls, for our own templates.

    Jinja compiles ``x.strip()`` to ``context.call(x.strip)``, which inspects the callable for
    ``pass_context``/``pass_environment`` markers on every call (profiled: a quarter of rendering
    an Alpaca record with the llama2 template). Our templates call only str/list/dict methods,
    macros, ``raise_exception``, ``strftime_now`` and Jinja's default globals, none of which
    carry such a marker (checked in :func:`jinja_env`), so the plain call does the same. Calls
    that forward ``caller`` (``{% call %}`` blocks) keep Jinja's path. Loop items still spend
    the step budget and ``~`` is still checked (bounds.py), as in the sandbox.
    """

    from jinja2 import nodes

    class DirectCalls(bounds.sandbox_generator()):  # loops and '~' still bounded
        def visit_Call(self, node: Any, frame: Any, forward_caller: bool = False) -> None:
            if forward_caller or self.environment.is_async:
                return super().visit_Call(node, frame, forward_caller)
            self.visit(node.node, frame)
            # ``signature`` writes ", arg" for every argument: ``f(*(), a, k=v)`` is ``f(a, k=v)``
            self.write("(*()")
            self.signature(node, frame)
            self.write(")")
            return None

        def visit_Output(self, node: Any, frame: Any) -> None:
            # Jinja yields every piece of ``<|im_start|>{{ m.role }}\n{{ m.content }}`` as its
            # own chunk (profiled: ~40 chunks a tool-calling record, each a generator resume
            # and a turn of render_blocks' loop). One statement's pieces are joined into one
            # chunk: the same text. Kept apart where a piece calls something (a macro could
            # note a {% generation %} mark between pieces, which must land between chunks).
            if (
                frame.buffer is not None
                or frame.require_output_check
                or frame.eval_ctx.volatile
                or frame.eval_ctx.autoescape
                or len(node.nodes) < 2
                or any(child.find(nodes.Call) is not None for child in node.nodes)
            ):
                return super().visit_Output(node, frame)
            finalize = self._make_finalize()
            self.writeline("yield ''.join((")
            self.indent()
            for child in node.nodes:
                if isinstance(child, nodes.TemplateData):
                    const = self._output_child_to_const(child, frame, finalize)
                    self.writeline(self._output_const_repr([const]) + ",")
                else:
                    self.newline(child)
                    self._output_child_pre(child, frame, finalize)
                    self.visit(child, frame)
                    self._output_child_post(child, frame, finalize)
                    self.write(",")
            self.outdent()
            self.writeline("))")
            return None

    return DirectCalls


@lru_cache(maxsize=2)
def jinja_env(*, sandboxed: bool = True) -> Any:
    # The same options (and, for templates we did not write, the same sandbox) transformers'
    # apply_chat_template uses, so that "auto" renders exactly what the model's authors intended.
    # Our own built-in templates skip the sandbox: its attribute checks cost ~1/3 of render time.
    import jinja2
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    base = ImmutableSandboxedEnvironment if sandboxed else jinja2.Environment

    class env_class(base):  # type: ignore[misc, valid-type]
        checked_concat = staticmethod(bounds.checked_concat)
        counted_iter = staticmethod(bounds.counted_iter)
        if not sandboxed:
            code_generator_class = _direct_calls()
        else:
            # bounds.py: operators, calls and '~' that could build unbounded strings or loop
            code_generator_class = bounds.sandbox_generator()
            intercepted_binops = frozenset({"*", "**", "+", "%"})

            def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
                bounds.check_binop(operator, left, right)
                return super().call_binop(context, operator, left, right)

            @staticmethod
            def plus(left: Any, right: Any) -> Any:
                """``left + right`` in a sandboxed template (bounds.sandbox_generator compiles
                every '+' to this): what ``call_binop`` does for '+', with str + str, most of
                a chat template's work (profiled: the checks around it were a third of
                rendering Glaive records with Qwen2's own template), checked inline."""
                if type(left) is str and type(right) is str:
                    if len(left) + len(right) > bounds.MAX_CHARS:
                        bounds.check_chars(len(left) + len(right), "'+'")
                    return left + right
                bounds.check_binop("+", left, right)
                return left + right  # the sandbox's binop_table['+'] is operator.add

            def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
                bounds.check_call(obj, args, kwargs)
                return super().call(context, obj, *args, **kwargs)

        # ``message.role`` on a dict: Jinja tries getattr first, which raises AttributeError
        # for every key before it falls back to ``obj[key]`` (profiled: the largest single cost
        # of rendering tool-calling records). A name that is not an attribute of dict always
        # ends in ``obj[key]`` there, so looking it up first gives the same value, sandboxed or
        # not; names dict does have (``items``, ``get``, ...) still go the usual way.
        def getattr(self, obj: Any, attribute: str) -> Any:
            if type(obj) is dict and attribute not in _DICT_ATTRS:
                try:
                    return obj[attribute]
                except KeyError:
                    pass
            elif type(obj) is LoopContext and attribute in _LOOP_ATTRS:
                # loop.first, loop.last ...: Jinja's own read-only properties, which the
                # sandbox allows; its checks per access cost a fifth of rendering a record
                return getattr(obj, attribute)
            elif not sandboxed:  # Environment.getattr's first step, one call less
                try:
                    return getattr(obj, attribute)
                except AttributeError:
                    pass
            return super().getattr(obj, attribute)

    env = env_class(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag.make(), "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = bounds.BoundedRange
    del env.globals["lipsum"]  # lorem ipsum of any length; no chat template uses it
    if sandboxed:
        env.filters = {k: bounds.bounded_filter(k, f) for k, f in env.filters.items()}
    if not sandboxed:
        from jinja2.utils import _PassArg

        # what makes _direct_calls() exact (strftime_now and the specials are added per template)
        assert all(_PassArg.from_obj(v) is None for v in env.globals.values()), env.globals
    return env


__all__ = ["MARKS", "jinja_env"]
